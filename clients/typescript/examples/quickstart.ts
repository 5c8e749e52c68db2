/**
 * Quickstart: the caller's credits and campaigns; with phone numbers, a campaign to them, started
 * and watched to the end (Ctrl-C cancels it).
 *
 *   WHAGO_API_KEY=<key> node dist/examples/quickstart.js                      # balance + campaigns
 *   WHAGO_API_KEY=<key> node dist/examples/quickstart.js +5511999990001 ...   # send, watch
 *
 * WHAGO_TARGET is campaign_service's address (default 127.0.0.1:50051, as `make run` starts it).
 */
import { CampaignState, Code, ConnectError, createWhagoClient, errorInfo, fieldViolations } from "../src/index.js";

const client = createWhagoClient({ target: process.env.WHAGO_TARGET ?? "127.0.0.1:50051", timeoutMs: 10_000 });

async function main(phones: string[]): Promise<void> {
  const balance = await client.credits.getCreditBalance({});
  console.log(`credits: ${balance.available} available, ${balance.reserved} reserved`);
  const { campaigns } = await client.campaigns.listCampaigns({ pageSize: 5 });
  for (const c of campaigns) console.log(`${c.id}  ${CampaignState[c.state]}  ${c.sentCount}/${c.totalContacts}  ${c.name}`);
  if (phones.length === 0) return;

  // chipIds empty: every chip of the user at Start.
  const campaign = await client.campaigns.createCampaign({
    campaign: { name: "quickstart", templates: [{ text: "Olá {{name}}, this is the quickstart." }] },
  });
  async function* rows() {
    yield { campaignId: campaign.id, contacts: phones.map((phone) => ({ phone, name: "friend" })) };
  }
  const imported = await client.campaigns.importContacts(rows());
  console.log(`campaign ${campaign.id}: ${imported.importedCount} contacts, ${imported.rejectedCount} rejected`);

  const stop = new AbortController();
  process.once("SIGINT", () => {
    void client.campaigns.cancelCampaign({ campaignId: campaign.id }).then(
      (c) => console.log(`cancelled: ${CampaignState[c.state]}`), () => stop.abort());
  });
  await client.campaigns.startCampaign({ campaignId: campaign.id });
  for await (const msg of client.watchCampaign(campaign.id, { signal: stop.signal })) {
    if (msg.kind.case === "snapshot") {
      const s = msg.kind.value;
      console.log(`snapshot: ${CampaignState[s.campaign?.state ?? 0]}, ${s.sendRatePerMinute.toFixed(1)}/min`);
    } else if (msg.kind.case === "event") {
      const e = msg.kind.value;
      console.log(`#${e.seq} ${e.type} ${JSON.stringify(e.data ?? {})}`);
    }
  }
}

main(process.argv.slice(2))
  .catch((e: unknown) => {
    const err = ConnectError.from(e);
    const reason = errorInfo(err)?.reason;
    console.error(`error: ${Code[err.code]}${reason ? ` (${reason})` : ""}: ${err.rawMessage}`);
    for (const v of fieldViolations(err)) console.error(`  ${v.field}: ${v.description}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
