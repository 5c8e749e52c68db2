"""UploadMediaChunks: the client stream feeds the upload running in a thread (disk writes and the
transaction block; see streams.py). A broken or cancelled stream leaves no row and no file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from campaign_service import auth, convert, errors
from campaign_service.db.models import Media
from campaign_service.ops import Operations
from campaign_service.ops.inputs import Replayed
from campaign_service.servicers import idem, unwrap
from campaign_service.servicers.streams import into_thread
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res

BACKLOG = 8  # chunks (up to 4 MiB each) read ahead of the disk writes


async def upload_media_chunks(ops: Operations, request_iterator: AsyncIterator[cs.UploadMediaChunksRequest],
                              context: grpc.aio.ServicerContext[Any, Any]) -> res.Media:
    uid = auth.current_user_id()

    def run(requests: Iterator[cs.UploadMediaChunksRequest]) -> Media | Replayed:
        first = next(requests, None)
        if first is None:
            raise errors.InvalidArgument([("campaign_id", "the stream carried no chunk")])
        return ops.media.upload_stream(uid, first.campaign_id, first.filename, first.mime_type,
                                       _chain(first.content, (r.content for r in requests)),
                                       idem(first.request_id, "UploadMediaChunks", convert.media))

    out = await into_thread(request_iterator, run, backlog=BACKLOG, nothing_kept="nothing was stored")
    return unwrap(out, res.Media, convert.media)


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
