"""The dispatcher's WAHA client against the WAHA sandbox (which follows WAHA's OpenAPI spec)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from dispatcher_service.waha.client import (
    ChipRestricted,
    MessageRejected,
    SessionNotWorking,
    WahaClient,
    WahaError,
    WahaServerError,
    WahaTimeout,
)
from dispatcher_service.waha.transport import HttpClient
from tests.conftest import SANDBOX_API_KEY
from waha_sandbox.control import SandboxControl

T = TypeVar("T")
CHAT = "5511987654321@c.us"


def run(url: str, fn: Callable[[WahaClient], Awaitable[T]], key: str = SANDBOX_API_KEY, timeout: float = 5.0) -> T:
    async def main() -> T:
        http = HttpClient(timeout, limit=10)
        try:
            return await fn(WahaClient(http, url, key, timeout))
        finally:
            await http.close()
    return asyncio.run(main())


@pytest.fixture()
def session(control: SandboxControl) -> str:
    name = "disp-" + uuid.uuid4().hex[:8]
    control.set_session(name, status="WORKING")
    return name


def test_send_text_with_a_pre_chosen_id_is_201_and_the_id_is_honoured(
        sandbox_url: str, control: SandboxControl, session: str) -> None:
    async def go(w: WahaClient) -> tuple[str, dict[str, object], dict[str, object] | None, dict[str, object] | None]:
        info = await w.get_session(session)
        assert info["status"] == "WORKING"
        mid = await w.new_message_id(session)
        sent = await w.send_text(session, CHAT, "olá", mid)
        by_short = await w.get_message(session, CHAT, mid)
        by_full = await w.get_message(session, CHAT, str(sent["id"]))
        return mid, sent, by_short, by_full

    mid, sent, by_short, by_full = run(sandbox_url, go)
    assert str(sent["id"]).endswith(mid)
    assert by_short is not None and by_full is not None
    reqs = control.requests(session=session, path="/api/sendText")
    assert len(reqs) == 1 and reqs[0]["status"] == 201
    msgs = control.messages(session=session)
    assert [m["short_id"] for m in msgs] == [mid]


def test_unknown_message_is_none(sandbox_url: str, session: str) -> None:
    async def go(w: WahaClient) -> object:
        return await w.get_message(session, CHAT, "3EB0" + uuid.uuid4().hex[:16].upper())

    assert run(sandbox_url, go) is None


def test_camouflage_endpoints_and_check_exists(sandbox_url: str, control: SandboxControl, session: str) -> None:
    control.configure(nonexistent_numbers=["5511900000001"])

    async def go(w: WahaClient) -> tuple[bool, bool]:
        await w.send_seen(session, CHAT)
        await w.start_typing(session, CHAT)
        await w.stop_typing(session, CHAT)
        return await w.check_exists(session, "5511987654321"), await w.check_exists(session, "5511900000001")

    yes, no = run(sandbox_url, go)
    assert yes and not no
    paths = [r["path"] for r in control.requests(session=session)]
    assert paths[:3] == ["/api/sendSeen", "/api/startTyping", "/api/stopTyping"]
    assert all(r["status"] in (200, 201) for r in control.requests(session=session))


def test_media_goes_to_the_endpoint_of_its_type(sandbox_url: str, control: SandboxControl, session: str) -> None:
    data = base64.b64encode(b"\x89PNG fake").decode()

    async def go(w: WahaClient) -> None:
        await w.send_media(session, CHAT, "a.png", "image/png", data, "caption")
        await w.send_media(session, CHAT, "a.pdf", "application/pdf", data, "doc")
        await w.send_media(session, CHAT, "a.mp4", "video/mp4", data, "vid")
        await w.send_media(session, CHAT, "a.ogg", "audio/ogg", data)

    run(sandbox_url, go)
    sends = control.sends(session=session)
    assert [s["path"] for s in sends] == ["/api/sendImage", "/api/sendFile", "/api/sendVideo", "/api/sendVoice"]


def test_422_when_the_session_is_not_working(sandbox_url: str, control: SandboxControl, session: str) -> None:
    control.set_session(session, status="STARTING")

    async def go(w: WahaClient) -> None:
        await w.send_text(session, CHAT, "hi")

    with pytest.raises(SessionNotWorking) as e:
        run(sandbox_url, go)
    assert e.value.status == 422


def test_restricted_number_is_chip_restricted(sandbox_url: str, control: SandboxControl, session: str) -> None:
    control.set_session(session, fail_next=[{"status": 500, "error": 463}])

    async def go(w: WahaClient) -> None:
        await w.send_text(session, CHAT, "hi")

    with pytest.raises(ChipRestricted) as e:
        run(sandbox_url, go)
    assert e.value.status == 500 and "463" in e.value.body


def test_400_is_message_rejected_and_other_500_is_server_error(
        sandbox_url: str, control: SandboxControl, session: str) -> None:
    control.set_session(session, fail_next=[{"status": 400}, {"status": 503}])

    async def go(w: WahaClient) -> list[type[WahaError]]:
        out: list[type[WahaError]] = []
        for _ in range(2):
            try:
                await w.send_text(session, CHAT, "hi")
            except WahaError as e:
                out.append(type(e))
        return out

    assert run(sandbox_url, go) == [MessageRejected, WahaServerError]


def test_404_for_an_unknown_session_is_message_rejected(sandbox_url: str, control: SandboxControl) -> None:
    control.configure(auto_create_sessions=False)

    async def go(w: WahaClient) -> None:
        await w.send_text("no-such-" + uuid.uuid4().hex[:6], CHAT, "hi")

    try:
        with pytest.raises(MessageRejected) as e:
            run(sandbox_url, go)
        assert e.value.status == 404
    finally:
        control.configure(auto_create_sessions=True)


def test_timeout_is_uncertain_and_the_message_can_be_looked_up(
        sandbox_url: str, control: SandboxControl, session: str) -> None:
    control.set_session(session, timeout_next=1)

    async def go(w: WahaClient) -> tuple[bool, object]:
        mid = await w.new_message_id(session)
        timed_out = False
        try:
            await w.send_text(session, CHAT, "maybe", mid)
        except WahaTimeout:
            timed_out = True
        await asyncio.sleep(0.2)
        return timed_out, await w.get_message(session, CHAT, mid)

    timed_out, found = run(sandbox_url, go, timeout=1.0)
    assert timed_out
    assert found is not None  # the sandbox delivered before hanging: a blind resend would duplicate


def test_wrong_api_key_is_an_error(sandbox_url: str, session: str) -> None:
    async def go(w: WahaClient) -> None:
        await w.get_session(session)

    with pytest.raises(WahaError) as e:
        run(sandbox_url, go, key="wrong")
    assert e.value.status == 401
