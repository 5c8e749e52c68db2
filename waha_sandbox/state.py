"""The sandbox's in-memory state: sessions (chips), injected faults, sent messages, request log."""

from __future__ import annotations

import bisect
import random
import re
import zlib
from dataclasses import dataclass, field

from waha_sandbox.spec import ENGINES, SEND_ENDPOINTS, SESSION_STATUSES
from waha_sandbox.validator import Json, SchemaValidator
from waha_sandbox.webhooks import AckWebhooks


@dataclass
class Fault:
    """One injected failure rule, consumed ``count`` times by matching requests."""

    status: int = 500
    count: int = 1
    path: str | None = None  # substring of the request path; None = the send endpoints
    error: int | None = None  # 463 -> WhatsApp "restricted" error body
    body: Json | None = None  # a custom response body
    timeout: bool = False  # hang instead of answering
    reset: bool = False  # close the connection (TCP RST) instead of answering
    deliver: bool = True  # for timeouts and resets: the message is delivered first

    @classmethod
    def parse(cls, raw: Json) -> Fault:
        fields = ("status", "count", "path", "error", "body", "timeout", "reset", "deliver")
        unknown = set(raw) - set(fields)
        if unknown:
            raise ValueError(f"unknown fault option(s) {sorted(unknown)}")
        fault = cls(**{k: raw[k] for k in fields if k in raw})
        if fault.count < 1 or not 100 <= fault.status <= 599:
            raise ValueError(f"bad fault {raw!r}")
        return fault

    def matches(self, path: str) -> bool:
        return path in SEND_ENDPOINTS if self.path is None else self.path in path

    def as_json(self) -> Json:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Session:
    """A WAHA session (one chip) and the faults configured for it."""

    name: str
    status: str = "WORKING"
    restricted: bool = False
    latency_ms: float | None = None
    fail_rate: float = 0.0
    fail_next: list[Fault] = field(default_factory=list)
    me: Json | None = None
    last_activity: float | None = None

    def me_info(self) -> Json:
        if self.me is not None:
            return self.me
        digits = "55119" + f"{zlib.crc32(self.name.encode()) % 10**8:08d}"
        return {"id": f"{digits}@c.us", "pushName": self.name}

    def update(self, opts: Json) -> None:
        for key, value in opts.items():
            if key == "status":
                if value not in SESSION_STATUSES:
                    raise ValueError(f"unknown session status {value!r}")
                self.status = value
            elif key == "restricted":
                self.restricted = bool(value)
            elif key == "latency_ms":
                self.latency_ms = None if value is None else float(value)
            elif key == "fail_rate":
                self.fail_rate = float(value)
            elif key == "fail_next":
                self.fail_next = [Fault.parse(f) for f in value]
            elif key == "me":
                self.me = value
            elif key == "timeout_next":
                if int(value) > 0:
                    self.fail_next.append(Fault(timeout=True, count=int(value)))
            else:
                raise ValueError(f"unknown session option {key!r}")

    def as_json(self) -> Json:
        return {
            "status": self.status, "restricted": self.restricted, "latency_ms": self.latency_ms,
            "fail_rate": self.fail_rate, "fail_next": [f.as_json() for f in self.fail_next],
            "me": self.me_info(),
        }


@dataclass
class Defaults:
    """Startup settings that ``/_sandbox/reset`` returns to."""

    latency_ms: float = 0.0
    timeout_seconds: float = 30.0
    # Global webhooks (WAHA's WHATSAPP_HOOK_URL / _EVENTS / _HMAC_KEY): WebhookConfig objects.
    webhooks: list[Json] = field(default_factory=list)


class Sandbox:
    """All sandbox state, in memory. Single event loop, so no locks: check-and-insert of a
    message id happens without an await in between, which is what makes duplicates detectable."""

    def __init__(self, api_key: str | None, defaults: Defaults, validator: SchemaValidator) -> None:
        self.api_key = api_key
        self.defaults = defaults
        self.validator = validator
        self.rng = random.Random()
        self.webhooks = AckWebhooks()
        self.reset()

    def reset(self) -> None:
        self.latency_ms = self.defaults.latency_ms
        self.timeout_seconds = self.defaults.timeout_seconds
        self.timeout_next = 0
        self.timeout_deliver = True
        self.auto_create_sessions = True
        self.engine = "GOWS"  # what /api/server/version says; engines not keeping chosen ids ignore them
        self.webhooks.reset(self.defaults.webhooks)
        self.nonexistent_numbers: set[str] = set()
        # Numbers whose WhatsApp account is under other digits (a Brazilian mobile registered
        # without its ninth digit): check-exists answers that chat id.
        self.whatsapp_ids: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.requests: list[Json] = []
        self.request_ts: list[float] = []  # parallel to requests, for bisect on `since`
        self.messages: list[Json] = []
        self.messages_by_key: dict[tuple[str, str], Json] = {}

    # -- configuration -------------------------------------------------------------------------

    def configure(self, cfg: Json) -> None:
        """Merge ``cfg`` into the configuration: keys given replace their value, per session."""
        for key, value in cfg.items():
            if key == "latency_ms":
                self.latency_ms = float(value)
            elif key == "timeout_seconds":
                self.timeout_seconds = float(value)
            elif key == "timeout_next":
                self.timeout_next = int(value)
            elif key == "timeout_deliver":
                self.timeout_deliver = bool(value)
            elif key == "auto_create_sessions":
                self.auto_create_sessions = bool(value)
            elif key == "engine":
                if value not in ENGINES:
                    raise ValueError(f"unknown engine {value!r}")
                self.engine = value
            elif key == "webhooks":
                self.webhooks.set_hooks(value)
            elif key == "acks":
                self.webhooks.set_plan(value)
            elif key == "nonexistent_numbers":
                self.nonexistent_numbers = {phone_digits(str(n)) for n in value}
            elif key == "whatsapp_ids":
                self.whatsapp_ids = {phone_digits(str(k)): phone_digits(str(v)) for k, v in value.items()}
            elif key == "seed":
                self.rng.seed(value)
            elif key == "sessions":
                for name, opts in value.items():
                    self.sessions.setdefault(name, Session(name)).update(opts or {})
            else:
                raise ValueError(f"unknown config key {key!r}")

    def config_json(self) -> Json:
        return {
            "latency_ms": self.latency_ms, "timeout_seconds": self.timeout_seconds,
            "timeout_next": self.timeout_next, "timeout_deliver": self.timeout_deliver,
            "auto_create_sessions": self.auto_create_sessions, "engine": self.engine,
            "nonexistent_numbers": sorted(self.nonexistent_numbers),
            "whatsapp_ids": dict(self.whatsapp_ids),
            "sessions": {name: s.as_json() for name, s in self.sessions.items()},
            **self.webhooks.config_json(),
        }

    def session(self, name: str) -> Session | None:
        sess = self.sessions.get(name)
        if sess is None and self.auto_create_sessions:
            sess = self.sessions[name] = Session(name)
        return sess

    def take_fault(self, sess: Session | None, path: str) -> Fault | None:
        """The injected failure this request gets, if any (consumes one use of it)."""
        if path in SEND_ENDPOINTS and self.timeout_next > 0:
            self.timeout_next -= 1
            return Fault(timeout=True, deliver=self.timeout_deliver)
        if sess is None:
            return None
        for fault in sess.fail_next:
            if fault.matches(path):
                fault.count -= 1
                if fault.count <= 0:
                    sess.fail_next.remove(fault)
                return fault
        if path in SEND_ENDPOINTS and sess.fail_rate > 0 and self.rng.random() < sess.fail_rate:
            return Fault()
        return None

    # -- inspection -----------------------------------------------------------------------------

    def find_requests(self, since: float | None, session: str | None, path: str | None) -> list[Json]:
        start = bisect.bisect_left(self.request_ts, since) if since is not None else 0
        return [
            r for r in self.requests[start:]
            if (session is None or r["session"] == session) and (path is None or path in r["path"])
        ]


def phone_digits(value: str) -> str:
    return re.sub(r"\D", "", value.split("@", 1)[0])

