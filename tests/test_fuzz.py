"""Fuzz every public RPC of campaign_service with requests generated from the protobuf descriptors
the server itself publishes (reflection), so a new service or method is fuzzed the day it lands.

For every call: the status is a documented one (never UNKNOWN, INTERNAL, UNIMPLEMENTED or
DATA_LOSS), the server stays healthy, and a failed call leaves the caller's data as it was. A
bounded profile runs in `make test`; `make fuzz` runs a long one (WHAGO_FUZZ_EXAMPLES per method).
The WAHA webhook receiver gets the same treatment over HTTP: never a 5xx, nothing changed."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SANDBOX_API_KEY, WEBHOOK_HMAC_KEY
from tests.fuzz import messages
from tests.helpers import Ops, phones, user_id

EXAMPLES = int(os.environ.get("WHAGO_FUZZ_EXAMPLES", "8"))
INTERNAL = {"whago.campaign.v1.DeliveryService"}
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED,
         grpc.StatusCode.DATA_LOSS}
#: A failed call with one of these may still have been applied by the server (the client gave up first).
UNDECIDED = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

_FINGERPRINT = sa.text("""
    SELECT (SELECT count(*) FROM campaigns WHERE user_id = :u),
           (SELECT coalesce(sum(version), 0) FROM campaigns WHERE user_id = :u AND state IN (1, 2)),
           (SELECT count(*) FROM chips WHERE user_id = :u),
           (SELECT count(*) FROM campaign_contacts ct JOIN campaigns c ON c.id = ct.campaign_id WHERE c.user_id = :u),
           (SELECT count(*) FROM webhook_endpoints WHERE user_id = :u),
           (SELECT coalesce(sum(version), 0) FROM webhook_endpoints WHERE user_id = :u),
           (SELECT count(*) FROM idempotency_keys WHERE user_id = :u),
           (SELECT count(*) FROM audit_log WHERE user_id = :u AND actor = :actor)""")


@dataclass
class Target:
    channel: grpc.Channel
    md: tuple[tuple[str, str], ...]
    pool: descriptor_pool.DescriptorPool
    methods: list[MethodDescriptor]
    ids: list[str]
    engine: sa.Engine
    user: uuid.UUID

    def settled(self) -> tuple[Any, ...]:
        """The fingerprint once it stopped moving: a call the client gave up on (1 ms deadline) may
        still be committing on the server, and must not be blamed on the next one."""
        last = self.fingerprint()
        for _ in range(40):
            time.sleep(0.025)
            now = self.fingerprint()
            if now == last:
                return now
            last = now
        return last

    def fingerprint(self) -> tuple[Any, ...]:
        with self.engine.connect() as conn:
            return tuple(conn.execute(_FINGERPRINT, {"u": self.user, "actor": f"user:{self.user}"}).one())


@pytest.fixture(scope="module")
def target(stack: dict[str, Any], campaign_channel: grpc.Channel, create_user: Any, sandbox_url: str,
           database_url: str) -> Iterator[Target]:
    key = create_user()
    api = Ops(campaign_channel, key)
    chip = api.chip(sandbox_url, SANDBOX_API_KEY, interval=(3600, 3600))
    camp = api.campaign([chip], interval=(3600, 3600))
    api.import_phones(camp.id, phones(3, start=8000))
    draft = api.campaign([chip])
    db = ProtoReflectionDescriptorDatabase(campaign_channel)
    pool = descriptor_pool.DescriptorPool(db)
    methods = []
    for name in db.get_services():
        if name.startswith("whago.") and name not in INTERNAL:
            methods.extend(pool.FindServiceByName(name).methods)
    engine = sa.create_engine(database_url, pool_size=2)
    yield Target(campaign_channel, tuple(api.md), pool, methods, [camp.id, draft.id, chip.id, str(uuid.uuid4())],
                 engine, user_id(engine, key))
    engine.dispose()


def _call(t: Target, m: MethodDescriptor, request: Message, timeout: float) -> grpc.StatusCode:
    path = f"/{m.containing_service.full_name}/{m.name}"
    out_cls = message_factory.GetMessageClass(m.output_type)
    ser, de = (lambda x: x.SerializeToString()), out_cls.FromString
    try:
        if m.client_streaming:
            t.channel.stream_unary(path, ser, de)(iter([request, request]), metadata=t.md, timeout=timeout)
        elif m.server_streaming:
            for _ in t.channel.unary_stream(path, ser, de)(request, metadata=t.md, timeout=timeout):
                break  # the first message is enough; leaving cancels the call
        else:
            t.channel.unary_unary(path, ser, de)(request, metadata=t.md, timeout=timeout)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _fuzz_method(t: Target, m: MethodDescriptor, seen: dict[str, int], codes: dict[str, int],
                 failures: list[str]) -> None:
    key = f"{m.containing_service.name}.{m.name}"

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=messages(m.input_type, t.ids), timeout=st.sampled_from([10.0] * 7 + [0.001]))
    def one(request: Message, timeout: float) -> None:
        before = t.settled()
        code = _call(t, m, request, 3.0 if m.server_streaming and timeout > 1 else timeout)
        seen[key] = seen.get(key, 0) + 1
        codes[code.name] = codes.get(code.name, 0) + 1
        if code in NEVER:
            failures.append(f"{key}: {code.name} for {request!r:.300}")
        elif code not in UNDECIDED and code != grpc.StatusCode.OK:
            after = t.fingerprint()
            if after != before:
                failures.append(f"{key}: {code.name} but data changed {before} -> {after} for {request!r:.300}")

    one()


def test_every_public_rpc_answers_a_documented_status_and_writes_nothing_when_it_fails(target: Target) -> None:
    names = {f"{m.containing_service.name}.{m.name}" for m in target.methods}
    assert {"CampaignService.CreateCampaign", "CampaignService.WatchCampaign", "ChipService.RegisterChip",
            "WebhookService.CreateWebhookEndpoint", "AuditService.ListAuditEvents"} <= names
    seen: dict[str, int] = {}
    codes: dict[str, int] = {}
    failures: list[str] = []
    for m in target.methods:
        _fuzz_method(target, m, seen, codes, failures)
    health = health_pb2_grpc.HealthStub(target.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    total = sum(seen.values())
    print(f"\nfuzz: {total} calls over {len(seen)} methods ({EXAMPLES} examples each): {codes}")
    assert not failures, "\n".join(failures[:20])
    assert len(seen) == len(target.methods)


def _post(port: int, body: bytes, sign: bool, content_type: str = "application/json") -> int:
    headers = {"Content-Type": content_type}
    if sign:
        headers["X-Webhook-Hmac"] = hmac.new(WEBHOOK_HMAC_KEY.encode(), body, hashlib.sha512).hexdigest()
        headers["X-Webhook-Hmac-Algorithm"] = "sha512"
    req = urllib.request.Request(f"http://127.0.0.1:{port}/waha/webhook", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)
_events = st.fixed_dictionaries({
    "event": st.sampled_from(["message.ack", "message", "session.status", "unknown.event", ""]),
    "session": st.text(max_size=10),
    "payload": st.one_of(_json_values, st.fixed_dictionaries({
        "id": st.text(max_size=40), "ack": st.one_of(st.integers(-3, 10), st.text(max_size=5)),
        "ackName": st.sampled_from(["DEVICE", "READ", "PLAYED", "x"]), "from": st.text(max_size=20)})),
}, optional={"engine": st.text(max_size=5), "me": _json_values})


def test_waha_webhook_receiver_never_answers_5xx(stack: dict[str, Any], ports: dict[str, int]) -> None:
    port = ports["webhooks"]
    codes: dict[int, int] = {}

    @settings(max_examples=EXAMPLES * 8, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.one_of(_events.map(lambda e: json.dumps(e).encode()), st.binary(max_size=200),
                          st.text(max_size=50).map(str.encode)),
           sign=st.booleans())
    def one(body: bytes, sign: bool) -> None:
        code = _post(port, body, sign)
        codes[code] = codes.get(code, 0) + 1
        assert code < 500, (code, body[:200])
        if not sign:
            assert code in (400, 401, 403), code  # unsigned: refused before anything is read

    one()
    huge = _post(port, b"{" + b'"x":' * 10 + b'"' + b"a" * (8 * 1024 * 1024) + b'"}', True)
    assert 400 <= huge < 500
    print(f"\nwebhook fuzz: answers {codes}")
