"""Read-your-writes in the client: the consistency token (x-consistency-token).

The server returns a token in the trailers of writes (and of reads, when it reads from
replicas); the client keeps the greatest it has seen and sends it with every read. Checked
against a fake AdAccountService in this process, which records the metadata each call
brings and answers with the trailers a test chooses: no replicas needed.

The fake takes the token to answer with from the request itself (a get's id, a create's or
update's name, a list's owner_id, a batch's first id, a delete's id): "<token>" or
"<token>@<tag>" answers with that token, "fail:<token>..." fails the call (NOT_FOUND) with
it, and "" sends none.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest
from adaccounts import (
    CONSISTENCY_TOKEN_KEY,
    AdAccount,
    AdAccountsClient,
    AsyncAdAccountsClient,
    InvalidArgument,
    InvalidConsistencyToken,
    NotFound,
)
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import empty_pb2

A = "0000000001000000"
B = "0000000002000000"
C = "00000000030000a0"
OLDER = "0000000000ffffff"

READS = {"GetAdAccount", "BatchGetAdAccounts", "ListAdAccounts"}


@dataclass(frozen=True)
class Seen:
    method: str
    key: str  # what the fake read its answer from (a get's id, a create's name…)
    tokens: tuple[str, ...]  # every x-consistency-token value the call brought


class FakeService(pb_grpc.AdAccountServiceServicer):
    """Records each call's x-consistency-token values; answers as the module docstring says."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[Seen] = []

    def _answer(self, method: str, key: str, context: grpc.ServicerContext) -> None:
        tokens = tuple(value for name, value in context.invocation_metadata() if name == CONSISTENCY_TOKEN_KEY)
        with self.lock:
            self.calls.append(Seen(method, key, tokens))
        failing = key.startswith("fail:")
        token = key.removeprefix("fail:").split("@", 1)[0]
        if token:
            context.set_trailing_metadata(((CONSISTENCY_TOKEN_KEY, token),))
        if failing:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such account (as the test asked)")

    def GetAdAccount(self, request: pb.GetAdAccountRequest, context: grpc.ServicerContext) -> pb.AdAccount:
        self._answer("GetAdAccount", request.id, context)
        return pb.AdAccount(id=request.id)

    def BatchGetAdAccounts(
        self, request: pb.BatchGetAdAccountsRequest, context: grpc.ServicerContext
    ) -> pb.BatchGetAdAccountsResponse:
        self._answer("BatchGetAdAccounts", request.ids[0] if request.ids else "", context)
        return pb.BatchGetAdAccountsResponse(ad_accounts=[pb.AdAccount(id=id) for id in request.ids])

    def ListAdAccounts(
        self, request: pb.ListAdAccountsRequest, context: grpc.ServicerContext
    ) -> pb.ListAdAccountsResponse:
        # Pages: the owner_id's tokens, comma-separated, one page each ("A,B": two pages).
        pages = request.owner_id.split(",")
        index = int(request.page_token or 0)
        self._answer("ListAdAccounts", pages[index], context)
        more = index + 1 < len(pages)
        return pb.ListAdAccountsResponse(
            ad_accounts=[pb.AdAccount(id=f"page-{index}")], next_page_token=str(index + 1) if more else ""
        )

    def CreateAdAccount(self, request: pb.CreateAdAccountRequest, context: grpc.ServicerContext) -> pb.AdAccount:
        self._answer("CreateAdAccount", request.ad_account.name, context)
        return request.ad_account

    def UpdateAdAccount(self, request: pb.UpdateAdAccountRequest, context: grpc.ServicerContext) -> pb.AdAccount:
        self._answer("UpdateAdAccount", request.ad_account.name, context)
        return request.ad_account

    def DeleteAdAccount(self, request: pb.DeleteAdAccountRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._answer("DeleteAdAccount", request.id, context)
        return empty_pb2.Empty()

    def tokens_sent(self) -> list[tuple[str, ...]]:
        with self.lock:
            return [call.tokens for call in self.calls]

    def last(self) -> Seen:
        with self.lock:
            return self.calls[-1]


@dataclass
class Fake:
    service: FakeService
    target: str


@pytest.fixture(autouse=True, scope="module")
def _grpcs_close_race_is_not_this_modules() -> Iterator[None]:
    """Closing a sync channel that gRPC watches (AdAccountsClient subscribes to its connectivity)
    can make gRPC's watcher thread, if it is between two polls just then, fail with "Cannot monitor
    channel state: Channel closed!" (grpcio 1.85; harmless). This module closes a client per test,
    so it would now and then fail on that alone: exactly that error, from that thread, is let through."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, ValueError) and "Cannot monitor channel state" in str(args.exc_value)):
            previous(args)

    threading.excepthook = hook
    yield
    time.sleep(0.3)  # the watcher of the last client closed polls every 0.2 s
    threading.excepthook = previous


@pytest.fixture
def fake() -> Iterator[Fake]:
    service = FakeService()
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_AdAccountServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Fake(service, f"127.0.0.1:{port}")
    finally:
        server.stop(None)


@pytest.fixture
def client(fake: Fake) -> Iterator[AdAccountsClient]:
    with AdAccountsClient(fake.target, timeout=5) as client:
        yield client


def named(token: str) -> AdAccount:
    """An account for the fake to create or update, answering with `token`."""
    return AdAccount(name=token)


# --- the sync client ----------------------------------------------------------------------------


def test_nothing_is_sent_before_the_client_has_a_token(client, fake):
    assert client.consistency_token is None
    client.get("")
    client.batch_get([""])
    client.list(owner_id="", consistency_token=None)  # None: no token of the call's own
    list(client.iter_ad_accounts(owner_id=","))
    assert fake.service.tokens_sent() == [(), (), (), (), ()]
    assert client.consistency_token is None


def test_after_a_write_every_read_sends_its_token_and_writes_send_none(client, fake):
    client.create(named(A))
    assert client.consistency_token == A
    client.get("")
    client.batch_get(["", "x"])
    client.list(owner_id="")
    assert [a.id for a in client.iter_ad_accounts(owner_id=",")] == ["page-0", "page-1"]
    client.update(named(""))
    client.delete("")
    sent = {(call.method, call.tokens) for call in fake.service.calls}
    assert sent == {
        ("CreateAdAccount", ()),
        ("GetAdAccount", (A,)),
        ("BatchGetAdAccounts", (A,)),
        ("ListAdAccounts", (A,)),
        ("UpdateAdAccount", ()),
        ("DeleteAdAccount", ()),
    }


def test_the_token_only_goes_up(client, fake):
    client.create(named(B))
    client.update(named(OLDER))  # a write answered by an older state (another primary's token, a bug…)
    client.get(A)  # a read from a replica that says it is at A < B
    assert client.consistency_token == B
    client.get("")
    assert fake.service.last().tokens == (B,)
    client.delete(C)
    assert client.consistency_token == C
    client.get("")
    assert fake.service.last().tokens == (C,)


def test_a_reads_token_raises_the_clients_for_the_reads_after_it(client, fake):
    """Monotonic reads: a read answered at C makes every later read ask for C at least."""
    client.create(named(A))
    client.get(C)
    client.get("")
    assert fake.service.tokens_sent() == [(), (A,), (C,)]


def test_each_page_of_a_walk_sends_the_greatest_token_so_far(client, fake):
    client.create(named(A))
    pages = list(client.iter_ad_accounts(owner_id=f"{B},{OLDER},"))
    assert len(pages) == 3
    assert fake.service.tokens_sent()[1:] == [(A,), (B,), (B,)]
    assert client.consistency_token == B


def test_a_token_from_a_failed_call_is_kept(client, fake):
    with pytest.raises(NotFound):
        client.update(named(f"fail:{B}"))
    assert client.consistency_token == B
    with pytest.raises(NotFound):
        client.get(f"fail:{C}")
    assert client.consistency_token == C
    client.get("")
    assert fake.service.last().tokens == (C,)


def test_a_malformed_token_from_the_server_is_ignored(client, fake):
    client.create(named(A))
    for bad in ("00000000030000A0", "1" * 15, "1" * 17, "zzzzzzzzzzzzzzzz", "ffffffffffffffff "):
        client.update(named(bad))
    assert client.consistency_token == A
    client.get("")
    assert fake.service.last().tokens == (A,)


def test_observe_consistency_token_raises_the_floor_and_never_lowers_it(client, fake):
    client.observe_consistency_token(B)
    assert client.consistency_token == B
    client.get("")
    assert fake.service.last().tokens == (B,)
    client.observe_consistency_token(A)  # older: changes nothing
    client.observe_consistency_token(C.upper())  # hex digits in either case, sent lowercase
    assert client.consistency_token == C
    client.list(owner_id="")
    assert fake.service.last().tokens == (C,)


def test_a_reads_own_token_is_sent_when_greater_without_changing_the_clients(client, fake):
    client.create(named(B))
    client.get("", consistency_token=C)
    client.get("", consistency_token=A)
    client.batch_get([""], consistency_token=C)
    client.list(owner_id="", consistency_token=C)
    list(client.iter_ad_accounts(owner_id=",", consistency_token=C))
    assert fake.service.tokens_sent()[1:] == [(C,), (B,), (C,), (C,), (C,), (C,)]
    assert client.consistency_token == B  # the server sent no newer one


def test_a_token_in_the_metadata_or_from_the_provider_is_merged_into_one(fake):
    provided: list[tuple[str, str]] = []
    with AdAccountsClient(fake.target, metadata_provider=lambda: provided) as client:
        client.get("", metadata=[(CONSISTENCY_TOKEN_KEY, A)])
        client.create(named(B))
        client.get("", metadata=[("X-Consistency-Token", A)])
        client.get("", metadata=[(CONSISTENCY_TOKEN_KEY, C)])
        provided.append((CONSISTENCY_TOKEN_KEY, C))
        client.batch_get([""])
    assert fake.service.tokens_sent() == [(A,), (), (B,), (C,), (C,)]


MALFORMED = ["", "123", "0x00000001000000", "00000000010000g0", " 0000000001000000", "00000000010000001", 1, b"0" * 16]


@pytest.mark.parametrize("bad", MALFORMED)
def test_a_malformed_token_from_the_caller_raises_before_anything_is_sent(client, fake, bad):
    with pytest.raises(ValueError, match="consistency token") as raised:
        client.observe_consistency_token(bad)
    assert isinstance(raised.value, InvalidArgument)
    for read in (
        lambda: client.get("", consistency_token=bad),
        lambda: client.batch_get([""], consistency_token=bad),
        lambda: client.list(consistency_token=bad),
        lambda: next(client.iter_ad_accounts(consistency_token=bad)),
        lambda: client.get("", metadata=[(CONSISTENCY_TOKEN_KEY, bad)]),
    ):
        with pytest.raises(InvalidConsistencyToken) as raised:
            read()
        assert isinstance(raised.value, InvalidArgument)
        assert isinstance(raised.value, ValueError)
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        (violation,) = raised.value.field_violations
        assert violation.field.endswith(("consistency_token", CONSISTENCY_TOKEN_KEY))
    assert fake.service.calls == []
    assert client.consistency_token is None


def test_many_threads_each_read_their_own_writes_and_the_client_keeps_the_greatest(fake):
    """One client shared by threads: each thread's read sends at least its own last write's token and
    at least what its previous read sent; in the end the client holds the greatest of all."""
    threads, rounds = 8, 60
    rng = random.Random(7)
    plans = [[f"{rng.getrandbits(63):016x}" for _ in range(rounds)] for _ in range(threads)]
    with AdAccountsClient(fake.target, timeout=10, connections=2) as client:

        def work(thread: int) -> None:
            for step, token in enumerate(plans[thread]):
                client.create(named(f"{token}@{thread}-{step}"))
                client.get(f"@{thread}-{step}")

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        final = client.consistency_token

    assert final == max(token for plan in plans for token in plan)
    reads = {call.key: call.tokens for call in fake.service.calls if call.method == "GetAdAccount"}
    for thread, plan in enumerate(plans):
        previous = ""
        for step, written in enumerate(plan):
            (sent,) = reads[f"@{thread}-{step}"]
            assert sent >= written, (thread, step)  # read-your-writes
            assert sent >= previous, (thread, step)  # monotonic reads
            previous = sent


def test_the_token_floor_under_contention_keeps_the_maximum():
    """The floor itself, hammered from threads without the network in between."""
    from adaccounts._common import TokenFloor

    floor = TokenFloor()
    tokens = [f"{value:016x}" for value in random.Random(3).sample(range(1 << 40), 20_000)]
    chunks = [tokens[i::8] for i in range(8)]

    def raise_all(chunk: list[str]) -> None:
        for token in chunk:
            floor.raise_to(token)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(raise_all, chunks))
    assert floor.value == max(tokens)


# --- the asyncio client --------------------------------------------------------------------------


def test_the_async_client_does_the_same(fake):
    async def scenario() -> None:
        async with AsyncAdAccountsClient(fake.target, timeout=5) as client:
            assert client.consistency_token is None
            await client.get("")  # nothing before a token
            await client.create(named(B))  # a write: B
            await client.get("")
            await client.batch_get([""])
            await client.list(owner_id="")
            await client.update(named(OLDER))  # older: not lowered
            assert [a.id async for a in client.iter_ad_accounts(owner_id=f"{A},")] == ["page-0", "page-1"]
            assert client.consistency_token == B
            with pytest.raises(NotFound):
                await client.delete(f"fail:{C}")  # kept from a failed call
            assert client.consistency_token == C
            await client.get("", consistency_token="00000000040000ff")  # the call's own, greater
            client.observe_consistency_token(A)  # older: changes nothing
            await client.get("")
            with pytest.raises(ValueError, match="not a consistency token"):
                client.observe_consistency_token("not a token")
            with pytest.raises(InvalidConsistencyToken):
                await client.get("", consistency_token="not a token")
            await client.get("", metadata=[(CONSISTENCY_TOKEN_KEY, "00000000050000ff")])
            assert client.consistency_token == C

    asyncio.run(scenario())
    assert [(call.method, call.tokens) for call in fake.service.calls] == [
        ("GetAdAccount", ()),
        ("CreateAdAccount", ()),
        ("GetAdAccount", (B,)),
        ("BatchGetAdAccounts", (B,)),
        ("ListAdAccounts", (B,)),
        ("UpdateAdAccount", ()),
        ("ListAdAccounts", (B,)),
        ("ListAdAccounts", (B,)),
        ("DeleteAdAccount", ()),
        ("GetAdAccount", ("00000000040000ff",)),
        ("GetAdAccount", (C,)),
        ("GetAdAccount", ("00000000050000ff",)),
    ]


def test_concurrent_async_tasks_keep_the_greatest_token(fake):
    tokens = [f"{value:016x}" for value in random.Random(11).sample(range(1 << 50), 200)]

    async def scenario() -> str | None:
        async with AsyncAdAccountsClient(fake.target, timeout=10) as client:

            async def write_then_read(token: str) -> None:
                await client.create(named(token))
                await client.get(f"@{token}")

            await asyncio.gather(*(write_then_read(token) for token in tokens))
            return client.consistency_token

    assert asyncio.run(scenario()) == max(tokens)
    reads = {call.key: call.tokens for call in fake.service.calls if call.method == "GetAdAccount"}
    for token in tokens:
        (sent,) = reads[f"@{token}"]
        assert sent >= token


def test_both_clients_offer_the_same_consistency_api():
    for name in ("consistency_token", "observe_consistency_token"):
        assert hasattr(AdAccountsClient, name)
        assert hasattr(AsyncAdAccountsClient, name)
    assert not asyncio.iscoroutinefunction(AsyncAdAccountsClient.observe_consistency_token)


# --- through interceptors -----------------------------------------------------------------------


class PassThrough(grpc.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls += 1
        return continuation(client_call_details, request)


class AsyncPassThrough(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self.calls += 1
        return await continuation(client_call_details, request)


def test_tokens_come_and_go_through_the_callers_interceptors(fake):
    sync_interceptor, async_interceptor = PassThrough(), AsyncPassThrough()
    with AdAccountsClient(fake.target, interceptors=[sync_interceptor]) as client:
        client.create(named(A))
        client.get("")
        with pytest.raises(NotFound):
            client.get(f"fail:{B}")
        client.get("")
        assert client.consistency_token == B

    async def scenario() -> str | None:
        async with AsyncAdAccountsClient(fake.target, interceptors=[async_interceptor]) as client:
            await client.create(named(A))
            await client.get("")
            with pytest.raises(NotFound):
                await client.get(f"fail:{B}")
            await client.get("")
            return client.consistency_token

    assert asyncio.run(scenario()) == B
    assert sync_interceptor.calls == 4
    assert async_interceptor.calls == 4
    assert fake.service.tokens_sent() == [(), (A,), (A,), (B,)] * 2


# --- what it costs -------------------------------------------------------------------------------


def test_reading_the_trailers_costs_little_per_call(client, fake):
    """with_call instead of __call__, a lock-free read of the floor and one more metadata pair: a
    loose bound, far below a call's own cost, so that only a gross regression fails it."""
    client.create(named(A))
    for _ in range(50):
        client.get("")  # warm up
    calls = 300
    started = time.perf_counter()
    for _ in range(calls):
        client.get("")
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 0.02, f"{per_call * 1e3:.2f} ms per get"
