"""UploadMediaChunks: the client stream is read on the event loop and handed, chunk by chunk, to
the upload running in a thread (disk writes and the transaction block). A broken or cancelled
stream raises inside the upload, which then leaves no row and no file."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from campaign_service import auth, convert, errors
from campaign_service.db.models import Media
from campaign_service.ops import Operations
from campaign_service.ops.inputs import Replayed
from campaign_service.servicers import idem, unwrap
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

#: As ImportContacts: a cancelled stream can look ended for a moment; wait this long for the
#: cancellation before committing, so a broken upload is never stored as if complete.
END_OF_STREAM_GRACE = 0.05
BACKLOG = 8  # chunks (up to 4 MiB each) read ahead of the disk writes
_END, _BROKEN = object(), object()


async def upload_media_chunks(ops: Operations, request_iterator: AsyncIterator[cs.UploadMediaChunksRequest],
                              context: grpc.aio.ServicerContext[Any, Any]) -> res.Media:
    uid = auth.current_user_id()
    loop = asyncio.get_running_loop()
    handoff: queue.SimpleQueue[cs.UploadMediaChunksRequest | object] = queue.SimpleQueue()
    cancelled = threading.Event()

    def requests() -> Iterator[cs.UploadMediaChunksRequest]:
        while True:
            item = handoff.get()
            if item is _END:
                break
            if item is _BROKEN:
                raise errors.Cancelled("the client ended the stream early; nothing was stored")
            assert isinstance(item, cs.UploadMediaChunksRequest)
            yield item
        if cancelled.wait(END_OF_STREAM_GRACE):
            raise errors.Cancelled("the client cancelled the upload; nothing was stored")

    def run() -> Media | Replayed:
        it = requests()
        first = next(it, None)
        if first is None:
            raise errors.InvalidArgument([("campaign_id", "the stream carried no chunk")])
        contents = (r.content for r in it)
        return ops.media.upload_stream(uid, first.campaign_id, first.filename, first.mime_type,
                                       _chain(first.content, contents),
                                       idem(first.request_id, "UploadMediaChunks", convert.media))

    job = loop.run_in_executor(None, run)
    try:
        try:
            async for req in request_iterator:
                while handoff.qsize() > BACKLOG and not job.done():
                    await asyncio.sleep(0.002)  # the disk is behind: read no further ahead
                if job.done():
                    break  # refused (e.g. over the limit): stop reading, answer now
                handoff.put(req)
        except Exception:
            handoff.put(_BROKEN)
        else:
            handoff.put(_END)
        out = await asyncio.shield(job)
    except asyncio.CancelledError:
        cancelled.set()
        handoff.put(_BROKEN)
        raise
    return unwrap(out, res.Media, convert.media)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
