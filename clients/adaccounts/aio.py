"""The asyncio client: AdAccountsClient's twin on grpc.aio, for services that run an event loop.

Same methods, arguments, defaults and exceptions as the synchronous client
(see adaccounts.client); the methods are coroutines and iter_ad_accounts is an
async iterator. Create it inside the event loop that will use it.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from google.protobuf import message

from ._common import (
    DEFAULT_KEEPALIVE_TIME_S,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_S,
    Metadata,
    MetadataProvider,
    RetryPolicy,
    call_metadata,
    channel_options,
    create_request,
    list_request,
    update_request,
)
from .errors import from_rpc_error
from .v1 import ad_accounts_pb2 as pb
from .v1 import ad_accounts_pb2_grpc as pb_grpc


class AsyncAdAccountsClient:
    """Calls adaccounts.v1.AdAccountService from asyncio; arguments as for AdAccountsClient."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
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
        self._timeout = timeout
        self._wait_for_ready = wait_for_ready
        self._metadata_provider = metadata_provider
        channel_args = channel_options(
            retry=retry, keepalive_time_s=keepalive_time_s, own_connection=connections > 1, extra=options
        )
        self._channels = [
            grpc.aio.insecure_channel(target, channel_args, interceptors=interceptors)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, channel_args, interceptors=interceptors)
            for _ in range(connections)
        ]
        self._stubs = [pb_grpc.AdAccountServiceStub(channel) for channel in self._channels]
        self._turns = itertools.count()

    # --- the RPCs ---------------------------------------------------------------------------

    async def get(self, id: str, *, timeout: float | None = None, metadata: Metadata = ()) -> pb.AdAccount:
        """The account with this id. Raises NotFound."""
        return await self._call("GetAdAccount", pb.GetAdAccountRequest(id=id), timeout, metadata)

    async def batch_get(
        self, ids: Iterable[str], *, timeout: float | None = None, metadata: Metadata = ()
    ) -> builtins.list[pb.AdAccount]:
        """Up to 1000 accounts in the order of `ids`. Raises NotFound naming the missing ones."""
        response = await self._call("BatchGetAdAccounts", pb.BatchGetAdAccountsRequest(ids=ids), timeout, metadata)
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
    ) -> pb.ListAdAccountsResponse:
        """One page; pass its next_page_token (with the same filters) for the next. See iter_ad_accounts."""
        request = list_request(
            page_size=page_size,
            page_token=page_token,
            owner_id=owner_id,
            platforms=platforms,
            statuses=statuses,
            order_by=order_by,
        )
        return await self._call("ListAdAccounts", request, timeout, metadata)

    async def create(
        self,
        ad_account: pb.AdAccount,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Creates the account and returns it as stored; always sends a request_id (yours or a fresh one)."""
        return await self._call("CreateAdAccount", create_request(ad_account, request_id), timeout, metadata)

    async def update(
        self,
        ad_account: pb.AdAccount,
        *,
        update_mask: Iterable[str] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Changes the account `ad_account.id`; a non-empty etag must still match. Never retried automatically."""
        return await self._call("UpdateAdAccount", update_request(ad_account, update_mask), timeout, metadata)

    async def delete(self, id: str, *, etag: str = "", timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Deletes the account; with an etag, only if it still matches."""
        await self._call("DeleteAdAccount", pb.DeleteAdAccountRequest(id=id, etag=etag), timeout, metadata)

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
            )
            for ad_account in page.ad_accounts:
                yield ad_account
            token = page.next_page_token
            if not token:
                return

    # --- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Closes the connections; calls in progress are cancelled."""
        for channel in self._channels:
            await channel.close(None)  # no grace

    async def __aenter__(self) -> AsyncAdAccountsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, method: str, request: message.Message, timeout: float | None, metadata: Metadata) -> Any:
        stub = self._stubs[next(self._turns) % len(self._stubs)]
        try:
            return await getattr(stub, method)(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=call_metadata(self._metadata_provider, metadata),
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
