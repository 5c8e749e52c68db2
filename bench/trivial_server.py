"""Baseline of figure `get`: a trivial grpcio unary servicer with campaign_service's server model
(grpc.aio.server with campaign_service's ElasticThreadPool as its migration pool, the same
CAMPAIGN_CORE_WORKERS and CAMPAIGN_MAX_WORKERS, and the same GC settings, server.tune_gc).
GetCampaign answers a constant Campaign of the same shape, without auth, database or logging.

`--mode thread` runs the handler as a plain function on the pool (as campaign_service runs its
unary RPCs), `--mode loop` as a coroutine on the event loop (as it runs its hot reads): the
figure compares ours with the mode our GetCampaign runs in.

    python -m bench.trivial_server --port P [--mode thread|loop] [--core-workers N] [--max-workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from campaign_service import config
from campaign_service.rpc_pool import ElasticThreadPool
from campaign_service.server import tune_gc
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import resources_pb2 as res


class Trivial:
    """GetCampaign only; registered through a generic handler like generated servicers are."""

    def __init__(self) -> None:
        c = res.Campaign(id="00000000-0000-4000-8000-000000000000", name="bench campaign",
                         state=res.CAMPAIGN_STATE_DRAFT, etag="W/1", total_contacts=1000, pending_count=1000,
                         templates=[res.MessageTemplate(text="Olá {{name}}, oferta da semana!")],
                         settings=res.CampaignSettings(pacing=res.Pacing(interval_min_seconds=30,
                                                                         interval_max_seconds=60)))
        c.create_time.GetCurrentTime()
        c.update_time.GetCurrentTime()
        self.campaign = c

    def GetCampaign(self, request: cs.GetCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self.campaign

    async def GetCampaignOnLoop(self, request: cs.GetCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        return self.campaign


async def serve(port: int, core_workers: int, max_workers: int, mode: str) -> None:
    server = grpc.aio.server(migration_thread_pool=ElasticThreadPool(core_workers, max_workers))
    servicer = Trivial()
    handler = servicer.GetCampaign if mode == "thread" else servicer.GetCampaignOnLoop
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("whago.campaign.v1.CampaignService", {
        "GetCampaign": grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=cs.GetCampaignRequest.FromString,
            response_serializer=res.Campaign.SerializeToString),
    }),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.stop(2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    settings = config.load()
    ap.add_argument("--max-workers", type=int, default=settings.max_workers)
    ap.add_argument("--core-workers", type=int, default=settings.core_workers)
    ap.add_argument("--mode", choices=("thread", "loop"), default="thread")
    a = ap.parse_args()
    tune_gc()
    asyncio.run(serve(a.port, a.core_workers, a.max_workers, a.mode))


if __name__ == "__main__":
    main()
