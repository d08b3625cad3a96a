"""AsyncAdAccountsClient: the same surface as the synchronous client, on grpc.aio,
against the real server and PostgreSQL. Each test runs one asyncio.run()."""

from __future__ import annotations

import asyncio
import queue
import time
import uuid

import grpc
import pytest
from adaccounts import (
    STATUS_PAUSED,
    Aborted,
    AdAccountsClient,
    AlreadyExists,
    AsyncAdAccountsClient,
    ClientClosed,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from adaccounts.v1 import ad_accounts_pb2 as pb
from helpers.clients import LIST_METHOD, FakeServer
from helpers.ports import free_port
from helpers.rpc import new_account


def test_the_async_client_has_the_same_methods_as_the_sync_one():
    public = {name for name in vars(AdAccountsClient) if not name.startswith("_")}
    assert public == {name for name in vars(AsyncAdAccountsClient) if not name.startswith("_")}


def test_every_method(server, clean_db):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(server.target) as client:
            owner = str(uuid.uuid4())
            created = await client.create(new_account(owner_id=owner, name="b"))
            assert await client.get(created.id) == created

            request_id = str(uuid.uuid4())
            body = new_account(owner_id=owner, name="a")
            other = await client.create(body, request_id=request_id)
            assert await client.create(body, request_id=request_id) == other  # a retry: the same account

            assert [a.id for a in await client.batch_get([other.id, created.id])] == [other.id, created.id]

            page = await client.list(owner_id=owner, order_by="name", page_size=1)
            assert [a.name for a in page.ad_accounts] == ["a"]
            assert page.next_page_token

            updated = await client.update(
                pb.AdAccount(id=created.id, status=STATUS_PAUSED, etag=created.etag), update_mask=["status"]
            )
            assert updated.status == STATUS_PAUSED
            assert await client.delete(updated.id, etag=updated.etag) is None
            assert [a.id async for a in client.iter_ad_accounts(owner_id=owner)] == [other.id]

    asyncio.run(scenario())


def test_iter_ad_accounts_fetches_pages_lazily(server, clean_db):
    class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
        def __init__(self) -> None:
            self.methods: list[str] = []

        async def intercept_unary_unary(self, continuation, client_call_details, request):
            method = client_call_details.method  # bytes in grpc.aio
            self.methods.append(method.decode() if isinstance(method, bytes) else method)
            return await continuation(client_call_details, request)

    async def scenario() -> None:
        recorder = Recorder()
        async with AsyncAdAccountsClient(server.target, interceptors=[recorder]) as client:
            owner = str(uuid.uuid4())
            ids = [(await client.create(new_account(owner_id=owner))).id for _ in range(7)]
            recorder.methods.clear()

            walk = client.iter_ad_accounts(owner_id=owner, page_size=3)
            first = [await anext(walk) for _ in range(4)]
            assert recorder.methods == [LIST_METHOD] * 2  # the second page, only for the fourth item
            rest = [a async for a in walk]
            assert [a.id for a in first + rest] == ids
            assert len(recorder.methods) == 3

    asyncio.run(scenario())


def test_errors_map_to_the_same_exceptions(server, clean_db):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(server.target) as client:
            with pytest.raises(InvalidArgument) as invalid:
                await client.get("nope")
            assert [v.field for v in invalid.value.field_violations] == ["id"]
            assert isinstance(invalid.value.__cause__, grpc.aio.AioRpcError)

            with pytest.raises(NotFound):
                await client.get(str(uuid.uuid4()))

            account = new_account()
            created = await client.create(account)
            with pytest.raises(AlreadyExists):
                await client.create(account)

            await client.update(pb.AdAccount(id=created.id, name="changed"), update_mask=["name"])
            with pytest.raises(Aborted) as aborted:
                await client.delete(created.id, etag=created.etag)
            assert aborted.value.code == grpc.StatusCode.ABORTED
            assert aborted.value.request_id

            with pytest.raises(InvalidArgument) as label:  # before anything is sent
                await client.list(platforms=["META"])
            assert [v.field for v in label.value.field_violations] == ["platforms"]

        # Never reached a server: ConnectionFailed (an Unavailable), whether the wait for a
        # connection ends at connect_timeout or at the deadline, with the reason.
        async with AsyncAdAccountsClient(f"127.0.0.1:{free_port()}", connect_timeout=0.2) as nowhere:
            with pytest.raises(Unavailable) as caught:
                await nowhere.get(str(uuid.uuid4()))
            assert isinstance(caught.value, ConnectionFailed)
            assert "Connection refused" in caught.value.details
        async with AsyncAdAccountsClient(f"127.0.0.1:{free_port()}", wait_for_ready=True, timeout=0.3) as waiting:
            with pytest.raises(ConnectionFailed):
                await waiting.get(str(uuid.uuid4()))

    asyncio.run(scenario())


def test_a_deadline_passed_at_a_server_raises_deadline_exceeded():
    async def scenario() -> None:
        # Deliberately slower than the client's 0.3 s deadline.
        with FakeServer(lambda request, context: time.sleep(1.0) or b"") as fake:
            async with AsyncAdAccountsClient(fake.target, timeout=0.3) as client:
                with pytest.raises(DeadlineExceeded) as caught:
                    await client.get(str(uuid.uuid4()))
                assert caught.value.request_id  # the one it was sent with

    asyncio.run(scenario())


def test_a_closed_client_raises_client_closed(server):
    async def scenario() -> None:
        client = AsyncAdAccountsClient(server.target)
        await client.close()
        with pytest.raises(ClientClosed):
            await client.get(str(uuid.uuid4()))
        with pytest.raises(ClientClosed):
            [a async for a in client.iter_ad_accounts()]

        arrivals: queue.Queue[None] = queue.Queue()

        def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
            arrivals.put(None)
            time.sleep(2)  # deliberately: still answering when the call is ended
            return b""

        with FakeServer(slow) as fake:
            client = AsyncAdAccountsClient(fake.target)
            call = asyncio.ensure_future(client.get(str(uuid.uuid4())))
            await asyncio.to_thread(arrivals.get, timeout=5)  # the call reached the server
            await client.close()
            with pytest.raises(ClientClosed):
                await call

            async with AsyncAdAccountsClient(fake.target) as client:  # the caller's own cancellation stays one
                call = asyncio.ensure_future(client.get(str(uuid.uuid4())))
                await asyncio.to_thread(arrivals.get, timeout=5)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call

    asyncio.run(scenario())


def test_concurrent_calls_spread_over_connections(server, clean_db):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(server.target, connections=2, timeout=5) as client:
            created = await client.create(new_account())
            fetched = await asyncio.gather(*(client.get(created.id) for _ in range(50)))
            assert all(a == created for a in fetched)

    asyncio.run(scenario())
