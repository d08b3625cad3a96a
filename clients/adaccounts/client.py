"""The synchronous client: one typed method per RPC over the generated stub.

It adds only what every caller would otherwise get wrong on their own: a
deadline on every call, a bounded wait for a connection (a restarting server is
waited for; one that cannot be reached is reported as never reached), a
request_id on every create (so that retrying it is safe), gRPC's own retries and
load balancing, read-your-writes through read replicas (the consistency token),
and exceptions instead of status codes. The messages are the generated ones
(adaccounts.v1), unwrapped.
"""

from __future__ import annotations

import builtins
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import message

from ._common import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_KEEPALIVE_TIME_S,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_S,
    PROBE_METHOD,
    PROBE_TIMEOUT_S,
    Metadata,
    MetadataProvider,
    RetryPolicy,
    TokenFloor,
    call_metadata,
    channel_options,
    checked_token,
    connect_budget,
    create_request,
    list_request,
    probe_timeout,
    probe_verdict,
    read_metadata,
    trailers_token,
    update_request,
)
from .errors import (
    AdAccountsError,
    client_closed,
    connection_failed,
    from_rpc_error,
    invalid_request,
)
from .v1 import ad_accounts_pb2 as pb
from .v1 import ad_accounts_pb2_grpc as pb_grpc

_Request = TypeVar("_Request", bound=message.Message)
_Response = TypeVar("_Response", bound=message.Message)


class _Connection:
    """One channel, its stub, and its connectivity state as gRPC last reported it."""

    def __init__(self, channel: grpc.Channel, interceptors: Sequence[grpc.UnaryUnaryClientInterceptor]):
        self.channel = channel
        self.stub = pb_grpc.AdAccountServiceStub(grpc.intercept_channel(channel, *interceptors))
        self._probe: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PROBE_METHOD, None, None)
        self.state: grpc.ChannelConnectivity | None = None
        self._connected_before = False
        self._ready = threading.Event()
        self._watched = threading.Event()
        # Connects at once, and keeps `state` current: gRPC calls _changed on a thread of its
        # own, in order, with each new state.
        channel.subscribe(self._changed, try_to_connect=True)

    def _changed(self, state: grpc.ChannelConnectivity) -> None:
        self.state = state
        if state is grpc.ChannelConnectivity.READY:
            self._connected_before = True
            self._ready.set()
        else:
            self._ready.clear()
        self._watched.set()

    def close(self) -> None:
        # gRPC's watcher thread fails noisily ("Cannot monitor channel state: Channel closed!")
        # on a channel closed before it first settled down to watch it: let it get there.
        self._watched.wait(0.5)
        self.channel.unsubscribe(self._changed)
        self.channel.close()
        self._ready.set()  # wakes a call waiting for a connection: it finds the client closed

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, budget: float | None) -> bool:
        """Whether a connection is up, waiting up to `budget` seconds (None: no limit) for one."""
        if self._ready.is_set():
            return True
        if budget is not None and budget <= 0:
            return False
        started = time.monotonic()
        if self.state is grpc.ChannelConnectivity.IDLE and self._connected_before:
            # A channel gone idle (unused for grpc.client_idle_timeout_ms) connects again only
            # when a call asks it to; the first connection was asked for by subscribe().
            # (grpc.channel_ready_future would ask too, but it leaves gRPC's watcher thread a
            # flag that makes it fail noisily on the channel once closed.)
            self.probe(PROBE_TIMEOUT_S if budget is None else min(budget, PROBE_TIMEOUT_S))
        return self._ready.wait(None if budget is None else max(0.0, budget - (time.monotonic() - started)))

    def probe(self, timeout: float) -> grpc.RpcError | None:
        """gRPC's reason for having no connection: a call it fails without sending (see PROBE_METHOD)."""
        try:
            self._probe(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as error:
            return error
        return None


class AdAccountsClient:
    """Calls adaccounts.v1.AdAccountService. Thread-safe: make one per process and share it.

    `target` is a gRPC target. Every address it resolves to gets a connection and calls
    are spread over them (round_robin): use `dns:///<headless-service>:<port>` in
    Kubernetes so that each pod gets its share. One HTTP/2 connection stays on one
    server process, so for one address that fronts several processes (a ClusterIP
    Service, SO_REUSEPORT) set `connections` to open that many and rotate calls over them.

    `timeout` (seconds) is the deadline of every call unless the call gives its own;
    None means no deadline. No call blocks longer than its deadline.
    `connect_timeout` (seconds) is how long a call waits for a connection while none is
    up (a server restarting): then it raises ConnectionFailed, never having been sent.
    0 fails at once; None, or `wait_for_ready=True`, waits up to the call's deadline.
    `retry` retries Get, BatchGet, List and Create on UNAVAILABLE or a shutting-down
    server's CANCELLED (None: never).
    `credentials` switches to TLS (see tls_credentials); `metadata_provider` is called
    before every call and its pairs are sent with it (an auth token, say); a call's own
    `metadata` replaces the provider's pairs with the same key.
    `keepalive_time_s` below 300 needs the server to allow it (see clients/README.md).
    `interceptors` and raw channel `options` are passed to gRPC as they are (an option
    given here replaces the client's own value for it).

    Read-your-writes: the client keeps the greatest consistency token any call returned
    (`consistency_token`) and sends it with every read (get, batch_get, list,
    iter_ad_accounts), so a read through this client sees its own writes and never a state
    older than one it saw before, even from a read replica. A token from another service
    goes in with `observe_consistency_token`, or with one read's `consistency_token=`.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
        wait_for_ready: bool = False,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        metadata_provider: MetadataProvider | None = None,
        connections: int = 1,
        keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if connect_timeout is not None and connect_timeout < 0:
            raise ValueError("connect_timeout must be 0 or more (or None)")
        self._target = target
        self._tls = credentials is not None
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._wait_for_ready = wait_for_ready
        self._metadata_provider = metadata_provider
        self._closed = False
        channel_args = channel_options(
            retry=retry, keepalive_time_s=keepalive_time_s, own_connection=connections > 1, extra=options
        )
        self._connections = [
            _Connection(
                grpc.insecure_channel(target, channel_args)
                if credentials is None
                else grpc.secure_channel(target, credentials, channel_args),
                interceptors,
            )
            for _ in range(connections)
        ]
        self._turns = itertools.count()  # next() on it is atomic: no lock needed between threads
        self._tokens = TokenFloor()

    # --- read-your-writes -------------------------------------------------------------------

    @property
    def consistency_token(self) -> str | None:
        """The greatest consistency token this client has seen (None: none yet): what every read sends.

        16 hex digits, opaque: hand it to another service, whose client then reads at least
        this database state (observe_consistency_token, or a read's `consistency_token=`).
        """
        return self._tokens.value

    def observe_consistency_token(self, token: str) -> None:
        """Makes every later read through this client see at least the state `token` stands for
        (one from another service's write); a token older than the client's own changes nothing.
        Raises InvalidConsistencyToken (a ValueError) if `token` is not one."""
        self._tokens.raise_to(checked_token(token))

    # --- the RPCs ---------------------------------------------------------------------------

    def get(
        self,
        id: str,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> pb.AdAccount:
        """The account with this id. Raises NotFound.

        `consistency_token` (on every read): this read sees at least that state as well.
        """
        return self._call(
            lambda stub: stub.GetAdAccount,
            lambda: pb.GetAdAccountRequest(id=id),
            timeout,
            metadata,
            read=True,
            consistency_token=consistency_token,
        )

    def batch_get(
        self,
        ids: Iterable[str],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> builtins.list[pb.AdAccount]:
        """Up to 1000 accounts in the order of `ids`. Raises NotFound naming the missing ones."""
        response = self._call(
            lambda stub: stub.BatchGetAdAccounts,
            lambda: pb.BatchGetAdAccountsRequest(ids=ids),
            timeout,
            metadata,
            read=True,
            consistency_token=consistency_token,
        )
        return builtins.list(response.ad_accounts)

    def list(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        owner_id: str = "",
        platforms: Iterable[pb.Platform | str] = (),
        statuses: Iterable[pb.Status | str] = (),
        order_by: str = "",
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> pb.ListAdAccountsResponse:
        """One page: the response itself, whose `ad_accounts` are the page and whose
        `next_page_token` (empty on the last page) asks for the next, with the same filters.
        See iter_ad_accounts for every page.

        Platforms and statuses are enum values or their names as in the proto
        ("PLATFORM_META"); another name raises InvalidArgument before anything is sent.
        """
        return self._call(
            lambda stub: stub.ListAdAccounts,
            lambda: list_request(
                page_size=page_size,
                page_token=page_token,
                owner_id=owner_id,
                platforms=platforms,
                statuses=statuses,
                order_by=order_by,
            ),
            timeout,
            metadata,
            read=True,
            consistency_token=consistency_token,
        )

    def create(
        self,
        ad_account: pb.AdAccount,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Creates the account and returns it as stored. Raises AlreadyExists, InvalidArgument.

        Pass your own `request_id` (a UUID) to make a create you redo later, after a
        failure, return the first result instead of AlreadyExists; by default each
        call gets a fresh one, which still makes gRPC's automatic retries safe.
        """
        return self._call(
            lambda stub: stub.CreateAdAccount, lambda: create_request(ad_account, request_id), timeout, metadata
        )

    def update(
        self,
        ad_account: pb.AdAccount,
        *,
        update_mask: Iterable[str] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Changes the account `ad_account.id` and returns it as stored; a non-empty
        `ad_account.etag` must still match.

        `update_mask` lists the fields to change (name, currency_code, time_zone,
        status, or "*"); None changes every one of them that is set. Raises
        Aborted (stale etag), NotFound, InvalidArgument. Never retried automatically.
        """
        return self._call(
            lambda stub: stub.UpdateAdAccount, lambda: update_request(ad_account, update_mask), timeout, metadata
        )

    def delete(self, id: str, *, etag: str = "", timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Deletes the account; with an etag, only if it still matches. Returns None. Raises NotFound, Aborted."""
        self._call(
            lambda stub: stub.DeleteAdAccount, lambda: pb.DeleteAdAccountRequest(id=id, etag=etag), timeout, metadata
        )

    def iter_ad_accounts(
        self,
        *,
        owner_id: str = "",
        platforms: Iterable[pb.Platform | str] = (),
        statuses: Iterable[pb.Status | str] = (),
        order_by: str = "",
        page_size: int = 0,
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> Iterator[pb.AdAccount]:
        """Every matching account, fetching the next page only when the last one is used up.

        Each page is its own call with its own deadline and retries, so a walk of any
        length never runs into one deadline. In the default order (create_time) every
        row that exists for the whole walk comes exactly once, even while rows are added.
        Every page sees at least the state of the one before it (and `consistency_token`'s).
        """
        platforms, statuses = tuple(platforms), tuple(statuses)  # read once per page
        token = ""
        while True:
            page = self.list(
                page_size=page_size,
                page_token=token,
                owner_id=owner_id,
                platforms=platforms,
                statuses=statuses,
                order_by=order_by,
                timeout=timeout,
                metadata=metadata,
                consistency_token=consistency_token,
            )
            yield from page.ad_accounts
            token = page.next_page_token
            if not token:
                return

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connections; calls in progress are cancelled (they raise ClientClosed), and so are later ones."""
        self._closed = True
        for connection in self._connections:
            connection.close()

    def __enter__(self) -> AdAccountsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _pick(self) -> _Connection:
        """The next connection in turn; passed over while it is failing to connect and another is up."""
        turn = next(self._turns)
        chosen = self._connections[turn % len(self._connections)]
        if chosen.state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return next((other for other in self._connections if other.ready), chosen)
        return chosen

    def _call(
        self,
        rpc: Callable[[pb_grpc.AdAccountServiceStub], grpc.UnaryUnaryMultiCallable[_Request, _Response]],
        build: Callable[[], _Request],
        timeout: float | None,
        metadata: Metadata,
        *,
        read: bool = False,
        consistency_token: str | None = None,
    ) -> _Response:
        """Makes the call; a `read` sends the client's consistency token (or `consistency_token`,
        if greater), and any call's trailers may raise the client's."""
        started = time.monotonic()
        if self._closed:
            raise client_closed()
        try:
            request = build()
        except AdAccountsError:
            raise
        except (TypeError, ValueError) as error:
            raise invalid_request(error) from error
        deadline = self._timeout if timeout is None else timeout
        pairs, request_id = call_metadata(self._metadata_provider, metadata)
        if read:
            pairs = read_metadata(pairs, self._tokens.value, consistency_token)
        connection = self._pick()
        budget = connect_budget(
            connect_timeout=self._connect_timeout, wait_for_ready=self._wait_for_ready, timeout=deadline
        )
        if not connection.wait_ready(budget):
            self._raise_unless_connected(connection, started, deadline)
        remaining = None if deadline is None else deadline - (time.monotonic() - started)
        try:
            # with_call, for the trailers (the consistency token): the same call as __call__,
            # the same retries and deadline, plus a grpc.Call to read them from.
            response, call = rpc(connection.stub).with_call(
                request,
                timeout=remaining,
                metadata=pairs,
                # Once connected, a retry (or the call, if the connection has just dropped)
                # waits for the connection to come back rather than failing at once.
                wait_for_ready=budget != 0,
            )
        except grpc.RpcError as error:
            self._tokens.raise_to(trailers_token(error))
            if self._closed:
                raise client_closed() from error
            raise from_rpc_error(error, request_id=request_id) from error
        except ValueError as error:  # gRPC's "Cannot invoke RPC on closed channel!"
            if self._closed:
                raise client_closed() from error
            raise
        self._tokens.raise_to(trailers_token(call))
        return response

    def _raise_unless_connected(self, connection: _Connection, started: float, deadline: float | None) -> None:
        """No connection came up in time: ask gRPC why, and raise ConnectionFailed (unless one just did)."""
        if self._closed:
            raise client_closed()
        remaining = None if deadline is None else deadline - (time.monotonic() - started)
        failure = connection.probe(probe_timeout(remaining))
        call = cast("grpc.Call | None", failure)
        connected, cause = probe_verdict(call.code() if call else None, call.details() if call else None)
        if connected and (remaining is None or remaining > 0):
            return  # it came up just now: go ahead
        raise connection_failed(self._target, time.monotonic() - started, cause, tls=self._tls)


def tls_credentials(
    *,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files, as Kubernetes mounts them from a Secret.

    `ca_file`: the CA that signed the server's certificate (None: the system's roots).
    `cert_file` and `key_file` together: the client certificate, for mutual TLS.
    For PEM bytes already in memory, use grpc.ssl_channel_credentials directly.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )
