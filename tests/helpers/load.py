"""Steady mixed load from client threads, and what became of every call (the fault tests, the soak)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import grpc
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2

from .polling import wait_until
from .rpc import code_of, new_account

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# A deadline long enough that no call under test ever runs out of it: the only
# errors should be the database's, not the caller's impatience.
CALL_TIMEOUT_S = 10.0


def codes_text(counts: Counter) -> str:
    return ", ".join(f"{code.name} {n}" for code, n in counts.most_common()) or "none"


@dataclass(frozen=True)
class Outcome:
    thread: int
    method: str
    started: float
    ended: float
    code: grpc.StatusCode
    details: str


class Load:
    """`threads` client threads, each calling a steady mix of Get/List/Create/Update/Delete on
    accounts of its own (so that no call of one thread makes another's fail) until stopped.

    With `record`, every outcome is kept (for the fault tests' timelines); without, only counts
    (for the soak, whose memory is being measured).
    """

    MIX = (("GetAdAccount", 35), ("ListAdAccounts", 15), ("CreateAdAccount", 20), ("UpdateAdAccount", 25))
    KEEP_PER_THREAD = 12  # past this many accounts of its own, a thread deletes its oldest

    def __init__(self, target: str, threads: int = 6, *, record: bool = True, seed: int = 5) -> None:
        self.channel = grpc.insecure_channel(target)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pb_grpc.AdAccountServiceStub(self.channel)
        self.owner = str(uuid.uuid4())
        self.record = record
        self.outcomes: list[Outcome] = []
        self.counts: Counter[tuple[str, grpc.StatusCode]] = Counter()
        self.last_ok = [0.0] * threads
        self.unexpected: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owned = [[self._create_seed(i) for _ in range(3)] for i in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(i, random.Random(seed + i)), name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def _create_seed(self, thread: int) -> str:
        account = new_account(owner_id=self.owner, external_id=f"load_{uuid.uuid4().hex[:12]}", name=f"t{thread}")
        return self.stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=account), timeout=CALL_TIMEOUT_S).id

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a load thread never finished"
        self.channel.close()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        if not self._stop.is_set():
            self.stop()

    # --- the calls ------------------------------------------------------------------------------

    def _run(self, index: int, rng: random.Random) -> None:
        methods, weights = zip(*self.MIX, strict=True)
        owned = self._owned[index]
        n = 0
        while not self._stop.is_set():
            n += 1
            method = rng.choices(methods, weights)[0]
            if len(owned) > self.KEEP_PER_THREAD:
                method = "DeleteAdAccount"
            started = time.monotonic()
            code, details = code_of(lambda method=method, n=n: self._call(method, index, n, owned, rng))
            ended = time.monotonic()
            outcome = Outcome(index, method, started, ended, code, details)
            with self._lock:
                self.counts[method, code] += 1
                if code == OK:
                    self.last_ok[index] = ended
                if self.record:
                    self.outcomes.append(outcome)
                if code not in (OK, UNAVAILABLE):
                    self.unexpected.append(outcome)

    def _call(self, method: str, index: int, n: int, owned: list[str], rng: random.Random) -> None:
        stub, timeout = self.stub, CALL_TIMEOUT_S
        if method == "GetAdAccount":
            stub.GetAdAccount(pb.GetAdAccountRequest(id=rng.choice(owned)), timeout=timeout)
        elif method == "ListAdAccounts":
            stub.ListAdAccounts(pb.ListAdAccountsRequest(owner_id=self.owner, page_size=20), timeout=timeout)
        elif method == "CreateAdAccount":
            account = new_account(owner_id=self.owner, external_id=f"load_{uuid.uuid4().hex[:12]}", name=f"t{index}")
            owned.append(stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=account), timeout=timeout).id)
        elif method == "UpdateAdAccount":
            stub.UpdateAdAccount(
                pb.UpdateAdAccountRequest(
                    ad_account=pb.AdAccount(id=rng.choice(owned), name=f"t{index}-{n}"),
                    update_mask=field_mask_pb2.FieldMask(paths=["name"]),
                ),
                timeout=timeout,
            )
        else:
            # Whatever the outcome, never use this account again: a Delete that failed with
            # UNAVAILABLE may still have committed.
            stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=owned.pop(0)), timeout=timeout)

    # --- what happened --------------------------------------------------------------------------

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def counts_by_code(self) -> Counter:
        with self._lock:
            counts: Counter[grpc.StatusCode] = Counter()
            for (_, code), n in self.counts.items():
                counts[code] += n
            return counts

    def successes(self) -> int:
        with self._lock:
            return sum(n for (_, code), n in self.counts.items() if code == OK)

    def codes(self, started_after: float = 0.0, started_before: float = float("inf")) -> Counter:
        with self._lock:
            return Counter(o.code for o in self.outcomes if started_after <= o.started < started_before)

    def first_ok_after(self, moment: float) -> float | None:
        """When the first call that ended after `moment` succeeded."""
        with self._lock:
            ends = [o.ended for o in self.outcomes if o.code == OK and o.ended > moment]
        return min(ends) if ends else None

    def all_recovered_after(self, moment: float) -> bool:
        with self._lock:
            return all(last > moment for last in self.last_ok)

    def wait_for_successes(self, count: int, timeout: float = 10.0) -> None:
        wait_until(
            lambda: self.successes() >= count,
            timeout,
            message=f"{count} successful calls",
        )
