"""The asyncio client: AdAccountsClient's twin on grpc.aio, for services that run an event loop.

Same methods, arguments, defaults and exceptions as the synchronous client
(see adaccounts.client); the methods are coroutines and iter_ad_accounts is an
async iterator. Create it inside the event loop that will use it.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf import message

from ._common import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_KEEPALIVE_TIME_S,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_S,
    PROBE_METHOD,
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
    received_token,
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

_READY = grpc.ChannelConnectivity.READY


class _Connection:
    """One grpc.aio channel and its stub; the channel's own state says whether it is connected."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.AdAccountServiceStub(channel)
        self._probe: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PROBE_METHOD, None, None)

    @property
    def state(self) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect=False)

    async def wait_ready(self, budget: float | None) -> bool:
        """Whether a connection is up, waiting up to `budget` seconds (None: no limit) for one."""
        state = self.channel.get_state(try_to_connect=True)  # also asks an idle channel to connect
        if state is _READY:
            return True
        if budget is not None and budget <= 0:
            return False
        try:
            async with asyncio.timeout(budget):
                while state is not _READY:
                    if state is grpc.ChannelConnectivity.SHUTDOWN:
                        return False
                    await self.channel.wait_for_state_change(state)
                    state = self.channel.get_state(try_to_connect=True)
        except TimeoutError:
            return False
        return True

    async def probe(self, timeout: float) -> tuple[grpc.StatusCode | None, str | None]:
        """gRPC's reason for having no connection: a call it fails without sending (see PROBE_METHOD).
        grpc.aio applies a channel's interceptors to every call on it, so they see this one too."""
        try:
            await self._probe(b"", timeout=timeout, wait_for_ready=False)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return None, None


class AsyncAdAccountsClient:
    """Calls adaccounts.v1.AdAccountService from asyncio; arguments as for AdAccountsClient.

    Read-your-writes as there: every read sends the greatest consistency token the client has
    seen (`consistency_token`, raised by `observe_consistency_token` or a read's `consistency_token=`).
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
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
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
                grpc.aio.insecure_channel(target, channel_args, interceptors=interceptors)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials, channel_args, interceptors=interceptors)
            )
            for _ in range(connections)
        ]
        self._turns = itertools.count()
        self._tokens = TokenFloor()

    # --- read-your-writes -------------------------------------------------------------------

    @property
    def consistency_token(self) -> str | None:
        """The greatest consistency token this client has seen (None: none yet): what every read sends."""
        return self._tokens.value

    def observe_consistency_token(self, token: str) -> None:
        """Makes every later read through this client see at least the state `token` stands for.
        Raises InvalidConsistencyToken (a ValueError) if `token` is not one. Not a coroutine."""
        self._tokens.raise_to(checked_token(token))

    # --- the RPCs ---------------------------------------------------------------------------

    async def get(
        self,
        id: str,
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> pb.AdAccount:
        """The account with this id. Raises NotFound."""
        return await self._call(
            lambda stub: stub.GetAdAccount,
            lambda: pb.GetAdAccountRequest(id=id),
            timeout,
            metadata,
            read=True,
            consistency_token=consistency_token,
        )

    async def batch_get(
        self,
        ids: Iterable[str],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
        consistency_token: str | None = None,
    ) -> builtins.list[pb.AdAccount]:
        """Up to 1000 accounts in the order of `ids`. Raises NotFound naming the missing ones."""
        response = await self._call(
            lambda stub: stub.BatchGetAdAccounts,
            lambda: pb.BatchGetAdAccountsRequest(ids=ids),
            timeout,
            metadata,
            read=True,
            consistency_token=consistency_token,
        )
        return builtins.list(response.ad_accounts)

    async def list(
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
        """One page: `ad_accounts` and the `next_page_token` for the next (empty on the last). See iter_ad_accounts."""
        return await self._call(
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

    async def create(
        self,
        ad_account: pb.AdAccount,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Creates the account and returns it as stored; always sends a request_id (yours or a fresh one)."""
        return await self._call(
            lambda stub: stub.CreateAdAccount, lambda: create_request(ad_account, request_id), timeout, metadata
        )

    async def update(
        self,
        ad_account: pb.AdAccount,
        *,
        update_mask: Iterable[str] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Changes the account `ad_account.id`; a non-empty etag must still match. Never retried automatically."""
        return await self._call(
            lambda stub: stub.UpdateAdAccount, lambda: update_request(ad_account, update_mask), timeout, metadata
        )

    async def delete(self, id: str, *, etag: str = "", timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Deletes the account; with an etag, only if it still matches. Returns None."""
        await self._call(
            lambda stub: stub.DeleteAdAccount, lambda: pb.DeleteAdAccountRequest(id=id, etag=etag), timeout, metadata
        )

    async def iter_ad_accounts(
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
    ) -> AsyncIterator[pb.AdAccount]:
        """Every matching account, one page per call, each page fetched only when the last is used up."""
        platforms, statuses = tuple(platforms), tuple(statuses)
        token = ""
        while True:
            page = await self.list(
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
            for ad_account in page.ad_accounts:
                yield ad_account
            token = page.next_page_token
            if not token:
                return

    # --- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Closes the connections; calls in progress are cancelled (they raise ClientClosed), and so are later ones."""
        self._closed = True
        for connection in self._connections:
            await connection.channel.close(None)  # no grace

    async def __aenter__(self) -> AsyncAdAccountsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _pick(self) -> _Connection:
        """The next connection in turn; passed over while it is failing to connect and another is up."""
        turn = next(self._turns)
        chosen = self._connections[turn % len(self._connections)]
        if len(self._connections) > 1 and chosen.state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return next((other for other in self._connections if other.state is _READY), chosen)
        return chosen

    async def _call(
        self,
        rpc: Callable[[pb_grpc.AdAccountServiceAsyncStub], grpc.aio.UnaryUnaryMultiCallable[_Request, _Response]],
        build: Callable[[], _Request],
        timeout: float | None,
        metadata: Metadata,
        *,
        read: bool = False,
        consistency_token: str | None = None,
    ) -> _Response:
        """Makes the call; a `read` sends the client's consistency token (or `consistency_token`,
        if greater), and any call's trailers may raise the client's."""
        loop = asyncio.get_running_loop()
        started = loop.time()
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
        if not await connection.wait_ready(budget):
            await self._raise_unless_connected(connection, started, deadline)
        remaining = None if deadline is None else deadline - (loop.time() - started)
        try:
            call = rpc(connection.stub)(
                request,
                timeout=remaining,
                metadata=pairs,
                # Once connected, a retry (or the call, if the connection has just dropped)
                # waits for the connection to come back rather than failing at once.
                wait_for_ready=budget != 0,
            )
            response = await call
            # Done by now: the trailers (with the consistency token) came with the status.
            trailing = await call.trailing_metadata()
        except grpc.RpcError as error:
            self._tokens.raise_to(trailers_token(error))
            if self._closed:
                raise client_closed() from error
            raise from_rpc_error(error, request_id=request_id) from error
        except grpc.aio.UsageError as error:  # a call on a channel closed meanwhile
            if self._closed:
                raise client_closed() from error
            raise
        except asyncio.CancelledError as error:
            # grpc.aio cancels the calls in progress on a channel being closed; a cancellation
            # of the caller's own task is passed on as it is.
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                raise client_closed() from error
            raise
        self._tokens.raise_to(received_token(trailing))
        return response

    async def _raise_unless_connected(self, connection: _Connection, started: float, deadline: float | None) -> None:
        """No connection came up in time: ask gRPC why, and raise ConnectionFailed (unless one just did)."""
        if self._closed:
            raise client_closed()
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else deadline - (loop.time() - started)
        connected, cause = probe_verdict(*await connection.probe(probe_timeout(remaining)))
        if connected and (remaining is None or remaining > 0):
            return  # it came up just now: go ahead
        raise connection_failed(self._target, loop.time() - started, cause, tls=self._tls)
