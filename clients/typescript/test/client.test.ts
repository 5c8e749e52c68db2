/**
 * The TypeScript client against the real stack (started by tests/test_typescript_client.py):
 * campaign_service on PostgreSQL, the dispatcher and its worker, the WAHA sandbox. Environment:
 * WHAGO_TARGET (host:port), WHAGO_API_KEY (a fresh user's key), WHAGO_SANDBOX_URL and
 * WHAGO_SANDBOX_API_KEY (where the test's chips send).
 */
import assert from "node:assert/strict";
import { randomInt, randomUUID } from "node:crypto";
import { createHash } from "node:crypto";
import { writeFile, mkdtemp } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import {
  CampaignState,
  Code,
  ConnectError,
  createWhagoClient,
  errorInfo,
  fieldViolations,
  type Campaign,
  type Chip,
  type Event,
  type Interceptor,
  type WatchCampaignResponse,
  type WhagoClient,
} from "../src/index.js";

function env(name: string): string {
  const v = process.env[name];
  assert.ok(v, `${name} must be set (tests/test_typescript_client.py sets it)`);
  return v;
}

const target = env("WHAGO_TARGET");
const apiKey = env("WHAGO_API_KEY");
const sandboxUrl = env("WHAGO_SANDBOX_URL");
const sandboxKey = env("WHAGO_SANDBOX_API_KEY");

let client: WhagoClient;

before(() => { client = createWhagoClient({ target, apiKey, timeoutMs: 10_000 }); });
after(() => client.close());

/** The rejection of a promise as a ConnectError (fails when it resolves). */
async function rpcError(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ConnectError, `not a ConnectError: ${String(e)}`);
    return e;
  }
  assert.fail("the call succeeded; an error was expected");
}

function phone(): string {
  return `+55119${String(randomInt(10 ** 8)).padStart(8, "0")}`;
}

async function chip(): Promise<Chip> {
  return client.chips.registerChip({
    chip: {
      displayName: "ts chip", phone: phone().replace("+", ""), wahaBaseUrl: sandboxUrl,
      wahaSession: `ts-${randomUUID().slice(0, 8)}`, wahaApiKey: sandboxKey,
      pacing: { intervalMinSeconds: 0, intervalMaxSeconds: 0 },
    },
  });
}

/** A campaign with `contacts` imported numbers; `intervalSeconds` between sends. */
async function campaignWith(contacts: number, intervalSeconds: number): Promise<Campaign> {
  const c = await client.campaigns.createCampaign({
    campaign: {
      name: "ts campaign", templates: [{ text: "Olá {{name}}" }], chipIds: [(await chip()).id],
      settings: {
        pacing: { intervalMinSeconds: intervalSeconds, intervalMaxSeconds: intervalSeconds },
        camouflage: { sendSeen: false, typing: false },
      },
    },
  });
  async function* rows() {
    yield { campaignId: c.id, contacts: Array.from({ length: contacts }, (_, i) => ({ phone: phone(), name: `C${i}` })) };
  }
  const imported = await client.campaigns.importContacts(rows());
  assert.equal(imported.importedCount, BigInt(contacts));
  return c;
}

/** Everything a watch yields until the server ends the stream; calls `onEach` on each message. */
async function watchAll(id: string, onEach: (m: WatchCampaignResponse) => Promise<void> | void,
  timeoutMs = 20_000): Promise<WatchCampaignResponse[]> {
  const seen: WatchCampaignResponse[] = [];
  for await (const m of client.watchCampaign(id, { timeoutMs })) {
    seen.push(m);
    await onEach(m);
  }
  return seen;
}

function events(seen: WatchCampaignResponse[]): Event[] {
  return seen.flatMap((m) => (m.kind.case === "event" ? [m.kind.value] : []));
}

describe("media", () => {
  test("a large file streams in chunks, bytes go in one call, deleteMedia removes it", async () => {
    const c = await client.campaigns.createCampaign({ campaign: { name: "ts media", templates: [{ text: "hi" }] } });
    const pdf = Buffer.concat([Buffer.from("%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"),
      Buffer.alloc(9 * 1024 * 1024, 7)]);
    const path = join(await mkdtemp(join(tmpdir(), "whago-ts-")), "catalogue.pdf");
    await writeFile(path, pdf);
    const big = await client.uploadMedia(c.id, path);
    assert.equal(big.filename, "catalogue.pdf");
    assert.equal(big.mimeType, "application/pdf");
    assert.equal(big.sizeBytes, BigInt(pdf.byteLength));
    assert.equal(big.sha256, createHash("sha256").update(pdf).digest("hex"));
    const jpeg = Buffer.from("ffd8ffe000104a46494600010100000100010000ffd9", "hex");
    const small = await client.uploadMedia(c.id, jpeg, { filename: "a.jpg" });
    assert.equal(small.mimeType, "image/jpeg");
    const listed = await client.campaigns.listCampaignMedia({ campaignId: c.id });
    assert.deepEqual(new Set(listed.media.map((m) => m.id)), new Set([big.id, small.id]));
    const gone = await client.campaigns.deleteMedia({ campaignId: c.id, mediaId: big.id });
    assert.equal(gone.fileDeleted, true);
    const err = await rpcError(client.campaigns.deleteMedia({ campaignId: c.id, mediaId: big.id }));
    assert.equal(err.code, Code.NotFound);
    const bad = await rpcError(client.uploadMedia(c.id, Buffer.alloc(5 * 1024 * 1024, 1), { filename: "x.jpg",
      mimeType: "image/jpeg" }));
    assert.equal(bad.code, Code.InvalidArgument);
  });
});

describe("campaign lifecycle over WatchCampaign", () => {
  test("create, start, watch (snapshot then events) and cancel", async () => {
    const c = await campaignWith(5, 3600); // an hour between sends: still RUNNING when cancelled
    assert.equal(c.state, CampaignState.DRAFT);
    let cancelled: Campaign | undefined;
    const seen = await watchAll(c.id, async (m) => {
      if (m.kind.case === "snapshot") {
        assert.equal(m.kind.value.campaign?.state, CampaignState.DRAFT);
        const started = await client.campaigns.startCampaign({ campaignId: c.id });
        assert.equal(started.state, CampaignState.RUNNING);
      } else if (m.kind.case === "event" && m.kind.value.type === "campaign.started") {
        assert.equal(m.kind.value.data?.state, "RUNNING");
        cancelled = await client.campaigns.cancelCampaign({ campaignId: c.id });
      }
    });
    assert.equal(seen[0]?.kind.case, "snapshot", "the snapshot comes first");
    const evs = events(seen);
    const types = evs.map((e) => e.type);
    assert.ok(types.includes("campaign.started"), types.join(","));
    assert.equal(types.at(-1), "campaign.cancelled", "the stream ends after campaign.cancelled");
    assert.equal(evs.at(-1)?.stream, `campaign:${c.id}`);
    const seqs = evs.map((e) => e.seq);
    assert.deepEqual(seqs, seqs.map((_, i) => seqs[0]! + BigInt(i)), "no gaps in the stream's sequence");
    assert.equal(cancelled?.state, CampaignState.CANCELLED);
    const now = await client.campaigns.getCampaign({ campaignId: c.id });
    assert.equal(now.state, CampaignState.CANCELLED);
    assert.equal(now.pendingCount, 0n);
  });

  test("watch a fast campaign until campaign.completed", async () => {
    const c = await campaignWith(3, 0);
    const seen = await watchAll(c.id, async (m) => {
      if (m.kind.case === "snapshot") await client.campaigns.startCampaign({ campaignId: c.id });
    });
    assert.equal(seen[0]?.kind.case, "snapshot");
    const types = events(seen).map((e) => e.type);
    assert.equal(types[0], "campaign.started", types.join(","));
    assert.equal(types.at(-1), "campaign.completed", types.join(","));
    const done = await client.campaigns.getCampaign({ campaignId: c.id });
    assert.equal(done.state, CampaignState.COMPLETED);
    assert.equal(done.sentCount + done.deliveredCount + done.readCount, 3n);
  });

  test("request_id: a repeated create returns the first result; the wrapper fills one per call", async () => {
    const requestId = randomUUID();
    const a = await client.campaigns.createCampaign({ campaign: { name: "once", templates: [{ text: "hi" }] }, requestId });
    const b = await client.campaigns.createCampaign({ campaign: { name: "once", templates: [{ text: "hi" }] }, requestId });
    assert.equal(a.id, b.id);
    const c = await client.campaigns.createCampaign({ campaign: { name: "once", templates: [{ text: "hi" }] } });
    const d = await client.campaigns.createCampaign({ campaign: { name: "once", templates: [{ text: "hi" }] } });
    assert.equal(new Set([a.id, c.id, d.id]).size, 3);
  });
});

describe("error codes and details", () => {
  test("INVALID_ARGUMENT for a malformed campaign id, with the field violation", async () => {
    const err = await rpcError(client.campaigns.getCampaign({ campaignId: "not-a-uuid" }));
    assert.equal(err.code, Code.InvalidArgument, err.message);
    assert.deepEqual(fieldViolations(err).map((v) => v.field), ["campaign_id"]);
  });

  test("INVALID_ARGUMENT for an empty name names campaign.name", async () => {
    const err = await rpcError(client.campaigns.createCampaign({ campaign: { name: "", templates: [{ text: "hi" }] } }));
    assert.equal(err.code, Code.InvalidArgument);
    const v = fieldViolations(err);
    assert.deepEqual(v.map((x) => x.field), ["campaign.name"]);
    assert.ok(v[0]?.description);
  });

  test("NOT_FOUND for an unknown campaign", async () => {
    const err = await rpcError(client.campaigns.getCampaign({ campaignId: randomUUID() }));
    assert.equal(err.code, Code.NotFound, err.message);
    assert.ok(err.rawMessage);
  });

  test("FAILED_PRECONDITION NO_CONTACTS when starting an empty campaign", async () => {
    const c = await client.campaigns.createCampaign({
      campaign: { name: "empty", templates: [{ text: "hi" }], chipIds: [(await chip()).id] } });
    const err = await rpcError(client.campaigns.startCampaign({ campaignId: c.id }));
    assert.equal(err.code, Code.FailedPrecondition);
    assert.equal(errorInfo(err)?.reason, "NO_CONTACTS");
  });

  test("UNAUTHENTICATED without a key and with a wrong one", async () => {
    for (const key of [undefined, "wk_not-a-real-key"]) {
      const saved = process.env.WHAGO_API_KEY;
      delete process.env.WHAGO_API_KEY; // the default key source
      const anon = createWhagoClient({ target, apiKey: key, retry: false });
      if (saved !== undefined) process.env.WHAGO_API_KEY = saved;
      try {
        const err = await rpcError(anon.campaigns.listCampaigns({}));
        assert.equal(err.code, Code.Unauthenticated, `key ${key}: ${err.message}`);
        assert.equal(errorInfo(err)?.reason, "UNAUTHENTICATED");
        const watchErr = await rpcError((async () => { for await (const _ of anon.watchCampaign(randomUUID())) { /* none */ } })());
        assert.equal(watchErr.code, Code.Unauthenticated);
      } finally {
        anon.close();
      }
    }
  });

  test("DEADLINE_EXCEEDED when a watch outlasts its deadline", async () => {
    const c = await client.campaigns.createCampaign({ campaign: { name: "quiet", templates: [{ text: "hi" }] } });
    const started = Date.now();
    const err = await rpcError(watchAll(c.id, () => {}, 300));
    assert.equal(err.code, Code.DeadlineExceeded);
    assert.ok(Date.now() - started < 5000);
  });

  test("UNAVAILABLE is retried (reads, request_id mutations), then surfaces", async () => {
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(0, "127.0.0.1", () => r()));
    const port = (srv.address() as { port: number }).port;
    await new Promise<void>((r) => srv.close(() => r())); // nothing listens there now
    const attempts: string[] = [];
    const count: Interceptor = (next) => (req) => { attempts.push(req.method.name); return next(req); };
    const down = createWhagoClient({ target: `127.0.0.1:${port}`, apiKey, interceptors: [count],
      retry: { maxAttempts: 3, initialBackoffMs: 10 } });
    try {
      const err = await rpcError(down.campaigns.getCampaign({ campaignId: randomUUID() }));
      assert.equal(err.code, Code.Unavailable);
      assert.deepEqual(attempts, ["GetCampaign", "GetCampaign", "GetCampaign"]);
      attempts.length = 0;
      await rpcError(down.chips.deleteChip({ chipId: randomUUID() })); // no request_id: never retried
      assert.deepEqual(attempts, ["DeleteChip"]);
    } finally {
      down.close();
    }
  });
});
