"""AsyncWhagoClient (grpc.aio) against the real stack, like test_client_e2e.py for the sync client:
campaign_service on PostgreSQL, the dispatcher and its worker on Redis, the WAHA sandbox. Typed errors
with their details, async pagers over real pages, streamed imports (sync and async sources, a failing
source), watch() to the end and across a cut connection, webhooks and the audit trail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest
from whago_client import RetryPolicy, errors
from whago_client.aio import AsyncPager, AsyncWhagoClient

from devstack.procs import ServiceProcess
from devstack.servers import free_port
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import phones
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import credit_service_pb2 as crs
from whago.campaign.v1 import resources_pb2 as res

T = TypeVar("T")
FAST = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=0, interval_max_seconds=0),
                            camouflage=res.Camouflage(send_seen=False, typing=False))
MISSING = "6f0c6bde-4a5c-4e0c-9d1e-1b2a3c4d5e6f"


@pytest.fixture()
def target(stack: dict[str, ServiceProcess], ports: dict[str, int]) -> str:
    return f"127.0.0.1:{ports['campaign']}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """No pytest-asyncio here: each test drives its own event loop, with an overall bound."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 120)
    return asyncio.run(bounded())


async def fast_chip(client: AsyncWhagoClient, sandbox_url: str, interval: float = 0) -> res.Chip:
    return await client.register_chip(
        phones(1)[0].replace(" ", ""), sandbox_url, f"aio-{time.monotonic_ns()}", SANDBOX_API_KEY,
        display_name="aio chip", pacing=res.Pacing(interval_min_seconds=interval, interval_max_seconds=interval))


def test_create_import_start_watch_to_completed_then_list(target: str, api_key: str, sandbox_url: str) -> None:
    async def main() -> None:
        async with AsyncWhagoClient(target, api_key=api_key, timeout=30) as client:
            chip = await fast_chip(client, sandbox_url)
            c = await client.create_campaign("aio", templates=["Oi {{name}}"], chip_ids=[chip.id], settings=FAST)
            assert c.state == res.CAMPAIGN_STATE_DRAFT

            async def rows() -> AsyncIterator[dict[str, str]]:  # an async source, 2 messages of 3 + 2
                for i, p in enumerate(phones(5, start=300)):
                    yield {"phone": p, "name": f"N{i}", "city": "Recife"}
            report = await client.import_contacts(c.id, rows(), batch_size=3)
            assert (report.imported_count, report.rejected_count, report.total_contacts) == (5, 0, 5)
            assert (await client.start_campaign(c.id)).state == res.CAMPAIGN_STATE_RUNNING

            # after_seq=1 (after "created"): replayed and then live, whether or not it already completed.
            got = [m async for m in client.watch(c.id, after_seq=1, timeout=60)]
            assert got[0].WhichOneof("kind") == "snapshot" and got[0].snapshot.campaign.id == c.id
            assert "campaign.started" in [m.event.type for m in got[1:]]
            assert got[-1].event.type == "campaign.completed" and got[-1].event.data["sent_count"] == 5
            seqs = [m.event.seq for m in got[1:]]
            assert seqs == list(range(2, 2 + len(seqs)))  # gap-free, in order

            done = await client.wait_for_state(c.id, "COMPLETED", timeout=10, poll=0.1)
            assert (done.sent_count, done.pending_count) == (5, 0)
            sent = await client.list_messages(c.id, state="SENT", page_size=2).to_list()
            assert len(sent) == 5 and all(m.chip_id == chip.id for m in sent)
            contacts = client.list_contacts(c.id, page_size=2)
            first = await contacts.first()
            assert first is not None and dict(first.variables) == {"city": "Recife"}
            assert [len(p) async for p in contacts.pages()] == [2, 2, 1]
            assert [ch.id async for ch in client.list_chips()] == [chip.id]

            balance = await client.get_credit_balance()
            assert balance.reserved == 0
            kinds = {t.kind async for t in client.list_credit_transactions(campaign_id=c.id)}
            assert kinds == {crs.CREDIT_TRANSACTION_KIND_RESERVE, crs.CREDIT_TRANSACTION_KIND_CONSUME}
            reserve = await client.list_credit_transactions(campaign_id=c.id, kind="RESERVE").first()
            assert reserve is not None and abs(reserve.amount) == 5
            audit = [a.action async for a in client.list_audit_events(entity_type="campaign", entity_id=c.id)]
            assert audit[-1] == "campaign.create" and "campaign.start" in audit
    run(main())


def test_typed_errors_carry_the_servers_details(target: str, api_key: str, sandbox_url: str,
                                                create_user: Callable[..., str]) -> None:
    async def main() -> None:
        async with AsyncWhagoClient(target, api_key=api_key) as client:
            with pytest.raises(errors.InvalidArgument) as bad:
                await client.create_campaign("", templates=["hi"])
            assert [f for f, _ in bad.value.field_violations] == ["campaign.name"]
            assert isinstance(bad.value.__cause__, grpc.aio.AioRpcError)

            with pytest.raises(errors.NotFound) as nf:
                await client.get_campaign(MISSING)
            assert type(nf.value) is errors.NotFound and nf.value.message

            empty = await client.create_campaign("empty", templates=["hi"],
                                                 chip_ids=[(await fast_chip(client, sandbox_url)).id])
            with pytest.raises(errors.FailedPrecondition) as fp:
                await client.start_campaign(empty.id)
            assert fp.value.reason == "NO_CONTACTS"
            with pytest.raises(errors.NotFound):
                async for _ in client.watch(MISSING, timeout=10):
                    pass
            with pytest.raises(errors.NotFound):  # a streamed call's error is typed too
                await client.import_contacts(MISSING, ["5511912345678"])
            with pytest.raises(errors.InvalidArgument) as e:
                await client.webhooks.create("http://10.0.0.1/hooks")
            assert [f for f, _ in e.value.field_violations] == ["endpoint.url"]

        for key in ("wk_not-a-real-key", None):
            async with AsyncWhagoClient(target, api_key=key, retry=RetryPolicy(max_attempts=1)) as bad_key:
                with pytest.raises(errors.Unauthenticated) as exc:
                    await bad_key.list_campaigns().to_list()
                assert exc.value.reason == "UNAUTHENTICATED"
    run(main())


def test_async_pager_walks_every_page_and_request_id_replays(target: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncWhagoClient(target, api_key=api_key) as client:
            ids = {(await client.create_campaign(f"c{i}", templates=["hi"])).id for i in range(25)}
            pager = client.list_campaigns(page_size=10)
            assert isinstance(pager, AsyncPager)
            pages = [p async for p in pager.pages()]
            assert [len(p) for p in pages] == [10, 10, 5]
            listed = [c.id for p in pages for c in p]
            assert set(listed) == ids and [c.id async for c in pager] == listed  # again from page 1
            assert await client.list_campaigns(state="RUNNING").to_list() == []
            a = await client.create_campaign("once", templates=["hi"], request_id="aio-create-1")
            b = await client.create_campaign("once", templates=["hi"], request_id="aio-create-1")
            assert a.id == b.id
    run(main())


def test_a_failing_source_cancels_the_import_and_nothing_is_kept(target: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncWhagoClient(target, api_key=api_key) as client:
            c = await client.create_campaign("broken", templates=["hi"])

            def rows() -> Any:
                yield from (p.replace(" ", "") for p in phones(1500, start=900))
                raise ValueError("row 1501: bad encoding")
            with pytest.raises(ValueError, match="row 1501"):
                await client.import_contacts(c.id, rows(), batch_size=1000)

            async def arows() -> AsyncIterator[str]:
                for p in phones(10, start=2900):
                    yield p
                raise OSError("disk gone")
            with pytest.raises(OSError, match="disk gone"):
                await client.import_contacts(c.id, arows(), batch_size=4)
            # Neither stream was half-closed, so neither import transaction committed: a good import
            # afterwards is all the campaign holds.
            ok = await client.import_contacts(c.id, phones(3, start=5000))
            assert ok.total_contacts == 3
            assert len(await client.list_contacts(c.id).to_list()) == 3
    run(main())


class CuttableProxy:
    """A loopback TCP forwarder whose open connections can be cut, as a network fault would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.handlers: set[asyncio.Task[Any]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for w in self.writers:
            w.transport.abort()  # RST, no goodbye: the client sees the stream fail (UNAVAILABLE)
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)  # their pipes end with the cut


def test_watch_reconnects_after_a_cut_connection_without_losing_or_repeating_events(
        target: str, api_key: str, sandbox_url: str, ports: dict[str, int]) -> None:
    async def main() -> None:
        proxy = CuttableProxy(ports["campaign"])
        proxied = f"127.0.0.1:{await proxy.start()}"
        try:
            async with AsyncWhagoClient(target, api_key=api_key) as direct, \
                    AsyncWhagoClient(proxied, api_key=api_key) as client:
                # ~4 s of sending: progress events (at most one a second) come while it runs.
                chip = await fast_chip(direct, sandbox_url, interval=0.3)
                settings = res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=0.3,
                                                                  interval_max_seconds=0.3),
                                                camouflage=res.Camouflage(send_seen=False, typing=False))
                c = await direct.create_campaign("cut", templates=["hi"], chip_ids=[chip.id], settings=settings)
                await direct.import_contacts(c.id, phones(12, start=7000))
                await direct.start_campaign(c.id)
                got: list[cs.WatchCampaignResponse] = []
                async for msg in client.watch(c.id, after_seq=1, timeout=60):
                    got.append(msg)
                    if len(got) == 2:  # the snapshot and a first event: now the network fails
                        proxy.cut()
                kinds = [m.WhichOneof("kind") for m in got]
                assert kinds.count("snapshot") == 2, kinds  # a fresh snapshot after reconnecting
                assert proxy.connections >= 2
                seqs = [m.event.seq for m in got if m.WhichOneof("kind") == "event"]
                assert seqs == list(range(2, 2 + len(seqs))), seqs  # every event once, in order, no gap
                assert got[-1].event.type == "campaign.completed" and got[-1].event.data["sent_count"] == 12
                # The events seen are exactly the campaign's stream after "created".
                replay = [m.event.seq async for m in direct.watch(c.id, after_seq=1, timeout=30)
                          if m.WhichOneof("kind") == "event"]
                assert seqs == replay
        finally:
            await proxy.close()
    run(main())


def test_webhooks_and_audit(target: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncWhagoClient(target, api_key=api_key) as client:
            created = await client.webhooks.create("http://127.0.0.1:9/hooks", event_types=["webhook.test"],
                                                   description="aio")
            assert created.secret.startswith("whsec_")
            eid = created.endpoint.endpoint_id
            assert [e.endpoint_id async for e in client.webhooks.list()] == [eid]
            assert (await client.webhooks.get(eid)).description == "aio"
            updated = await client.webhooks.update(eid, description="renamed")
            assert updated.description == "renamed" and updated.event_types == ["webhook.test"] and updated.enabled
            rotated = await client.webhooks.rotate_secret(eid)
            assert rotated.secret.startswith("whsec_") and rotated.secret != created.secret
            await client.webhooks.send_test(eid)
            assert [d.event.type async for d in client.webhooks.list_deliveries(eid)] == ["webhook.test"]
            await client.webhooks.delete(eid)
            with pytest.raises(errors.NotFound):
                await client.webhooks.get(eid)
            actions = [a.action async for a in client.list_audit_events(entity_type="webhook", entity_id=eid)]
            assert actions == ["webhook.delete", "webhook.test", "webhook.rotate_secret", "webhook.update",
                               "webhook.create"]
    run(main())


def test_every_call_has_a_deadline_and_unavailable_is_typed() -> None:
    """Nothing listens: the call fails UNAVAILABLE (after gRPC's retries) well within its deadline."""
    async def main() -> None:
        quick = RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.02)
        async with AsyncWhagoClient(f"127.0.0.1:{free_port()}", api_key="k", retry=quick, timeout=5) as client:
            t0 = time.monotonic()
            with pytest.raises(errors.Unavailable):
                await client.get_campaign(MISSING)
            with pytest.raises(errors.Unavailable):
                async for _ in client.watch(MISSING, reconnects=1):
                    pass
            assert time.monotonic() - t0 < 5
    run(main())
