# ruff: noqa: F811  (pytest fixtures imported from test_campaign_support)
"""With the dispatcher unreachable, lifecycle calls fail UNAVAILABLE and leave the campaign (its row,
messages, the user's credits) exactly as it was. A second campaign_service process shares the
database but points DISPATCHER_TARGET at a closed port."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from devstack.procs import ServiceProcess
from devstack.servers import free_port
from tests.helpers import Api
from tests.test_campaign_support import (  # noqa: F401
    api,
    count,
    draft,
    engine,
    fails,
    live,
    row,
    running,
    slow_chip,
    snapshot,
)
from whago.campaign.v1 import resources_pb2 as res

SNAPSHOT_SKIP = ("dispatch_epoch",)  # bumped on purpose: it fences any lane of the failed attempt


@pytest.fixture(scope="module")
def isolated_channel(stack_env: dict[str, str], workdir: Path) -> Iterator[grpc.Channel]:
    port, closed = free_port(), free_port()
    env = {**stack_env, "CAMPAIGN_LISTEN": f"127.0.0.1:{port}", "DISPATCHER_TARGET": f"127.0.0.1:{closed}",
           "DISPATCHER_TIMEOUT_SECONDS": "3"}
    proc = ServiceProcess("campaign-no-dispatcher", "campaign_service.server", [], env, workdir / "logs",
                          port=port).start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(ch).result(timeout=15)
    yield ch
    ch.close()
    proc.stop()


def strip(snap: dict[str, object]) -> dict[str, object]:
    out = dict(snap)
    out["campaigns"] = [{k: v for k, v in r.items() if k not in SNAPSHOT_SKIP}
                        for r in snap["campaigns"]]  # type: ignore[attr-defined]
    return out


def test_start_with_dispatcher_unreachable_is_unavailable_and_changes_nothing(
        isolated_channel: grpc.Channel, api_key: str, engine: sa.Engine, live: str) -> None:
    down = Api(isolated_channel, api_key)
    c = draft(down, [slow_chip(down, live)], contacts=5)
    before = snapshot(engine, api_key)
    f = fails(down.start, c.id)
    assert f.code == grpc.StatusCode.UNAVAILABLE, f  # not DEADLINE_EXCEEDED: the dispatcher's own deadline ended it
    after = snapshot(engine, api_key)
    assert strip(after) == strip(before)
    assert after["messages"] == [] and after["user"]["credits"] == before["user"]["credits"]  # type: ignore[index]
    got = down.get(c.id)
    assert got.state == res.CAMPAIGN_STATE_DRAFT and got.etag == c.etag and not got.HasField("start_time")


def test_pause_and_cancel_with_dispatcher_unreachable_roll_back(
        isolated_channel: grpc.Channel, api: Api, api_key: str, engine: sa.Engine, live: str) -> None:
    c = running(api, live, contacts=4)  # started through the healthy server
    down = Api(isolated_channel, api_key)
    cols = ("state", "state_reason", "version", "dispatch_epoch", "completed_at", "updated_at")
    pick = lambda: {k: v for k, v in (row(engine, "campaigns", c.id) or {}).items() if k in cols}  # noqa: E731
    before = pick()
    credits = snapshot(engine, api_key)["user"]["credits"]  # type: ignore[index]
    for op in (down.pause, down.cancel):
        f = fails(op, c.id)
        assert f.code == grpc.StatusCode.UNAVAILABLE, f
    assert pick() == before
    assert snapshot(engine, api_key)["user"]["credits"] == credits  # type: ignore[index]
    assert count(engine, "SELECT count(*) FROM campaign_messages WHERE campaign_id = :c"
                 " AND failure_reason = 'cancelled by user'", c=c.id) == 0
    assert down.get(c.id).state == res.CAMPAIGN_STATE_RUNNING
    assert api.cancel(c.id).state == res.CAMPAIGN_STATE_CANCELLED


def test_server_drains_on_sigterm(stack_env: dict[str, str], workdir: Path) -> None:
    port = free_port()
    proc = ServiceProcess("campaign-drain", "campaign_service.server", [],
                          {**stack_env, "CAMPAIGN_LISTEN": f"127.0.0.1:{port}"}, workdir / "logs", port=port).start()
    try:
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=20) == 0
        assert "draining" in proc.tail()
    finally:
        proc.stop()
