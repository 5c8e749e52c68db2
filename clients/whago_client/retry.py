"""How the SDK retries: gRPC's own retry policy, configured per channel from a RetryPolicy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

# gRPC's retry policy allows at most this many attempts per call (more are treated as this).
GRPC_MAX_ATTEMPTS = 5
# Never retried: DeleteChip carries no request_id, so a retry could report NOT_FOUND for a delete
# that worked; ImportContacts is a stream of rows with no request_id (never retried before either).
# Every other method is a read or carries a request_id (AIP-155).
NOT_RETRIED = (("whago.campaign.v1.ChipService", "DeleteChip"),
               ("whago.campaign.v1.CampaignService", "ImportContacts"))
RETRIED_SERVICES = ("whago.campaign.v1.CampaignService", "whago.campaign.v1.ChipService",
                    "whago.campaign.v1.CreditService")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures of idempotent calls, carried out by
    gRPC itself (the channel's service config `retryPolicy`; see `service_config`).

    Only calls that are safe to repeat are retried: reads, and mutations carrying a
    request_id (the server returns the first result for a repeated id, AIP-155). gRPC caps
    `max_attempts` at 5 and honours a server's pushback (`grpc-retry-pushback-ms`).
    """

    max_attempts: int = 4
    initial_backoff: float = 0.2
    max_backoff: float = 3.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = field(
        default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE})
    )

    def service_config(self) -> str:
        """The channel's service config (JSON): this policy for every method but NOT_RETRIED."""
        configs: list[dict[str, object]] = [{"name": [{"service": s, "method": m} for s, m in NOT_RETRIED]}]
        attempts = min(self.max_attempts, GRPC_MAX_ATTEMPTS)
        if attempts >= 2:
            configs.insert(0, {
                "name": [{"service": s} for s in RETRIED_SERVICES],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": f"{self.initial_backoff:.3f}s",
                    "maxBackoff": f"{self.max_backoff:.3f}s",
                    "backoffMultiplier": self.multiplier,
                    "retryableStatusCodes": sorted(c.name for c in self.retry_codes),
                },
            })
        return json.dumps({"methodConfig": configs})
