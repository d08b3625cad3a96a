"""The AdAccountService servicer: thin handlers over convert and the repository.

The server runs on grpc.aio and every call's database work is awaited on the
event loop (db), so no call crosses to a thread; health probes and reflection
are answered on the same loop and never wait behind database work. Each handler
hands one coroutine to _run, which gives it the call's deadline and consistency
token and maps whatever it raises to a status (errors). Authentication,
admission and the log line are the guard's, around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import empty_pb2, message, message_factory

from . import convert, errors
from .db import CallScope
from .page_tokens import PageTokens
from .repository import AdAccountRepository

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdAccountService"].full_name
# The WAL position of the state a call made or saw, in its trailing metadata; a read that sends
# it back is served by a database at least that far along (replicas.py). 16 hex digits, so a
# greater token is a later state and tokens compare as strings.
CONSISTENCY_TOKEN = "x-consistency-token"
Response = TypeVar("Response")
_TOKEN_DIGITS = frozenset("0123456789abcdef")


class AdAccountService:
    def __init__(self, repository: AdAccountRepository, page_tokens: PageTokens) -> None:
        self._repository = repository
        self._page_tokens = page_tokens

    # --- RPCs --------------------------------------------------------------------------------

    async def GetAdAccount(
        self, request: pb.GetAdAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AdAccount:
        return await self._run(context, self._get, request, read=True)

    async def BatchGetAdAccounts(
        self, request: pb.BatchGetAdAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BatchGetAdAccountsResponse:
        return await self._run(context, self._batch_get, request, read=True)

    async def ListAdAccounts(
        self, request: pb.ListAdAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAdAccountsResponse:
        return await self._run(context, self._list, request, read=True)

    async def CreateAdAccount(
        self, request: pb.CreateAdAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AdAccount:
        return await self._run(context, self._create, request)

    async def UpdateAdAccount(
        self, request: pb.UpdateAdAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AdAccount:
        return await self._run(context, self._update, request)

    async def DeleteAdAccount(
        self, request: pb.DeleteAdAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        return await self._run(context, self._delete, request)

    # --- the work ------------------------------------------------------------------------------

    async def _get(self, request: pb.GetAdAccountRequest, scope: CallScope) -> pb.AdAccount:
        return convert.to_proto(await self._repository.get(convert.parse_id(request.id, "id"), scope))

    async def _batch_get(
        self, request: pb.BatchGetAdAccountsRequest, scope: CallScope
    ) -> pb.BatchGetAdAccountsResponse:
        rows = await self._repository.batch_get(convert.parse_batch_ids(list(request.ids)), scope)
        return pb.BatchGetAdAccountsResponse(ad_accounts=[convert.to_proto(row) for row in rows])

    async def _list(self, request: pb.ListAdAccountsRequest, scope: CallScope) -> pb.ListAdAccountsResponse:
        filters, page_size = convert.parse_list(request)
        after = self._page_tokens.read(request.page_token, filters) if request.page_token else None
        if after is not None:
            # The next page is read from a database at least as far along as the last one was.
            scope.min_lsn = max(scope.min_lsn or 0, after.lsn or 0) or None
        rows, last = await self._repository.list(filters, page_size, after, scope)
        return pb.ListAdAccountsResponse(
            ad_accounts=[convert.to_proto(row) for row in rows],
            next_page_token=self._page_tokens.mint(filters, last._replace(lsn=scope.lsn)) if last else "",
        )

    async def _create(self, request: pb.CreateAdAccountRequest, scope: CallScope) -> pb.AdAccount:
        new, request_id = convert.parse_create(request)
        return convert.to_proto(await self._repository.create(new, request_id, scope))

    async def _update(self, request: pb.UpdateAdAccountRequest, scope: CallScope) -> pb.AdAccount:
        return convert.to_proto(await self._repository.update(convert.parse_update(request), scope))

    async def _delete(self, request: pb.DeleteAdAccountRequest, scope: CallScope) -> empty_pb2.Empty:
        await self._repository.delete(convert.parse_id(request.id, "id"), request.etag, scope)
        return empty_pb2.Empty()

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[Any, CallScope], Awaitable[Response]],
        request: message.Message,
        *,
        read: bool = False,
    ) -> Response:
        """`await work(request, scope)` with the call's deadline (and, for a read, the
        consistency token it sent); what it raises becomes the call's status.

        A caller that cancels or runs out of time cancels this task; the database
        driver then cancels the statement in PostgreSQL, and a transaction whose
        COMMIT was not yet sent is rolled back (db)."""
        remaining = context.time_remaining()
        scope = CallScope(None if remaining is None else time.monotonic() + remaining)
        try:
            if isinstance(request, MalformedRequest):
                raise errors.InvalidArgument.field("", request.description)
            if read:
                scope.min_lsn = _consistency_token(context)
            response = await work(request, scope)
            if context.done():
                # The deadline passed or the caller went away while this call ran: sending the
                # answer would fail in gRPC's core (an ERROR with a traceback); end it as cancelled.
                raise asyncio.CancelledError
            if scope.lsn is not None:
                context.set_trailing_metadata(
                    (*(context.trailing_metadata() or ()), (CONSISTENCY_TOKEN, f"{scope.lsn:016x}"))
                )
            return response
        except Exception as error:
            status = errors.to_status(error)
            # abort_with_status would replace the trailing metadata set so far (x-request-id).
            trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
            await errors.answer(context, status.code, status.details, trailing)


def _consistency_token(context: grpc.aio.ServicerContext[Any, Any]) -> int | None:
    """The position a read's x-consistency-token asks for; INVALID_ARGUMENT when malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == CONSISTENCY_TOKEN:
            if isinstance(value, str) and len(value) == 16 and _TOKEN_DIGITS.issuperset(value):
                return int(value, 16)
            raise errors.InvalidArgument.field(
                f"metadata {CONSISTENCY_TOKEN}",
                "not a consistency token: send back, unchanged, the 16 hex digits a response's"
                f" {CONSISTENCY_TOKEN} trailing metadata carried",
            )
    return None


class MalformedRequest:
    """Stands in for a request whose bytes are not a valid message, so the handler
    answers INVALID_ARGUMENT instead of gRPC's own INTERNAL "Exception deserializing request"."""

    def __init__(self, type_name: str) -> None:
        self.description = f"the request is not a valid {type_name} message"


def _tolerant_parser(message_class: type[message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except message.DecodeError:
            return MalformedRequest(message_class.DESCRIPTOR.full_name)

    return parse


def rpc_handlers(
    servicer: AdAccountService,
    guard: Callable[
        [str, grpc.RpcMethodHandler[Any, Any]], grpc.RpcMethodHandler[Any, Any]
    ] = lambda _method, handler: handler,
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The service's method handlers by method name, built from the proto descriptor, each
    passed once through `guard(full method name, handler)` (authentication, logs, metrics),
    for app.register_service.

    Same as the generated add_AdAccountServiceServicer_to_server, except that
    a request that does not parse reaches the handler (as MalformedRequest).
    """
    service = pb.DESCRIPTOR.services_by_name["AdAccountService"]
    handlers = {
        method.name: guard(
            f"/{service.full_name}/{method.name}",
            grpc.unary_unary_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=_tolerant_parser(message_factory.GetMessageClass(method.input_type)),
                response_serializer=lambda response: response.SerializeToString(),
            ),
        )
        for method in service.methods
    }
    return handlers
