"""The send step of one message: its WAHA id (chosen before the lease records it), the pacing slot,
the camouflage (seen -> typing), the fenced send with retries, and lookups that settle an uncertain
outcome instead of resending."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from dispatcher_service import fences as fences_mod
from dispatcher_service import metrics
from dispatcher_service.lane.chip_health import ChipHealthLane
from dispatcher_service.lane.common import (
    CHECK_GAP_MAX,
    ID_CHUNK,
    ID_CHUNK_BURST,
    NOT_ON_WHATSAPP,
    OUTCOME_UNKNOWN,
    UNVERIFIABLE_PREFIX,
    ChipBanned,
    ChipDown,
    SliceOver,
    answer_id,
    ts_seconds,
)
from dispatcher_service.pacing import Reservation
from dispatcher_service.waha import message_ids
from dispatcher_service.waha.client import (
    ChipRestricted,
    MessageRejected,
    SessionNotWorking,
    WahaError,
    WahaServerError,
    WahaTimeout,
)
from whago.campaign.v1 import delivery_service_pb2 as dpb

log = logging.getLogger("dispatcher.lane")


class SendingLane(ChipHealthLane):
    """Sends messages one at a time, paced and fenced."""

    async def _lookup(self, m: dpb.LeasedMessage, waha_id: str) -> bool | None:
        """Does WAHA know this message id? None when it cannot be told (then: OUTCOME_UNKNOWN)."""
        ids = [waha_id]
        if not waha_id.startswith(("true_", "false_")):
            ids.append(f"true_{m.chat_id}_{waha_id}")
        for attempt in range(3):
            try:
                if not await self._ids_kept():
                    return None
                for i, mid in enumerate(ids):
                    try:
                        found = await self.call(functools.partial(self.waha.get_message, self.session, m.chat_id,
                                                                  mid))
                    except MessageRejected:
                        if i == 0:
                            raise
                        found = None
                    if found is not None:
                        return True
                return False
            except SessionNotWorking as e:
                raise ChipDown(str(e)) from e
            except ChipRestricted as e:
                raise ChipBanned(str(e)) from e
            except WahaError as e:
                log.info("%s message=%s lookup of %s failed (%s), attempt %d", self.ctx, m.message_id, waha_id,
                         e, attempt + 1)
                await self.sleep(min(4.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.5))
        return None

    async def _ids_kept(self) -> bool:
        """Does this WAHA's engine send under the id we chose (GET /api/server/version, asked once
        per slice, only when a lookup is needed)? If not, a lookup cannot tell and the message's
        outcome stays unknown rather than risking a second send."""
        if self.ids_kept is None:
            env = await self.call(self.waha.server_version)
            engine = str(env.get("engine") or "").upper()
            self.ids_kept = engine in message_ids.ENGINES_KEEPING_IDS
            if not self.ids_kept:
                log.warning("%s WAHA engine %r does not send under a chosen id: uncertain sends become %s",
                            self.ctx, engine, OUTCOME_UNKNOWN)
        return self.ids_kept

    def _sent_id(self, resp: Any, mid: str) -> str:
        """The id WAHA sent a message under. One that does not carry the id we chose means the
        engine ignores chosen ids: lookups by them are then not trusted (see _ids_kept)."""
        got = answer_id(resp)
        if got and mid not in got and not mid.startswith(UNVERIFIABLE_PREFIX) and self.ids_kept is not False:
            self.ids_kept = False
            log.warning("%s WAHA sent under id %s, not the chosen %s: uncertain sends become %s", self.ctx, got,
                        mid, OUTCOME_UNKNOWN)
        return got or mid

    async def _new_ids(self, n: int) -> list[str]:
        """n message ids for sends about to be leased: made here (DISPATCH_MESSAGE_IDS=local, no WAHA
        request), or asked of WAHA (new-message-id) in fenced chunks of concurrent requests."""
        if self.cfg.message_ids == "local":
            return message_ids.new_message_ids(n)
        out: list[str] = []

        async def chunk(size: int) -> list[str | BaseException]:
            return await asyncio.gather(*(self.waha.new_message_id(self.session) for _ in range(size)),
                                        return_exceptions=True)

        # Chunk after chunk, each under its own fence token taken before it starts.
        size = ID_CHUNK_BURST if self.burst else ID_CHUNK
        for k in range(0, n, size):
            got = await self.call(functools.partial(chunk, min(size, n - k)))
            errs = [e for e in got if isinstance(e, BaseException)]
            for cls, wrap in ((ChipRestricted, ChipBanned), (SessionNotWorking, ChipDown)):
                e = next((e for e in errs if isinstance(e, cls)), None)
                if e is not None:
                    raise wrap(str(e)) from e
            if errs:
                raise errs[0]
            out += [str(x) for x in got]
        return out

    async def _batch_send(self, batch: list[dpb.LeasedMessage]) -> None:
        todo: list[tuple[dpb.LeasedMessage, str]] = []
        for m in batch:
            if m.waha_message_id:
                if m.waha_message_id.startswith(UNVERIFIABLE_PREFIX):
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: media send may have "
                               "reached WAHA and cannot be looked up")
                    continue
                found = await self._lookup(m, m.waha_message_id)
                if found is True:
                    self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=m.waha_message_id)
                elif found is None:
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: earlier attempt "
                               f"{m.waha_message_id} could not be checked")
                else:
                    todo.append((m, m.waha_message_id))
                continue
            if m.not_on_whatsapp:  # cached answer
                self.final(m, dpb.DELIVERY_OUTCOME_SKIPPED, reason=NOT_ON_WHATSAPP)
                continue
            if (m.verify_number or self.cfg.check_exists) and m.phone and not await self._verify(m):
                continue
            if m.HasField("media") and m.media.id:
                todo.append((m, UNVERIFIABLE_PREFIX + uuid.uuid4().hex))
                continue
            todo.append((m, m.attempt_waha_message_id))  # or, if none, taken below for the whole batch
        if not todo:
            return
        need = [i for i, (_, mid) in enumerate(todo) if not mid]
        for i, mid in zip(need, await self._new_ids(len(need)), strict=True):
            todo[i] = (todo[i][0], mid)
        # Recorded BEFORE any send leaves: a crash from here on can be resolved by looking the id up.
        await self.flush()  # finals first: an ATTEMPTING-only report takes no campaign lock
        await self.flush(extra=[self.attempting(m, mid) for m, mid in todo])
        for m, mid in todo:
            await self._send_one(m, mid)

    async def _verify(self, m: dpb.LeasedMessage) -> bool:
        """WAHA's check-exists through this chip, under the fence, before the number's first send.
        Not on WhatsApp: SKIPPED (no credit). On it: the send goes to the chat id WAHA answered.
        Checks are paced too, at a quarter of the chip's minimum gap (at most CHECK_GAP_MAX): cheaper
        than a send, but a run of unknown numbers never turns into a burst of lookups."""
        gap = min(CHECK_GAP_MAX, self.limits.interval_min / 4)
        wait = self.last_check + gap - time.monotonic()
        if wait > 0:
            await self.sleep(wait)
        try:
            chat = await self.call(functools.partial(self.waha.check_exists, self.session, m.phone))
        except SessionNotWorking as e:
            raise ChipDown(str(e)) from e
        except ChipRestricted as e:
            raise ChipBanned(str(e)) from e
        except WahaError as e:  # no answer: send as imported, as without verification
            log.info("%s message=%s number check failed (%s): sent unchecked", self.ctx, m.message_id, e)
            return True
        finally:
            self.last_check = time.monotonic()
        if chat is None:
            self.final(m, dpb.DELIVERY_OUTCOME_SKIPPED, reason=NOT_ON_WHATSAPP, checked=(False, ""))
            return False
        self.checked[m.message_id] = chat
        m.chat_id = chat
        return True

    def _typing_seconds(self, m: dpb.LeasedMessage) -> float:
        if not self.typing or not m.text:
            return 0.0
        return max(0.0, min(len(m.text) / self.cps, self.typing_max))

    def _lead(self, typing_s: float) -> float:
        """How long before its slot a send's camouflage starts (sendSeen, then `typing_s` of typing)."""
        return typing_s + (0.3 if self.seen else 0.0)

    async def _send_one(self, m: dpb.LeasedMessage, mid: str) -> None:
        typing_s = self._typing_seconds(m)
        lead = self._lead(typing_s)
        now = time.time()
        lease_end = ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else now + 60
        slice_end_wall = now + (self.deadline - time.monotonic())
        media = m.HasField("media") and bool(m.media.id)
        if lead <= 0 and not media:
            # Nothing to do before the send: reserve the slot and, when it is due now, pass the fence
            # and take the send in the same atomic step (releasing the previous send, if still held).
            latest = min(slice_end_wall, lease_end - self.cfg.waha_timeout - 5)
            prev = self._take_unreleased()
            try:
                res, self.pretoken = await self.env.pacer.reserve_send(
                    self.chip, self.limits, self.lane_key, self.fence_key, self.inflight_key,
                    self.run_value, self.cfg.waha_timeout + 2, latest, prev_token=prev)
            except fences_mod.Stopped:
                raise  # the script ran: `prev` is released
            except BaseException:
                if prev is not None:  # cancelled or failed: the script may not have run (a release twice is harmless)
                    self._spawn_release(prev)
                raise
        else:
            await self.release_now()
            res = await self.env.pacer.reserve(self.chip, self.limits, lane_key=self.lane_key)
        if res is None:
            raise SliceOver(3600.0, "no sending window within the horizon")
        try:
            if self.pretoken is None:
                send_at = max(res.slot, now + lead)  # the camouflage is never cut short; the send waits for it
                if send_at > slice_end_wall or send_at + self.cfg.waha_timeout + 5 > lease_end:
                    await self.env.pacer.release(res)
                    defer = max(0.0, res.slot - lead - now - 2.0)
                    raise SliceOver(defer, "next slot is beyond this slice or lease")
                metrics.pacing_wait(res.slot - time.time())
                try:
                    if res.slot - lead - now > 1.0:
                        await self.flush()
                    await self.sleep(res.slot - lead - time.time())
                    await self._camouflage(m, res, typing_s)
                    await self.sleep(res.slot - time.time())
                except BaseException:
                    await self.env.pacer.release(res)
                    raise
            await self._send_with_retries(m, mid)
            # The chip's pace allows our next send no sooner (the gap runs from the end of this one).
            self.next_send_min = time.time() + self.limits.interval_min
        finally:
            if self.pretoken is not None:  # taken with the slot but never used: free the chip and the fence
                tok, self.pretoken = self.pretoken, None
                await asyncio.shield(self.env.fences.release(self.c, tok, self.chip))
        if len(self.reports) >= self.report_batch:
            await self.flush_later()

    async def _camouflage(self, m: dpb.LeasedMessage, res: Reservation, typing_s: float) -> None:
        """sendSeen -> startTyping -> wait (grows with the text) -> stopTyping; each step switchable."""
        try:
            if self.seen:
                await self.call(lambda: self.waha.send_seen(self.session, m.chat_id))
            if typing_s > 0:
                await self.call(lambda: self.waha.start_typing(self.session, m.chat_id))
                await self.sleep(typing_s)
                await self.call(lambda: self.waha.stop_typing(self.session, m.chat_id))
        except SessionNotWorking as e:
            raise ChipDown(str(e)) from e
        except ChipRestricted as e:
            raise ChipBanned(str(e)) from e
        except WahaError as e:  # cosmetic steps: never block the send
            log.info("%s message=%s camouflage step failed: %s", self.ctx, m.message_id, e)

    async def _media_payload(self, m: dpb.LeasedMessage) -> tuple[str, str, str, int]:
        """(filename, MIME type, base64 data, sniffed MediaKind: it picks the WAHA endpoint)."""
        got = await self.env.delivery.media(m.media.id)
        meta = got.media if got.HasField("media") else m.media
        return (meta.filename or m.media.filename or "file", meta.mime_type or m.media.mime_type
                or "application/octet-stream", base64.b64encode(got.content).decode(), meta.kind or m.media.kind)

    async def _settled_by_lookup(self, m: dpb.LeasedMessage, mid: str, last: str) -> bool:
        """Before resending after an uncertain answer, ask WAHA: found → SENT; cannot tell → UNKNOWN
        (never resend blindly). True when the message got its final outcome."""
        found = await self._lookup(m, mid)
        if found is True:
            self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=mid)
        elif found is None:
            self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: {last}")
        return found is not False

    async def _send_with_retries(self, m: dpb.LeasedMessage, mid: str, failed: WahaError | None = None) -> None:
        """Send with retries. `failed`: a first attempt (of a burst) already ended with this error."""
        media = m.HasField("media") and bool(m.media.id)
        payload = await self._media_payload(m) if media else None
        uncertain = isinstance(failed, WahaTimeout)
        last = str(failed) if failed is not None else ""
        for attempt in range(1 if failed is not None else 0, self.cfg.send_retries + 1):
            if attempt > 0:
                backoff = min(30.0, 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if time.monotonic() + backoff + self.cfg.waha_timeout + 1 > self.hard_deadline:
                    # Out of time: leave it leased; the id recorded by ATTEMPTING is looked up when the
                    # lease is retaken (RELEASED would clear that id).
                    log.info("%s message=%s retry deferred to a later lease after: %s", self.ctx, m.message_id,
                             last)
                    self._leave_leased(m)
                    return
                await self.sleep(backoff)
                if not media and await self._settled_by_lookup(m, mid, last):
                    return
            try:
                if payload is not None:
                    fname, mt, data, kind = payload
                    resp = await self._fenced_send(m, mid, functools.partial(
                        self.waha.send_media, self.session, m.chat_id, fname, mt, data, m.text, mid, kind))
                else:
                    resp = await self._fenced_send(m, mid, lambda: self.waha.send_text(
                        self.session, m.chat_id, m.text, mid))
            except SessionNotWorking as e:
                raise ChipDown(str(e)) from e
            except ChipRestricted as e:
                raise ChipBanned(str(e)) from e
            except MessageRejected as e:
                self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA rejected the message (HTTP {e.status}): "
                           f"{e.body[:300]}")
                return
            except WahaTimeout as e:
                last = str(e)
                uncertain = True
                self.last_error = last[:500]
                log.warning("%s message=%s send timed out (attempt %d): %s", self.ctx, m.message_id, attempt + 1, e)
                if media:  # cannot be looked up: never resend blindly
                    self.final(m, dpb.DELIVERY_OUTCOME_UNKNOWN, reason=f"{OUTCOME_UNKNOWN}: {last}")
                    return
                continue
            except WahaServerError as e:
                last = str(e)
                self.last_error = last[:500]
                log.warning("%s message=%s WAHA %d (attempt %d)", self.ctx, m.message_id, e.status, attempt + 1)
                continue
            except WahaError as e:
                self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA error: {e}"[:500])
                return
            self.final(m, dpb.DELIVERY_OUTCOME_SENT, waha_id=self._sent_id(resp, mid))
            return
        if uncertain and not media and await self._settled_by_lookup(m, mid, last):
            return
        self.final(m, dpb.DELIVERY_OUTCOME_FAILED, reason=f"WAHA failed after {self.cfg.send_retries + 1} "
                   f"attempts: {last}"[:500])

    async def _fenced_send(self, m: dpb.LeasedMessage, mid: str,
                           fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The send itself: fence + chip minimum gap since the last send that actually left."""
        lease_end = ts_seconds(m.lease_expire_time) if m.HasField("lease_expire_time") else time.time() + 60
        if time.time() + self.cfg.waha_timeout + 2 > lease_end:
            raise SliceOver(0.0, "lease too close to expiry to send")

        async def tracked() -> dict[str, Any]:
            r = await fn()
            self.send_ok[m.message_id] = r  # kept even if the lane was cancelled meanwhile
            return r

        try:
            return await self.call(tracked, min_gap=self.limits.interval_min,
                                   on_leave=lambda: self.maybe_sent.add(m.message_id))
        except (SessionNotWorking, ChipRestricted, MessageRejected):
            self.maybe_sent.discard(m.message_id)  # WAHA answered: definitely not sent
            raise
