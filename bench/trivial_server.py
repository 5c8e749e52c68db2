"""Baseline of figure 5: a trivial grpcio unary servicer with campaign_service's server model
(grpc.server on campaign_service's ElasticThreadPool, with the same CAMPAIGN_CORE_WORKERS and
CAMPAIGN_MAX_WORKERS). GetCampaign answers a constant Campaign of the same shape, without auth,
database or logging.

    python -m bench.trivial_server --port P [--core-workers N] [--max-workers N]
"""

from __future__ import annotations

import argparse
import signal
import threading

import grpc

from campaign_service import config
from campaign_service.rpc_pool import ElasticThreadPool
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    settings = config.load()
    ap.add_argument("--max-workers", type=int, default=settings.max_workers)
    ap.add_argument("--core-workers", type=int, default=settings.core_workers)
    a = ap.parse_args()
    server = grpc.server(ElasticThreadPool(a.core_workers, a.max_workers))
    servicer = Trivial()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("whago.campaign.v1.CampaignService", {
        "GetCampaign": grpc.unary_unary_rpc_method_handler(
            servicer.GetCampaign, request_deserializer=cs.GetCampaignRequest.FromString,
            response_serializer=res.Campaign.SerializeToString),
    }),))
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(2).wait()


if __name__ == "__main__":
    main()
