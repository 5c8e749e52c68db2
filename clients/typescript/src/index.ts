/**
 * A thin hand-written layer over the generated clients (src/gen/, from protos/ by `buf generate`):
 * the API key on every call, a default deadline, retries of transient failures of calls that are
 * safe to repeat, a reconnecting WatchCampaign, and readers for the server's rich error details.
 * Everything else is the generated Connect clients as they are.
 */
import { clone, type DescMessage, type MessageInitShape, type MessageShape } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import {
  Code,
  ConnectError,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { randomUUID } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { basename } from "node:path";

import { AuditService } from "./gen/whago/campaign/v1/audit_service_pb.js";
import {
  CampaignService,
  type UploadMediaChunksRequestSchema,
  type WatchCampaignResponse,
} from "./gen/whago/campaign/v1/campaign_service_pb.js";
import { ChipService } from "./gen/whago/campaign/v1/chip_service_pb.js";
import { CreditService } from "./gen/whago/campaign/v1/credit_service_pb.js";
import type { Media } from "./gen/whago/campaign/v1/resources_pb.js";
import { WebhookService } from "./gen/whago/campaign/v1/webhook_service_pb.js";

export { Code, ConnectError, type CallOptions, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
export * from "./gen/whago/campaign/v1/resources_pb.js";
export * from "./gen/whago/campaign/v1/events_pb.js";
export * from "./gen/whago/campaign/v1/campaign_service_pb.js";
export * from "./gen/whago/campaign/v1/chip_service_pb.js";
export * from "./gen/whago/campaign/v1/credit_service_pb.js";
export * from "./gen/whago/campaign/v1/webhook_service_pb.js";
export * from "./gen/whago/campaign/v1/audit_service_pb.js";

/** Retries of transient failures (like the Python SDK's RetryPolicy): exponential backoff with jitter. */
export interface RetryOptions {
  /** Attempts in all, the first included (1 = no retry). Default 4. */
  maxAttempts?: number;
  /** Wait before the first retry, ms. Default 200. */
  initialBackoffMs?: number;
  /** Longest wait between attempts, ms. Default 3000. */
  maxBackoffMs?: number;
  /** Growth of the wait per attempt. Default 2. */
  multiplier?: number;
  /** Codes retried. Default [Code.Unavailable]. */
  codes?: Code[];
}

export interface WhagoClientOptions {
  /** campaign_service's address: "host:port" (plaintext h2c) or an http:// / https:// URL. */
  target: string;
  /** The user's API key, sent as `authorization: Bearer <key>`. Default $WHAGO_API_KEY; none if unset. */
  apiKey?: string;
  /** Default deadline (ms) of unary and client-streaming calls, when the call passes no timeoutMs. Default 30000.
   *  Server-streaming calls (WatchCampaign) get none by default: they last as long as the campaign. */
  timeoutMs?: number;
  /** Retry policy, or false for none. */
  retry?: RetryOptions | false;
  /** More interceptors, run inside the wrapper's (after the key is set, once per attempt). */
  interceptors?: Interceptor[];
}

export interface WatchOptions {
  /** Resume after this event sequence number (Event.seq); 0 (default) for only new events. */
  afterSeq?: bigint;
  /** Stops the watch (the iterator then throws a ConnectError with Code.Canceled). */
  signal?: AbortSignal;
  /** Deadline of each stream, ms; default none. */
  timeoutMs?: number;
  /** Reconnects after UNAVAILABLE (resuming after the last event seen); default 5. */
  maxReconnects?: number;
}

export interface UploadOptions {
  /** File name; defaults to the path's base name (required for bytes). */
  filename?: string;
  /** Declared MIME type; empty lets the server decide from the bytes (it sniffs them anyway). */
  mimeType?: string;
  /** Idempotency key; a fresh UUID by default. */
  requestId?: string;
  signal?: AbortSignal;
  /** Deadline of the whole upload, ms; default the client's. */
  timeoutMs?: number;
}

/** Bytes per UploadMediaChunks message (the server reads up to 4 MiB a chunk). */
export const MEDIA_CHUNK_BYTES = 4 * 1024 * 1024;

export interface WhagoClient {
  readonly campaigns: Client<typeof CampaignService>;
  readonly chips: Client<typeof ChipService>;
  readonly credits: Client<typeof CreditService>;
  readonly webhooks: Client<typeof WebhookService>;
  readonly audit: Client<typeof AuditService>;
  /** The transport with the key, deadlines and retries, for createClient() of other services. */
  readonly transport: Transport;
  /**
   * WatchCampaign as an async iterator: the snapshot, then every event until the campaign is
   * COMPLETED, CANCELLED or deleted (the server then ends the stream and the iteration ends).
   * On UNAVAILABLE it reconnects with after_seq = the last event seen, so no event is missed
   * (a fresh snapshot comes first after each reconnect).
   */
  watchCampaign(campaignId: string, options?: WatchOptions): AsyncGenerator<WatchCampaignResponse>;
  /**
   * Uploads a media file for a DRAFT/SCHEDULED campaign's templates: a path (read as it goes) or
   * bytes. Up to MEDIA_CHUNK_BYTES goes in one UploadMedia; more streams through
   * UploadMediaChunks (documents up to 100 MB; the server checks type and limit as bytes arrive).
   */
  uploadMedia(campaignId: string, source: string | Uint8Array, options?: UploadOptions): Promise<Media>;
  /** Closes the HTTP/2 connection; calls in flight fail with Code.Canceled. */
  close(): void;
}

/** Calls that are not retried: no request_id, so a repeat is not known to be harmless. */
const NOT_RETRIED = new Set(["whago.campaign.v1.ChipService/DeleteChip", "whago.campaign.v1.CampaignService/ImportContacts"]);
/** Services whose reads and request_id-carrying mutations are retried (as in the Python SDK). */
const RETRIED_SERVICES = new Set(["whago.campaign.v1.CampaignService", "whago.campaign.v1.ChipService",
  "whago.campaign.v1.CreditService"]);

function baseUrl(target: string): string {
  return /^https?:\/\//.test(target) ? target.replace(/\/+$/, "") : `http://${target}`;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(ConnectError.from(signal.reason, Code.Canceled));
    const t = setTimeout(() => { signal?.removeEventListener("abort", onAbort); resolve(); }, ms);
    const onAbort = () => { clearTimeout(t); reject(ConnectError.from(signal?.reason, Code.Canceled)); };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Sets `authorization: Bearer <key>` unless the call set its own. */
function authInterceptor(apiKey: string | undefined): Interceptor {
  return (next) => (req) => {
    if (apiKey && !req.header.has("authorization")) req.header.set("authorization", `Bearer ${apiKey}`);
    return next(req);
  };
}

/**
 * Fills an empty request_id (AIP-155 idempotency key) with a fresh UUID, once per call, so that
 * the retries of one call repeat the same id and the server returns the first result.
 */
function requestIdInterceptor(): Interceptor {
  return (next) => (req) => {
    if (req.stream) return next(req);
    const field = req.method.input.fields.find((f) => f.name === "request_id" && f.fieldKind === "scalar");
    const message = req.message as Record<string, unknown>;
    if (!field || message[field.localName]) return next(req);
    const copy = clone(req.method.input as DescMessage, req.message as MessageShape<DescMessage>) as Record<string, unknown>;
    copy[field.localName] = randomUUID();
    return next({ ...req, message: copy as typeof req.message });
  };
}

/** Retries unary calls of RETRIED_SERVICES on the given codes, within the call's deadline. */
function retryInterceptor(opts: RetryOptions): Interceptor {
  const maxAttempts = Math.max(1, opts.maxAttempts ?? 4);
  const initial = opts.initialBackoffMs ?? 200;
  const max = opts.maxBackoffMs ?? 3000;
  const multiplier = opts.multiplier ?? 2;
  const codes = new Set(opts.codes ?? [Code.Unavailable]);
  return (next) => async (req) => {
    const name = `${req.service.typeName}/${req.method.name}`;
    if (req.stream || !RETRIED_SERVICES.has(req.service.typeName) || NOT_RETRIED.has(name)) return next(req);
    let backoff = initial;
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(req);
      } catch (e) {
        const err = ConnectError.from(e);
        if (attempt >= maxAttempts || !codes.has(err.code) || req.signal.aborted) throw err;
        await sleep(Math.random() * backoff, req.signal);
        backoff = Math.min(backoff * multiplier, max);
      }
    }
  };
}

/** A transport that gives unary and client-streaming calls a default deadline, server streams none. */
function withDefaultDeadline(base: Transport, timeoutMs: number): Transport {
  return {
    unary: (method, signal, t, header, input, ctx) => base.unary(method, signal, t ?? timeoutMs, header, input, ctx),
    stream: (method, signal, t, header, input, ctx) => base.stream(method, signal,
      t ?? (method.methodKind === "client_streaming" ? timeoutMs : undefined), header, input, ctx),
  };
}

/**
 * A client of campaign_service over gRPC (HTTP/2): the generated CampaignService, ChipService,
 * CreditService, WebhookService and AuditService clients sharing one connection.
 */
export function createWhagoClient(options: WhagoClientOptions): WhagoClient {
  const url = baseUrl(options.target);
  const sessionManager = new Http2SessionManager(url, { pingIntervalMs: 30_000 });
  const interceptors: Interceptor[] = [requestIdInterceptor()];
  if (options.retry !== false) interceptors.push(retryInterceptor(options.retry ?? {}));
  interceptors.push(authInterceptor(options.apiKey ?? process.env.WHAGO_API_KEY), ...(options.interceptors ?? []));
  const transport = withDefaultDeadline(
    createGrpcTransport({ baseUrl: url, sessionManager, interceptors }), options.timeoutMs ?? 30_000);
  const campaigns = createClient(CampaignService, transport);

  async function* watchCampaign(campaignId: string, w: WatchOptions = {}): AsyncGenerator<WatchCampaignResponse> {
    let afterSeq = w.afterSeq ?? 0n;
    let reconnects = 0;
    const maxReconnects = w.maxReconnects ?? 5;
    const call: CallOptions = { signal: w.signal, timeoutMs: w.timeoutMs };
    for (;;) {
      try {
        for await (const msg of campaigns.watchCampaign({ campaignId, afterSeq }, call)) {
          if (msg.kind.case === "snapshot" && afterSeq === 0n) afterSeq = msg.kind.value.seq;
          if (msg.kind.case === "event") afterSeq = msg.kind.value.seq;
          reconnects = 0;
          yield msg;
        }
        return;
      } catch (e) {
        const err = ConnectError.from(e);
        if (err.code !== Code.Unavailable || reconnects >= maxReconnects || w.signal?.aborted) throw err;
        await sleep(Math.min(200 * 2 ** reconnects, 3000) * (0.5 + Math.random() / 2), w.signal);
        reconnects++;
      }
    }
  }

  async function uploadMedia(campaignId: string, source: string | Uint8Array, o: UploadOptions = {}): Promise<Media> {
    const filename = o.filename ?? (typeof source === "string" ? basename(source) : "");
    if (!filename) throw new TypeError("options.filename is required when uploading bytes");
    const head = { campaignId, filename, mimeType: o.mimeType ?? "", requestId: o.requestId ?? randomUUID() };
    const call: CallOptions = { signal: o.signal, timeoutMs: o.timeoutMs };
    const size = typeof source === "string" ? (await stat(source)).size : source.byteLength;
    if (size <= MEDIA_CHUNK_BYTES) {
      const content = typeof source === "string" ? await readAll(source) : source;
      return campaigns.uploadMedia({ ...head, content }, call);
    }
    async function* chunks(): AsyncGenerator<MessageInitShape<typeof UploadMediaChunksRequestSchema>> {
      let first = true;
      const pieces = typeof source === "string"
        ? createReadStream(source, { highWaterMark: MEDIA_CHUNK_BYTES })
        : slices(source, MEDIA_CHUNK_BYTES);
      for await (const piece of pieces) {
        yield first ? { ...head, content: piece as Uint8Array } : { content: piece as Uint8Array };
        first = false;
      }
    }
    return campaigns.uploadMediaChunks(chunks(), call);
  }

  return {
    uploadMedia,
    campaigns,
    chips: createClient(ChipService, transport),
    credits: createClient(CreditService, transport),
    webhooks: createClient(WebhookService, transport),
    audit: createClient(AuditService, transport),
    transport,
    watchCampaign,
    close: () => sessionManager.abort(),
  };
}

async function readAll(path: string): Promise<Uint8Array> {
  const parts: Buffer[] = [];
  for await (const piece of createReadStream(path)) parts.push(piece as Buffer);
  return Buffer.concat(parts);
}

function* slices(bytes: Uint8Array, size: number): Generator<Uint8Array> {
  for (let i = 0; i < bytes.byteLength; i += size) yield bytes.subarray(i, i + size);
}

// ------------------------------------------------------------------------- rich error details

/** google.rpc.ErrorInfo of an error, if the server sent one (`reason` is e.g. "NO_CONTACTS"). */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

/** One google.rpc.BadRequest.FieldViolation: the request field and why it is wrong. */
export interface FieldViolation {
  field: string;
  description: string;
}

function rawDetails(err: unknown, typeName: string): Uint8Array[] {
  return ConnectError.from(err).details.flatMap((d) =>
    "type" in d && typeof d.type === "string" && d.type === typeName && d.value instanceof Uint8Array ? [d.value] : []);
}

/** Reads a message of string fields (and string maps, as nested messages), calling f per field. */
function readFields(bytes: Uint8Array, f: (no: number, r: BinaryReader) => boolean): void {
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (wt !== WireType.LengthDelimited || !f(no, r)) r.skip(wt, no);
  }
}

/** The google.rpc.ErrorInfo in a ConnectError's details (grpc-status-details-bin), or undefined. */
export function errorInfo(err: unknown): ErrorInfo | undefined {
  const [bytes] = rawDetails(err, "google.rpc.ErrorInfo");
  if (!bytes) return undefined;
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  readFields(bytes, (no, r) => {
    if (no === 1) info.reason = r.string();
    else if (no === 2) info.domain = r.string();
    else if (no === 3) {
      let k = "", v = "";
      readFields(r.bytes(), (n, e) => (n === 1 ? (k = e.string(), true) : n === 2 ? (v = e.string(), true) : false));
      info.metadata[k] = v;
    } else return false;
    return true;
  });
  return info;
}

/** The field violations of a google.rpc.BadRequest in a ConnectError's details (INVALID_ARGUMENT). */
export function fieldViolations(err: unknown): FieldViolation[] {
  const out: FieldViolation[] = [];
  for (const bytes of rawDetails(err, "google.rpc.BadRequest")) {
    readFields(bytes, (no, r) => {
      if (no !== 1) return false;
      const v: FieldViolation = { field: "", description: "" };
      readFields(r.bytes(), (n, e) => (n === 1 ? (v.field = e.string(), true) : n === 2 ? (v.description = e.string(), true) : false));
      out.push(v);
      return true;
    });
  }
  return out;
}
