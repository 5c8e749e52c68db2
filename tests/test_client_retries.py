"""The SDK's retries are gRPC's own (service config retryPolicy): against a real gRPC server on
loopback whose handlers fail with UNAVAILABLE on purpose, count the attempts that reach it."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from whago_client import RetryPolicy, WhagoClient, errors
from whago_client.aio import AsyncWhagoClient

from devstack.servers import free_port
from whago.campaign.v1 import campaign_service_pb2 as cs
from whago.campaign.v1 import campaign_service_pb2_grpc as cs_grpc
from whago.campaign.v1 import chip_service_pb2 as chs
from whago.campaign.v1 import chip_service_pb2_grpc as chs_grpc
from whago.campaign.v1 import resources_pb2 as res

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


class Flaky(cs_grpc.CampaignServiceServicer, chs_grpc.ChipServiceServicer):
    """Fails the first `failures` attempts of every method with UNAVAILABLE, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "database unavailable, retry later")

    def GetCampaign(self, request: cs.GetCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        self._attempt("GetCampaign", context)
        return res.Campaign(id=request.campaign_id, name="found")

    def CreateCampaign(self, request: cs.CreateCampaignRequest, context: grpc.ServicerContext) -> res.Campaign:
        self.request_ids.append(request.request_id)
        self._attempt("CreateCampaign", context)
        return res.Campaign(id="c-1", name=request.campaign.name)

    def GetChip(self, request: chs.GetChipRequest, context: grpc.ServicerContext) -> res.Chip:
        self._attempt("GetChip", context)
        return res.Chip(id=request.chip_id)

    def DeleteChip(self, request: chs.DeleteChipRequest, context: grpc.ServicerContext) -> chs.DeleteChipResponse:
        self._attempt("DeleteChip", context)
        return chs.DeleteChipResponse()


@pytest.fixture(scope="module")
def flaky_server() -> Iterator[tuple[str, Flaky]]:
    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    cs_grpc.add_CampaignServiceServicer_to_server(servicer, server)
    chs_grpc.add_ChipServiceServicer_to_server(servicer, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


@pytest.fixture()
def flaky(flaky_server: tuple[str, Flaky]) -> tuple[str, Flaky]:
    target, servicer = flaky_server
    servicer.calls.clear()
    servicer.request_ids.clear()
    servicer.failures = 0
    return target, servicer


def test_a_read_is_retried_until_it_succeeds(flaky: tuple[str, Flaky]) -> None:
    target, server = flaky
    server.failures = 2
    with WhagoClient(target, api_key="k", retry=FAST, timeout=10) as client:
        assert client.get_campaign("c-9").name == "found"
    assert server.calls["GetCampaign"] == 3


def test_a_retried_mutation_keeps_its_request_id(flaky: tuple[str, Flaky]) -> None:
    target, server = flaky
    server.failures = 2
    with WhagoClient(target, api_key="k", retry=FAST, timeout=10) as client:
        client.create_campaign("promo", templates=["hi"])
    assert len(server.request_ids) == 3 and len(set(server.request_ids)) == 1 and server.request_ids[0]


def test_reads_give_up_after_max_attempts_and_delete_chip_is_never_retried(flaky: tuple[str, Flaky]) -> None:
    target, server = flaky
    server.failures = 100
    with WhagoClient(target, api_key="k", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01,
                                                             max_backoff=0.02), timeout=10) as client:
        with pytest.raises(errors.Unavailable):
            client.get_chip("ch-1")
        with pytest.raises(errors.Unavailable):
            client.delete_chip("ch-1")
    assert server.calls["GetChip"] == 3 and server.calls["DeleteChip"] == 1


def test_one_attempt_means_no_retry(flaky: tuple[str, Flaky]) -> None:
    target, server = flaky
    server.failures = 1
    with WhagoClient(target, api_key="k", retry=RetryPolicy(max_attempts=1), timeout=10) as client, \
            pytest.raises(errors.Unavailable):
        client.get_campaign("c-9")
    assert server.calls["GetCampaign"] == 1


def test_service_config_caps_attempts_at_grpcs_limit() -> None:
    cfg = json.loads(RetryPolicy(max_attempts=30).service_config())
    retried, not_retried = cfg["methodConfig"]
    assert retried["retryPolicy"]["maxAttempts"] == 5
    assert retried["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert {"service": "whago.campaign.v1.ChipService", "method": "DeleteChip"} in not_retried["name"]
    assert "retryPolicy" not in not_retried


def test_the_async_client_uses_the_same_retry_policy(flaky: tuple[str, Flaky]) -> None:
    """AsyncWhagoClient's grpc.aio channel gets the same service config: reads and request_id
    mutations retried (one request_id for every attempt), DeleteChip never."""
    target, server = flaky
    server.failures = 2

    async def main() -> None:
        async with AsyncWhagoClient(target, api_key="k", retry=FAST, timeout=10) as client:
            assert (await client.get_campaign("c-9")).name == "found"
            await client.create_campaign("promo", templates=["hi"])
            server.failures = 100
            with pytest.raises(errors.Unavailable):
                await client.delete_chip("ch-1")

    asyncio.run(main())
    assert server.calls["GetCampaign"] == 3 and server.calls["DeleteChip"] == 1
    assert len(server.request_ids) == 3 and len(set(server.request_ids)) == 1
