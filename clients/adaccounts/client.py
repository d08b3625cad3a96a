"""The synchronous client: one typed method per RPC over the generated stub.

It adds only what every caller would otherwise get wrong on their own: a
deadline on every call, a request_id on every create (so that retrying it is
safe), gRPC's own retries and load balancing, and exceptions instead of
status codes. The messages are the generated ones (adaccounts.v1), unwrapped.
"""

from __future__ import annotations

import builtins
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
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


class AdAccountsClient:
    """Calls adaccounts.v1.AdAccountService. Thread-safe: make one per process and share it.

    `target` is a gRPC target. Every address it resolves to gets a connection and calls
    are spread over them (round_robin): use `dns:///<headless-service>:<port>` in
    Kubernetes so that each pod gets its share. One HTTP/2 connection stays on one
    server process, so for one address that fronts several processes (a ClusterIP
    Service, SO_REUSEPORT) set `connections` to open that many and rotate calls over them.

    `timeout` (seconds) is the deadline of every call unless the call gives its own;
    None means no deadline. With `wait_for_ready`, a call made while no server is
    reachable waits (up to its deadline) for one instead of failing at once.
    `retry` retries Get, BatchGet, List and Create on UNAVAILABLE or a shutting-down
    server's CANCELLED (None: never).
    `credentials` switches to TLS (see tls_credentials); `metadata_provider` is called
    before every call and its pairs are sent with it (an auth token, say).
    `keepalive_time_s` below 300 needs the server to allow it (see the README).
    `interceptors` and raw channel `options` are passed to gRPC as they are.
    """

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
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
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
            grpc.insecure_channel(target, channel_args)
            if credentials is None
            else grpc.secure_channel(target, credentials, channel_args)
            for _ in range(connections)
        ]
        self._stubs = [
            pb_grpc.AdAccountServiceStub(grpc.intercept_channel(channel, *interceptors)) for channel in self._channels
        ]
        self._turns = itertools.count()  # next() on it is atomic: no lock needed between threads

    # --- the RPCs ---------------------------------------------------------------------------

    def get(self, id: str, *, timeout: float | None = None, metadata: Metadata = ()) -> pb.AdAccount:
        """The account with this id. Raises NotFound."""
        return self._call("GetAdAccount", pb.GetAdAccountRequest(id=id), timeout, metadata)

    def batch_get(
        self, ids: Iterable[str], *, timeout: float | None = None, metadata: Metadata = ()
    ) -> builtins.list[pb.AdAccount]:
        """Up to 1000 accounts in the order of `ids`. Raises NotFound naming the missing ones."""
        response = self._call("BatchGetAdAccounts", pb.BatchGetAdAccountsRequest(ids=ids), timeout, metadata)
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
        return self._call("ListAdAccounts", request, timeout, metadata)

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
        return self._call("CreateAdAccount", create_request(ad_account, request_id), timeout, metadata)

    def update(
        self,
        ad_account: pb.AdAccount,
        *,
        update_mask: Iterable[str] | None = None,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> pb.AdAccount:
        """Changes the account `ad_account.id`; a non-empty `ad_account.etag` must still match.

        `update_mask` lists the fields to change (name, currency_code, time_zone,
        status, or "*"); None changes every one of them that is set. Raises
        Conflict (stale etag), NotFound, InvalidArgument. Never retried automatically.
        """
        return self._call("UpdateAdAccount", update_request(ad_account, update_mask), timeout, metadata)

    def delete(self, id: str, *, etag: str = "", timeout: float | None = None, metadata: Metadata = ()) -> None:
        """Deletes the account; with an etag, only if it still matches. Raises NotFound, Conflict."""
        self._call("DeleteAdAccount", pb.DeleteAdAccountRequest(id=id, etag=etag), timeout, metadata)

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
    ) -> Iterator[pb.AdAccount]:
        """Every matching account, fetching the next page only when the last one is used up.

        Each page is its own call with its own deadline and retries, so a walk of any
        length never runs into one deadline. In the default order (create_time) every
        row that exists for the whole walk comes exactly once, even while rows are added.
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
            )
            yield from page.ad_accounts
            token = page.next_page_token
            if not token:
                return

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the connections; calls in progress are cancelled."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> AdAccountsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------

    def _call(self, method: str, request: message.Message, timeout: float | None, metadata: Metadata) -> Any:
        stub = self._stubs[next(self._turns) % len(self._stubs)]
        try:
            return getattr(stub, method)(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=call_metadata(self._metadata_provider, metadata),
                wait_for_ready=self._wait_for_ready,
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error


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
