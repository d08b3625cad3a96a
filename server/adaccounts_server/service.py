"""The AdAccountService servicer: thin handlers over convert and the repository.

The server runs on grpc.aio so that health probes and reflection are answered
on the event loop and never wait behind database work. Database work runs in a
bounded pool of worker threads (GRPC_THREADS), except PostgreSQL point reads,
which the loop awaits without blocking (loop_pool); each handler hands one
function to _run, which maps whatever it raises to a status in one place (errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import grpc
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import empty_pb2, message, message_factory

from . import convert, errors
from .db import CallScope, run_in_scope
from .page_tokens import PageTokens
from .repository import AdAccountRepository

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdAccountService"].full_name


class AdAccountService:
    def __init__(
        self,
        repository: AdAccountRepository,
        executor: Executor,
        cancel_executor: Executor,
        page_tokens: PageTokens,
        max_concurrent_rpcs: int,
    ) -> None:
        self._repository = repository
        self._executor = executor
        self._cancel_executor = cancel_executor
        self._page_tokens = page_tokens
        self._max_in_flight = max_concurrent_rpcs
        self._draining = False
        self._cutting_short = False
        self._calls: set[asyncio.Task[Any]] = set()  # the calls in progress: their handlers' tasks
        self._idle = asyncio.Event()
        self._idle.set()

    # --- RPCs: each runs one function on a worker thread, or a point read on the loop -----

    async def GetAdAccount(self, request: pb.GetAdAccountRequest, context: grpc.aio.ServicerContext) -> pb.AdAccount:
        if self._repository.reads_on_loop:
            return await self._run(context, self._get_on_loop, request, on_loop=True)
        return await self._run(context, self._get, request)

    async def BatchGetAdAccounts(
        self, request: pb.BatchGetAdAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetAdAccountsResponse:
        if self._repository.reads_on_loop:
            return await self._run(context, self._batch_get_on_loop, request, on_loop=True)
        return await self._run(context, self._batch_get, request)

    async def ListAdAccounts(
        self, request: pb.ListAdAccountsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdAccountsResponse:
        return await self._run(context, self._list, request)

    async def CreateAdAccount(
        self, request: pb.CreateAdAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdAccount:
        return await self._run(context, self._create, request)

    async def UpdateAdAccount(
        self, request: pb.UpdateAdAccountRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdAccount:
        return await self._run(context, self._update, request)

    async def DeleteAdAccount(
        self, request: pb.DeleteAdAccountRequest, context: grpc.aio.ServicerContext
    ) -> empty_pb2.Empty:
        return await self._run(context, self._delete, request)

    # --- the work, on a worker thread ------------------------------------------------------

    def _get(self, request: pb.GetAdAccountRequest) -> pb.AdAccount:
        return convert.to_proto(self._repository.get(convert.parse_id(request.id, "id")))

    async def _get_on_loop(self, request: pb.GetAdAccountRequest, scope: CallScope) -> pb.AdAccount:
        """_get without a worker thread: the thread handoffs cost more than the read (loop_pool)."""
        return convert.to_proto(await self._repository.get_on_loop(convert.parse_id(request.id, "id"), scope))

    def _batch_get(self, request: pb.BatchGetAdAccountsRequest) -> pb.BatchGetAdAccountsResponse:
        rows = self._repository.batch_get(convert.parse_batch_ids(list(request.ids)))
        return pb.BatchGetAdAccountsResponse(ad_accounts=[convert.to_proto(row) for row in rows])

    async def _batch_get_on_loop(
        self, request: pb.BatchGetAdAccountsRequest, scope: CallScope
    ) -> pb.BatchGetAdAccountsResponse:
        rows = await self._repository.batch_get_on_loop(convert.parse_batch_ids(list(request.ids)), scope)
        return pb.BatchGetAdAccountsResponse(ad_accounts=[convert.to_proto(row) for row in rows])

    def _list(self, request: pb.ListAdAccountsRequest) -> pb.ListAdAccountsResponse:
        filters, page_size = convert.parse_list(request)
        fingerprint = filters.fingerprint()
        after = self._page_tokens.read(request.page_token, fingerprint) if request.page_token else None
        rows, last = self._repository.list(filters, page_size, after)
        return pb.ListAdAccountsResponse(
            ad_accounts=[convert.to_proto(row) for row in rows],
            next_page_token=self._page_tokens.mint(fingerprint, last) if last else "",
        )

    def _create(self, request: pb.CreateAdAccountRequest) -> pb.AdAccount:
        new, request_id = convert.parse_create(request)
        return convert.to_proto(self._repository.create(new, request_id))

    def _update(self, request: pb.UpdateAdAccountRequest) -> pb.AdAccount:
        return convert.to_proto(self._repository.update(convert.parse_update(request)))

    def _delete(self, request: pb.DeleteAdAccountRequest) -> empty_pb2.Empty:
        self._repository.delete(convert.parse_id(request.id, "id"), request.etag)
        return empty_pb2.Empty()

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(
        self,
        context: grpc.aio.ServicerContext,
        work: Callable[..., Any],
        request: message.Message,
        *,
        on_loop: bool = False,
    ) -> Any:
        """`work(request)` on a worker thread, or with on_loop `await work(request, scope)`,
        with the call's deadline, cancellation, overload and errors handled here."""
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")
        if len(self._calls) >= self._max_in_flight:
            # Shed at once: queueing would only make every caller late.
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is overloaded ({len(self._calls)} calls in progress); retry with backoff",
            )
        self._idle.clear()
        task = asyncio.current_task()
        assert task is not None  # a handler always runs in a task of its own
        self._calls.add(task)
        remaining = context.time_remaining()
        scope = CallScope(None if remaining is None else time.monotonic() + remaining)
        try:
            if isinstance(request, MalformedRequest):
                raise errors.InvalidArgument.field("", request.description)
            if on_loop:
                return await work(request, scope)
            loop = asyncio.get_running_loop()
            # In a copy of the call's context: its trace span and request id reach the worker thread.
            call_context = contextvars.copy_context()
            return await loop.run_in_executor(self._executor, call_context.run, run_in_scope, scope, work, request)
        except asyncio.CancelledError:
            # The caller cancelled or its deadline passed: stop the query too. cancel()
            # talks to PostgreSQL, so keep it off the event loop.
            # RuntimeError: the server has stopped; its connections close with the process.
            with contextlib.suppress(RuntimeError):
                self._cancel_executor.submit(scope.cancel)
            if self._cutting_short:
                # Answered here, so that gRPC has no call left to cancel as it stops
                # (it prints a bare CancelledError traceback for each one it does).
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")
            raise
        except Exception as error:
            status = errors.to_status(error)
            # abort_with_status would replace the trailing metadata set so far (x-request-id).
            trailing = (*(context.trailing_metadata() or ()), *status.trailing_metadata)
            await context.abort(status.code, status.details, trailing)
            raise  # abort always raises; this keeps type checkers informed
        finally:
            self._calls.discard(task)
            if not self._calls:
                self._idle.set()

    def start_draining(self) -> None:
        """From now on new calls get UNAVAILABLE; calls already in progress carry on."""
        self._draining = True

    def cut_short(self) -> None:
        """End every call still in progress with UNAVAILABLE (the shutdown grace is over)."""
        self._cutting_short = True
        for task in self._calls:
            task.cancel()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in progress; False if some still are after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def in_flight(self) -> int:
        return len(self._calls)


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
    guard: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = lambda _method, handler: handler,
) -> grpc.GenericRpcHandler:
    """The service's method handlers, built from the proto descriptor, each passed
    once through `guard(full method name, handler)` (authentication, logs, metrics).

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
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
