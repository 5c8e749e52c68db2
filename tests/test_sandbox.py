"""The WAHA sandbox answers like WAHA (per WAHA's OpenAPI spec) and its faults and request log work.

Every other end-to-end test trusts the sandbox's record of what "WAHA" received, so it is tested
on its own here, as a real subprocess on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devstack.procs import REPO
from devstack.servers import free_port, wait_port
from tests.conftest import SANDBOX_API_KEY
from tests.helpers import wait_for
from waha_sandbox.control import SandboxControl
from waha_sandbox.spec import SCHEMAS_PATH, extract_subset, load_validator

SPEC_PATH = REPO.parent / "shared" / "waha" / "openapi.json"
CHAT = "5511999990001@c.us"


@pytest.fixture()
def ctl(sandbox_url: str) -> Iterator[SandboxControl]:
    """A control client on a freshly reset sandbox (reset again after, to leave it clean)."""
    control = SandboxControl(sandbox_url)
    control.reset()
    yield control
    control.reset()


def call(base: str, method: str, path: str, body: Any = None, key: str | None = SANDBOX_API_KEY,
         timeout: float = 10.0) -> tuple[int, Any]:
    """One WAHA API call; returns (status, parsed JSON body)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-Api-Key"] = key
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def text(session: str, chat: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"chatId": chat, "text": "Olá!", "session": session, **extra}


def test_api_key_required(sandbox_url: str, ctl: SandboxControl) -> None:
    assert call(sandbox_url, "GET", "/api/sessions/s-auth", key=None)[0] == 401
    status, body = call(sandbox_url, "POST", "/api/sendText", text("s-auth"), key="wrong")
    assert (status, body) == (401, {"message": "Unauthorized", "statusCode": 401})
    assert call(sandbox_url, "GET", "/api/sessions/s-auth")[0] == 200
    assert ctl.messages() == []
    assert [r["status"] for r in ctl.requests()] == [401, 401, 200]


def test_session_info_shape(sandbox_url: str, ctl: SandboxControl) -> None:
    status, body = call(sandbox_url, "GET", "/api/sessions/any-name")
    assert status == 200
    assert body["name"] == "any-name" and body["status"] == "WORKING"
    assert body["me"]["id"].endswith("@c.us")
    assert load_validator().validate("SessionInfo", body, allow_null=True) == []


def test_send_text_201_with_waha_message(sandbox_url: str, ctl: SandboxControl) -> None:
    status, body = call(sandbox_url, "POST", "/api/sendText", text("s-text", linkPreview=False))
    assert status == 201
    assert load_validator().validate("WAMessage", body, allow_null=True) == []
    assert body["id"].startswith(f"true_{CHAT}_")
    assert body["fromMe"] is True and body["to"] == CHAT and body["body"] == "Olá!"
    (msg,) = ctl.messages()
    assert (msg["id"], msg["session"], msg["chatId"], msg["text"]) == (body["id"], "s-text", CHAT, "Olá!")
    (sent,) = ctl.sends()
    assert sent["message_id"] == body["id"] and sent["chat_id"] == CHAT


def test_invalid_bodies_are_400(sandbox_url: str, ctl: SandboxControl) -> None:
    status, body = call(sandbox_url, "POST", "/api/sendText", {"text": "x", "session": "s-bad"})
    assert status == 400
    assert body["statusCode"] == 400 and "chatId should not be empty" in body["message"]
    status, body = call(sandbox_url, "POST", "/api/sendText", {"chatId": CHAT, "text": 5, "session": "s-bad"})
    assert status == 400 and body["message"] == ["text must be a string"]
    status, body = call(sandbox_url, "POST", "/api/sendImage",
                        {"chatId": CHAT, "session": "s-bad", "file": {"url": "http://x/a.png"}})
    assert status == 400 and "file.mimetype should not be empty" in body["message"]
    assert call(sandbox_url, "POST", "/api/startTyping", {"session": "s-bad"})[0] == 400
    assert ctl.messages() == [] and ctl.sends() == []


def test_media_seen_and_typing(sandbox_url: str, ctl: SandboxControl) -> None:
    s = "s-media"
    image: dict[str, Any] = {"chatId": CHAT, "session": s, "caption": "pic",
             "file": {"mimetype": "image/jpeg", "filename": "a.jpg", "url": "http://127.0.0.1/a.jpg"}}
    doc: dict[str, Any] = {"chatId": CHAT, "session": s, "file": {"mimetype": "application/pdf", "filename": "a.pdf",
                                                  "data": "JVBERi0="}}
    voice: dict[str, Any] = {"chatId": CHAT, "session": s, "convert": False,
             "file": {"mimetype": "audio/ogg; codecs=opus", "url": "http://127.0.0.1/v.opus"}}
    video: dict[str, Any] = {"chatId": CHAT, "session": s, "convert": False,
             "file": {"mimetype": "video/mp4", "filename": "v.mp4", "url": "http://127.0.0.1/v.mp4"}}
    for path, body in [("/api/sendImage", image), ("/api/sendFile", doc), ("/api/sendVoice", voice),
                       ("/api/sendVideo", video)]:
        status, resp = call(sandbox_url, "POST", path, body)
        assert status == 201, (path, resp)
        assert resp["hasMedia"] is True and resp["media"]["mimetype"] == body["file"]["mimetype"]
    assert [m["type"] for m in ctl.messages()] == ["image", "file", "voice", "video"]
    assert ctl.messages()[0]["text"] == "pic"
    assert call(sandbox_url, "POST", "/api/sendSeen", {"chatId": CHAT, "session": s}) == (201, {})
    assert call(sandbox_url, "POST", "/api/startTyping", {"chatId": CHAT, "session": s})[0] == 201
    assert call(sandbox_url, "POST", "/api/stopTyping", {"chatId": CHAT, "session": s})[0] == 201
    assert len(ctl.sends(session=s)) == 4  # seen/typing are not sends


def test_session_not_working_is_422(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.set_session("s-stopped", status="STOPPED")
    status, body = call(sandbox_url, "POST", "/api/sendText", text("s-stopped"))
    assert status == 422
    assert body == {"error": "Session status is not as expected. Try again later or restart the session",
                    "session": "s-stopped", "status": "STOPPED", "expected": ["WORKING"]}
    for path in ("/api/startTyping", "/api/stopTyping", "/api/sendSeen"):
        assert call(sandbox_url, "POST", path, {"chatId": CHAT, "session": "s-stopped"})[0] == 422
    status, info = call(sandbox_url, "GET", "/api/sessions/s-stopped")
    assert status == 200 and info["status"] == "STOPPED" and info["me"] is None
    assert ctl.messages() == []
    ctl.set_session("s-stopped", status="WORKING")
    assert call(sandbox_url, "POST", "/api/sendText", text("s-stopped"))[0] == 201


def test_restricted_chip_is_500_with_463(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.set_session("s-banned", restricted=True)
    status, body = call(sandbox_url, "POST", "/api/sendText", text("s-banned"))
    assert status == 500
    assert body["statusCode"] == 500
    assert body["exception"]["message"] == "2 UNKNOWN: server returned error 463"
    assert "463" in body["exception"]["details"]
    assert ctl.messages() == [] and ctl.sends() == []
    assert call(sandbox_url, "GET", "/api/sessions/s-banned")[1]["status"] == "WORKING"


def test_chosen_id_is_honoured_and_duplicates_detected(sandbox_url: str, ctl: SandboxControl) -> None:
    status, new = call(sandbox_url, "GET", "/api/s-dup/new-message-id")
    assert status == 200 and set(new) == {"id"} and len(new["id"]) >= 16
    first = call(sandbox_url, "POST", "/api/sendText", text("s-dup", id=new["id"]))
    second = call(sandbox_url, "POST", "/api/sendText", text("s-dup", id=new["id"], text="again"))
    assert first[0] == second[0] == 201
    assert first[1]["id"] == f"true_{CHAT}_{new['id']}"
    assert second[1] == first[1]  # the original message, not a new one
    assert len(ctl.messages()) == 1 and len(ctl.sends()) == 1
    log = ctl.requests(path="/api/sendText")
    assert [r["duplicate"] for r in log] == [False, True]
    assert {r["message_id"] for r in log} == {first[1]["id"]}
    # the same id on another session is another sender's message
    assert call(sandbox_url, "POST", "/api/sendText", text("s-dup-2", id=new["id"]))[0] == 201
    assert len(ctl.messages()) == 2


def test_server_version_names_the_engine_and_one_not_keeping_chosen_ids_ignores_them(
        sandbox_url: str, ctl: SandboxControl) -> None:
    from waha_sandbox.control import SandboxError

    status, env = call(sandbox_url, "GET", "/api/server/version")
    assert status == 200 and env["engine"] == "GOWS"
    assert load_validator().validate("WAHAEnvironment", env, allow_null=True) == []
    chosen = "3EB0" + "A1" * 9
    ctl.configure(engine="WEBJS")  # whatsapp-web.js: sendText takes no pre-chosen id
    assert call(sandbox_url, "GET", "/api/server/version")[1]["engine"] == "WEBJS"
    status, sent = call(sandbox_url, "POST", "/api/sendText", text("s-webjs", id=chosen))
    assert status == 201 and chosen not in sent["id"]
    assert call(sandbox_url, "GET", f"/api/s-webjs/chats/{CHAT}/messages/true_{CHAT}_{chosen}")[0] == 404
    with pytest.raises(SandboxError):
        ctl.configure(engine="TELEGRAM")
    ctl.reset()
    assert call(sandbox_url, "GET", "/api/server/version")[1]["engine"] == "GOWS"


class _Receiver:
    """A loopback HTTP endpoint recording what is POSTed to it (the webhook consumer)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.posts: list[tuple[dict[str, str], bytes]] = []
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_sent_messages_get_signed_message_ack_webhooks_delivered_then_read(
        sandbox_url: str, ctl: SandboxControl) -> None:
    import hashlib
    import hmac
    import re

    rx = _Receiver()
    try:
        ctl.configure(webhooks=[{"url": rx.url, "events": ["message.ack"], "hmac": {"key": "s3cret"}}],
                      acks={"delivered_after_ms": 50, "read_after_ms": 150, "read_rate": 1.0})
        sent = [call(sandbox_url, "POST", "/api/sendText", text("s-acks", chat=f"55119000000{i}@c.us"))[1]["id"]
                for i in range(2)]
        deadline = time.monotonic() + 10
        while len(rx.posts) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        events = [(h, json.loads(b)) for h, b in rx.posts]
        assert len(events) == 4
        for headers, body in zip((h for h, _ in rx.posts), (b for _, b in rx.posts), strict=True):
            assert headers["x-webhook-hmac-algorithm"] == "sha512"
            assert hmac.compare_digest(headers["x-webhook-hmac"],
                                       hmac.new(b"s3cret", body, hashlib.sha512).hexdigest())
        for _, e in events:
            assert e["event"] == "message.ack" and e["session"] == "s-acks"
            assert re.fullmatch(r"evt_[0-9a-z]{26}", e["id"])
            p = e["payload"]
            assert p["fromMe"] is True and p["ackName"] == {2: "DEVICE", 3: "READ"}[p["ack"]] and p["to"] in p["id"]
        by_message = {mid: [e["payload"]["ack"] for _, e in events if e["payload"]["id"] == mid] for mid in sent}
        assert by_message == {sent[0]: [2, 3], sent[1]: [2, 3]}
        # The receiver has the 4th post before the sandbox has read its answer: wait for the log.
        wait_for(lambda: {w["status"] for w in ctl.webhooks()} == {200}, 10,
                 lambda: f"every webhook delivery logged as 200: {ctl.webhooks()}")
        # A reset drops the webhooks and the receipts still scheduled.
        ctl.configure(acks={"delivered_after_ms": 300})
        call(sandbox_url, "POST", "/api/sendText", text("s-acks"))
        ctl.reset()
        time.sleep(0.6)
        assert len(rx.posts) == 4 and ctl.config()["webhooks"] == []
    finally:
        rx.close()


def test_get_message_by_id(sandbox_url: str, ctl: SandboxControl) -> None:
    _, sent = call(sandbox_url, "POST", "/api/sendText", text("s-get", id="3EB0AAAABBBBCCCCDDDD"))
    status, got = call(sandbox_url, "GET", f"/api/s-get/chats/{CHAT}/messages/{sent['id']}")
    assert status == 200 and got["id"] == sent["id"] and got["body"] == "Olá!"
    assert call(sandbox_url, "GET", f"/api/s-get/chats/{CHAT}/messages/true_{CHAT}_3EB0FFFF")[0] == 404
    assert call(sandbox_url, "GET", f"/api/s-get/chats/5500000000000@c.us/messages/{sent['id']}")[0] == 404
    assert call(sandbox_url, "GET", f"/api/other/chats/{CHAT}/messages/{sent['id']}")[0] == 404
    status, body = call(sandbox_url, "GET", f"/api/s-get/chats/{CHAT}/messages/nothing")
    assert (status, body["message"]) == (404, "Message not found")


def test_check_exists(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.configure(nonexistent_numbers=["+55 11 99999-0002"])
    status, body = call(sandbox_url, "GET", "/api/contacts/check-exists?phone=5511999990002&session=s-ce")
    assert (status, body) == (200, {"numberExists": False})
    status, body = call(sandbox_url, "GET", "/api/contacts/check-exists?phone=5511999990003&session=s-ce")
    assert (status, body) == (200, {"numberExists": True, "chatId": "5511999990003@c.us"})
    assert load_validator().validate("WANumberExistResult", body) == []
    assert call(sandbox_url, "GET", "/api/contacts/check-exists?session=s-ce")[0] == 400


def test_request_log_and_filters(sandbox_url: str, ctl: SandboxControl) -> None:
    t0 = time.time()
    call(sandbox_url, "POST", "/api/sendSeen", {"chatId": CHAT, "session": "s-log-a"})
    call(sandbox_url, "POST", "/api/sendText", text("s-log-a"))
    t1 = time.time()
    call(sandbox_url, "POST", "/api/sendText", text("s-log-b", chat="5511999990009@c.us"))
    log = ctl.requests()
    assert [(r["method"], r["path"], r["session"], r["status"]) for r in log] == [
        ("POST", "/api/sendSeen", "s-log-a", 201),
        ("POST", "/api/sendText", "s-log-a", 201),
        ("POST", "/api/sendText", "s-log-b", 201),
    ]
    for r in log:
        assert t0 <= r["ts"] <= r["ts_done"] and r["chat_id"] and r["body"]["session"] == r["session"]
    assert [r["session"] for r in ctl.requests(since=t1)] == ["s-log-b"]
    assert len(ctl.requests(session="s-log-a")) == 2
    assert len(ctl.requests(path="sendSeen")) == 1
    assert [r["session"] for r in ctl.sends(session="s-log-b")] == ["s-log-b"]
    assert ctl.sends(since=time.time()) == []
    assert log[2]["chat_id"] == "5511999990009@c.us" and log[2]["message_id"].startswith("true_")


def test_fail_next_and_path_faults(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.set_session("s-fail", fail_next=[{"status": 500, "count": 2}])
    # typing is not a send: the default fault scope leaves it alone
    assert call(sandbox_url, "POST", "/api/startTyping", {"chatId": CHAT, "session": "s-fail"})[0] == 201
    statuses = [call(sandbox_url, "POST", "/api/sendText", text("s-fail"))[0] for _ in range(3)]
    assert statuses == [500, 500, 201]
    assert len(ctl.messages()) == 1
    ctl.set_session("s-fail", fail_next=[{"status": 503, "path": "/api/startTyping"},
                                         {"status": 500, "error": 463}])
    assert call(sandbox_url, "POST", "/api/startTyping", {"chatId": CHAT, "session": "s-fail"})[0] == 503
    status, body = call(sandbox_url, "POST", "/api/sendText", text("s-fail"))
    assert status == 500 and "463" in body["exception"]["message"]
    assert call(sandbox_url, "POST", "/api/sendText", text("s-fail"))[0] == 201
    assert ctl.config()["sessions"]["s-fail"]["fail_next"] == []


def test_fail_rate(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.configure(seed=7, sessions={"s-rate": {"fail_rate": 0.5}})
    statuses = [call(sandbox_url, "POST", "/api/sendText", text("s-rate"))[0] for _ in range(40)]
    assert set(statuses) == {201, 500} and 5 < statuses.count(500) < 35
    assert len(ctl.messages()) == statuses.count(201)


def test_timeout_delivers_then_hangs(sandbox_url: str, ctl: SandboxControl) -> None:
    """The at-most-once case: the client gives up, yet WAHA did send; looking it up tells."""
    ctl.configure(timeout_next=1, timeout_seconds=3)
    with pytest.raises(TimeoutError):
        call(sandbox_url, "POST", "/api/sendText", text("s-tmo", id="3EB0TIMEOUT0001"), timeout=0.5)
    assert call(sandbox_url, "GET", f"/api/s-tmo/chats/{CHAT}/messages/3EB0TIMEOUT0001")[0] == 200
    assert call(sandbox_url, "POST", "/api/sendText", text("s-tmo"), timeout=2)[0] == 201  # only one hang
    ctl.set_session("s-tmo2", fail_next=[{"timeout": True, "deliver": False}])
    with pytest.raises(TimeoutError):
        call(sandbox_url, "POST", "/api/sendText", text("s-tmo2", id="3EB0TIMEOUT0002"), timeout=0.5)
    assert call(sandbox_url, "GET", f"/api/s-tmo2/chats/{CHAT}/messages/3EB0TIMEOUT0002")[0] == 404


def test_latency(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.set_session("s-slow", latency_ms=300)
    t = time.monotonic()
    assert call(sandbox_url, "POST", "/api/sendText", text("s-slow"))[0] == 201
    assert time.monotonic() - t >= 0.3
    (r,) = ctl.requests(session="s-slow")
    assert r["ts_done"] - r["ts"] >= 0.29
    call(sandbox_url, "POST", "/api/sendText", text("s-fast"))
    sessions = ctl.config()["sessions"]
    assert sessions["s-slow"]["latency_ms"] == 300 and sessions["s-fast"]["latency_ms"] is None  # that session's only


def test_unknown_session_when_auto_create_off(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.configure(auto_create_sessions=False, sessions={"known": {}})
    status, body = call(sandbox_url, "POST", "/api/sendText", text("unknown"))
    assert status == 404 and "We didn't find a session with name 'unknown'" in body["message"]
    assert call(sandbox_url, "POST", "/api/sendText", text("known"))[0] == 201
    status, body = call(sandbox_url, "GET", "/api/sessions/unknown")
    assert (status, body["message"]) == (404, "Session not found")


def test_bad_control_config_is_refused(sandbox_url: str, ctl: SandboxControl) -> None:
    from waha_sandbox.control import SandboxError

    with pytest.raises(SandboxError):
        ctl.set_session("x", status="SLEEPING")
    with pytest.raises(SandboxError):
        ctl.configure(no_such_key=1)
    with pytest.raises(SandboxError):
        ctl.set_session("x", fail_next=[{"status": 500, "cnt": 2}])
    with pytest.raises(SandboxError):
        ctl.configure(webhooks=[{"url": "ftp://x", "events": ["message.ack"]}])
    with pytest.raises(SandboxError):
        ctl.configure(acks={"read_rate": 2})


def test_reset_clears_everything(sandbox_url: str, ctl: SandboxControl) -> None:
    ctl.set_session("s-reset", status="FAILED")
    call(sandbox_url, "POST", "/api/sendText", text("s-other"))
    ctl.reset()
    assert ctl.requests() == [] and ctl.messages() == [] and ctl.config()["sessions"] == {}
    assert call(sandbox_url, "GET", "/api/sessions/s-reset")[1]["status"] == "WORKING"


def test_thousand_concurrent_sends(sandbox_url: str, ctl: SandboxControl) -> None:
    async def run() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def one(i: int) -> int:
                async with http.post(f"{sandbox_url}/api/sendText", headers={"X-Api-Key": SANDBOX_API_KEY},
                                     json=text(f"s-load-{i % 10}", chat=f"55119{i:08d}@c.us")) as resp:
                    await resp.read()
                    return resp.status

            return await asyncio.gather(*(one(i) for i in range(1000)))

    assert set(asyncio.run(run())) == {201}
    assert len(ctl.sends()) == 1000
    assert len({m["id"] for m in ctl.messages()}) == 1000
    assert len(ctl.sends(session="s-load-3")) == 100


@pytest.mark.skipif(not SPEC_PATH.exists(), reason="the shared WAHA spec is not beside this checkout "
                    "(CI has it at ../shared/waha/openapi.json)")
def test_bundled_schemas_are_the_spec(tmp_path: Path) -> None:
    """waha_sandbox/schemas.json is WAHA's spec, not a hand-edited copy."""
    raw = SPEC_PATH.read_bytes()
    assert json.loads(SCHEMAS_PATH.read_text()) == extract_subset(json.loads(raw), raw)


def test_sigterm_stops_gracefully_even_while_hanging(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "waha_sandbox", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 15)
        base = f"http://127.0.0.1:{port}"
        SandboxControl(base).configure(timeout_next=1)
        with pytest.raises(TimeoutError):  # no --api-key: auth is off, like WAHA without a key
            call(base, "POST", "/api/sendText", text("s"), key=None, timeout=0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0  # TimeoutExpired if the hang held the stop back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
