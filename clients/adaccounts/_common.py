"""What the sync and asyncio clients share: channel options, service config, request building.

Retries, load balancing and keepalive are all configured through gRPC itself
(the service config and channel arguments), so they behave the same in both
clients and in every attempt, and nothing here sleeps or loops.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import field_mask_pb2

from .v1 import ad_accounts_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["AdAccountService"].full_name

#: The RPCs that are safe to send twice. Create is one because the client always
#: sends a request_id, so a repeat returns the account the first attempt made.
#: Update and Delete are not: an UNAVAILABLE that comes from a broken connection
#: may follow a change that did happen.
RETRIED_METHODS = ("GetAdAccount", "BatchGetAdAccounts", "ListAdAccounts", "CreateAdAccount")

#: UNAVAILABLE: no server, a draining one, or no database; nothing was changed.
#: CANCELLED: what a gRPC server that is shutting down sends for calls it had accepted
#: but not yet started (grpc/grpc#41785); harmless to repeat for RETRIED_METHODS.
RETRIED_STATUSES = ("UNAVAILABLE", "CANCELLED")

Metadata = Sequence[tuple[str, str]]
#: Called before every call; its pairs are sent as metadata (e.g. a fresh auth token).
MetadataProvider = Callable[[], Iterable[tuple[str, str]]]

DEFAULT_TIMEOUT_S = 10.0

#: The server accepts a ping per 5 minutes while calls are in flight (gRPC's default
#: grpc.http2.min_ping_interval_without_data_ms); pinging more often gets the
#: connection closed with "too_many_pings".
DEFAULT_KEEPALIVE_TIME_S = 300.0


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retryPolicy for RETRIED_METHODS, applied on RETRIED_STATUSES.

    Attempt n (from 2) waits a random time up to
    min(initial_backoff_s * backoff_multiplier ** (n - 2), max_backoff_s); every attempt
    shares the one deadline of the call. gRPC allows at most 5 attempts.

    Throttling stops retrying while most calls fail (a down database), so retries never
    multiply the load on a struggling server: each failure costs a token, each success
    returns `throttle_token_ratio`, and retries pause below `throttle_max_tokens / 2`.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    backoff_multiplier: float = 3.0
    throttle_max_tokens: int = 100
    throttle_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be 2..5 (gRPC's limit)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoffs and multiplier must be positive")


DEFAULT_RETRY = RetryPolicy()


def service_config(retry: RetryPolicy | None) -> dict[str, Any]:
    """round_robin over every address the target resolves to, plus the retry policy."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": method} for method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": f"{retry.initial_backoff_s:.3f}s",
                    "maxBackoff": f"{retry.max_backoff_s:.3f}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": list(RETRIED_STATUSES),
                },
            }
        ]
        config["retryThrottling"] = {
            "maxTokens": retry.throttle_max_tokens,
            "tokenRatio": retry.throttle_token_ratio,
        }
    return config


def channel_options(
    *,
    retry: RetryPolicy | None,
    keepalive_time_s: float,
    own_connection: bool,
    extra: Sequence[tuple[str, Any]],
) -> list[tuple[str, Any]]:
    """Channel arguments; `extra` comes last, so a caller's value wins."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(retry))),
        # Ours, not whatever a DNS TXT record might say.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        # Ping only while calls are in flight, no more often than the server allows.
        ("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Reconnect soon after a server restarts (gRPC's defaults: first retry after
        # 1 s, growing to 120 s), so that retried calls find it within their backoff.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    if own_connection:
        # Channels normally share one connection per address; this gives each its own.
        options.append(("grpc.use_local_subchannel_pool", 1))
    options.extend(extra)
    return options


def call_metadata(provider: MetadataProvider | None, metadata: Metadata) -> tuple[tuple[str, str], ...] | None:
    """The provider's pairs, then the call's own."""
    pairs = (*(provider() if provider is not None else ()), *metadata)
    return pairs or None


def list_request(
    *,
    page_size: int,
    page_token: str,
    owner_id: str,
    platforms: Iterable[pb.Platform | str],
    statuses: Iterable[pb.Status | str],
    order_by: str,
) -> pb.ListAdAccountsRequest:
    return pb.ListAdAccountsRequest(
        page_size=page_size,
        page_token=page_token,
        owner_id=owner_id,
        platforms=platforms,
        statuses=statuses,
        order_by=order_by,
    )


def create_request(ad_account: pb.AdAccount, request_id: str | None) -> pb.CreateAdAccountRequest:
    """Always with a request_id, so that a retried create cannot make a second account."""
    return pb.CreateAdAccountRequest(ad_account=ad_account, request_id=request_id or str(uuid.uuid4()))


def update_request(ad_account: pb.AdAccount, update_mask: Iterable[str] | None) -> pb.UpdateAdAccountRequest:
    """No mask means: every mutable field that is set in ad_account (the server's rule)."""
    if update_mask is None:
        return pb.UpdateAdAccountRequest(ad_account=ad_account)
    return pb.UpdateAdAccountRequest(ad_account=ad_account, update_mask=field_mask_pb2.FieldMask(paths=update_mask))
