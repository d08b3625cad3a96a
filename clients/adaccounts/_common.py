"""What the sync and asyncio clients share: channel options, service config, request building.

Retries, load balancing, reconnection and keepalive are all configured through gRPC itself
(the service config and channel arguments), so they behave the same in both clients and in
every attempt. The one thing the clients add is the wait for a connection before a call
(connect_timeout): gRPC either fails a call at once while no connection is up or lets it
wait for its whole deadline, and neither tells "never reached a server" apart.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import field_mask_pb2

from .errors import CONSISTENCY_TOKEN_KEY, REQUEST_ID_KEY, FieldViolation, InvalidArgument, invalid_consistency_token
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

#: How long a call waits for a connection while none is up (a server restarting on the
#: same address) before it fails with ConnectionFailed, never having been sent.
DEFAULT_CONNECT_TIMEOUT_S = 5.0

#: After a failed connection attempt the client tries again after INITIAL, backing off
#: (x1.6, +-20 %) to at most MAX: a server that is back is found within about MAX. gRPC's
#: defaults (1 s, growing to 120 s) left a restarted server unused for seconds.
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 500
#: A connection attempt (TCP, TLS, HTTP/2 settings) that gets no answer is abandoned after
#: this long and a new one started (gRPC's default: 20 s, during which a server that came
#: back at that address goes unnoticed).
CONNECT_ATTEMPT_TIMEOUT_MS = 2_000

#: How the cause of a failed connection is read back from gRPC: a call that is failed at
#: once, without being sent, while the channel has no connection. Health checking is part
#: of every adaccounts server, has no side effect and is never logged, should the
#: connection come up just then; its answer is ignored.
PROBE_METHOD = "/grpc.health.v1.Health/Check"
PROBE_TIMEOUT_S = 0.25

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
    """Channel arguments, each key once: a caller's value in `extra` replaces the client's.

    (gRPC keeps the first of two values for a key, so appending `extra` would not do.)
    """
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config(retry))),
        # Ours, not whatever a DNS TXT record might say.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        # Ping only while calls are in flight, no more often than the server allows.
        ("grpc.keepalive_time_ms", round(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        # Find a restarted server within about half a second (see the constants above).
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", CONNECT_ATTEMPT_TIMEOUT_MS),
    ]
    if own_connection:
        # Channels normally share one connection per address; this gives each its own.
        options.append(("grpc.use_local_subchannel_pool", 1))
    merged = dict(options)
    merged.update(extra)
    return list(merged.items())


def call_metadata(provider: MetadataProvider | None, metadata: Metadata) -> tuple[tuple[tuple[str, str], ...], str]:
    """The metadata to send with a call, and its request id.

    The provider's pairs, then the call's own; a key the call sets replaces the provider's
    pairs with that key (a call's own `authorization` token is sent instead of the
    provider's, never beside it). An `x-request-id` is added unless one is set already.
    """
    own = tuple((key.lower(), value) for key, value in metadata)
    replaced = {key for key, _ in own}
    provided = tuple(
        (key.lower(), value)
        for key, value in (provider() if provider is not None else ())
        if key.lower() not in replaced
    )
    pairs = (*provided, *own)
    request_id = next((str(value) for key, value in pairs if key == REQUEST_ID_KEY), None)
    if request_id is None:
        request_id = uuid.uuid4().hex
        pairs = (*pairs, (REQUEST_ID_KEY, request_id))
    return pairs, request_id


#: A consistency token: a WAL position as 16 hex digits, so that two compare as strings.
_TOKEN = re.compile(r"[0-9a-f]{16}")


def checked_token(token: object, name: str = "consistency_token") -> str:
    """A token given by the caller, as sent (lowercase); InvalidConsistencyToken (a ValueError) if it is not one."""
    if isinstance(token, str):
        lowered = token.lower()
        if _TOKEN.fullmatch(lowered):
            return lowered
    raise invalid_consistency_token(name, token)


def received_token(trailing: object) -> str | None:
    """The consistency token in a call's trailing metadata (pairs, typed differently by each flavour
    of gRPC call and each set of stubs; None for none), if it has a well-formed one."""
    for key, value in cast("Iterable[tuple[object, object]] | None", trailing) or ():
        if key == CONSISTENCY_TOKEN_KEY and isinstance(value, str) and _TOKEN.fullmatch(value):
            return value
    return None


def trailers_token(call: object) -> str | None:
    """The consistency token in the trailers of a call, or of a failed call's error (sync flavour and
    grpc.aio.AioRpcError: trailing_metadata() is a plain method), if the server sent one; None also
    for an object without trailers (what an interceptor returned, an error raised by one)."""
    trailing_metadata = getattr(call, "trailing_metadata", None)
    try:
        return received_token(trailing_metadata() if callable(trailing_metadata) else None)
    except Exception:  # a call that never got trailers may not offer them
        return None


def greater_token(a: str | None, b: str | None) -> str | None:
    """The newer of two tokens (None: none)."""
    if a is None:
        return b
    return a if b is None or a >= b else b


class TokenFloor:
    """The greatest consistency token a client has seen, raised from any thread, never lowered."""

    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value: str | None = None
        self._lock = threading.Lock()

    def raise_to(self, token: str | None) -> None:
        current = self.value  # one attribute read: the common case (nothing newer) takes no lock
        if token is None or (current is not None and token <= current):
            return
        with self._lock:
            if self.value is None or token > self.value:
                self.value = token


def read_metadata(
    pairs: tuple[tuple[str, str], ...], own: str | None, given: str | None
) -> tuple[tuple[str, str], ...]:
    """A read's metadata (`pairs` from call_metadata) with one x-consistency-token: the greatest of the
    client's (`own`), the call's `consistency_token=` (`given`) and any in `pairs` (the caller's
    metadata or metadata_provider); none when there is none. Raises InvalidConsistencyToken, before
    anything is sent, for a `given` or metadata token that is not one (the server would refuse it)."""
    token = own if given is None else greater_token(own, checked_token(given))
    if any(key == CONSISTENCY_TOKEN_KEY for key, _ in pairs):
        kept = []
        for key, value in pairs:
            if key == CONSISTENCY_TOKEN_KEY:
                token = greater_token(token, checked_token(value, f"metadata {CONSISTENCY_TOKEN_KEY}"))
            else:
                kept.append((key, value))
        pairs = tuple(kept)
    return pairs if token is None else (*pairs, (CONSISTENCY_TOKEN_KEY, token))


def _enum_values(field: str, enum: Any, values: Iterable[Any], violations: list[FieldViolation]) -> list[Any]:
    """`values` as the generated messages take them: enum numbers, or names as in the proto."""
    checked = list(values)
    names = list(enum.keys())
    for value in checked:
        if isinstance(value, str) and value not in names:
            violations.append(
                FieldViolation(
                    field,
                    f"unknown value {value!r}: want {enum.DESCRIPTOR.name} values or their names ({', '.join(names)})",
                )
            )
    return checked


def list_request(
    *,
    page_size: int,
    page_token: str,
    owner_id: str,
    platforms: Iterable[pb.Platform | str],
    statuses: Iterable[pb.Status | str],
    order_by: str,
) -> pb.ListAdAccountsRequest:
    """Raises InvalidArgument, before anything is sent, for a platform or status name that is not
    one (names are the proto's: "PLATFORM_META", as the generated messages take them)."""
    violations: list[FieldViolation] = []
    platform_values = _enum_values("platforms", pb.Platform, platforms, violations)
    status_values = _enum_values("statuses", pb.Status, statuses, violations)
    if violations:
        raise InvalidArgument(
            grpc.StatusCode.INVALID_ARGUMENT,
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            field_violations=violations,
        )
    return pb.ListAdAccountsRequest(
        page_size=page_size,
        page_token=page_token,
        owner_id=owner_id,
        platforms=platform_values,
        statuses=status_values,
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


def connect_budget(*, connect_timeout: float | None, wait_for_ready: bool, timeout: float | None) -> float | None:
    """How long a call may wait for a connection: `connect_timeout`, or its whole deadline with
    `wait_for_ready`; never past the deadline. None: no limit at all."""
    limits = [limit for limit in (None if wait_for_ready else connect_timeout, timeout) if limit is not None]
    return max(0.0, min(limits)) if limits else None


def probe_timeout(remaining_s: float | None) -> float:
    """The probe's deadline: short, and within what is left of the call's deadline (50 ms at least)."""
    return PROBE_TIMEOUT_S if remaining_s is None else max(0.05, min(PROBE_TIMEOUT_S, remaining_s))


def probe_verdict(code: grpc.StatusCode | None, details: str | None) -> tuple[bool, str | None]:
    """What the probe's outcome says: (connected now, gRPC's reason for no connection).

    `code` is None when the probe succeeded. UNAVAILABLE is the client failing it for want of a
    connection (the reason in its details); DEADLINE_EXCEEDED, a connection attempt still going
    on; anything else is a server's answer, so a connection is up.
    """
    if code is grpc.StatusCode.UNAVAILABLE:
        return False, details or None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return False, None
    return True, None
