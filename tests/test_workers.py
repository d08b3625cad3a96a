"""`adaccounts serve --workers N`: several processes on one port, supervised."""

from __future__ import annotations

import os
import signal
import socket

import grpc
import psutil
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.cli import FAST_RECONNECT, pg_url, run
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.settings import PAGE_TOKEN_SECRET

# Worker processes start and stop at a loaded machine's pace.
WAIT_S = 20.0


def workers_of(pid: int) -> list[psutil.Process]:
    """The supervisor's live worker processes (multiprocessing's resource tracker aside)."""
    workers = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # gone, or a zombie, between the listing and the look
            pass
    return workers


def listening_pids(port: int) -> set[int]:
    return {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None
    }


def test_workers_share_the_port_and_a_dead_worker_is_replaced(serve, migrated_db):
    server = serve("--workers", "2", DATABASE_URL=pg_url(migrated_db), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    server.wait_serving()
    wait_until(lambda: len(workers_of(server.process.pid)) == 2, WAIT_S)
    port = int(server.target.rsplit(":", 1)[1])
    first = {p.pid for p in workers_of(server.process.pid)}
    wait_until(lambda: listening_pids(port) == first, WAIT_S)

    # Separate connections land on both workers; every one answers.
    channels = [grpc.insecure_channel(server.target, options=FAST_RECONNECT) for _ in range(8)]
    try:
        created = pb_grpc.AdAccountServiceStub(channels[0]).CreateAdAccount(
            pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10
        )
        for channel in channels:
            assert (
                pb_grpc.AdAccountServiceStub(channel).GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=10)
                == created
            )

        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        # The supervisor starts a replacement, which listens on the same port.
        wait_until(
            lambda: len(pids := {p.pid for p in workers_of(server.process.pid)}) == 2 and victim not in pids, WAIT_S
        )
        replaced = {p.pid for p in workers_of(server.process.pid)}
        assert len(replaced & first) == 1
        wait_until(lambda: listening_pids(port) == replaced, WAIT_S)
        server.wait_serving()
    finally:
        for channel in channels:
            channel.close()

    assert server.terminate() == 0
    assert not (replaced | first) & {p.pid for p in psutil.process_iter()}, "a worker outlived its supervisor"


def test_workers_stop_when_their_supervisor_is_killed(serve, migrated_db):
    server = serve("--workers", "2", DATABASE_URL=pg_url(migrated_db), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    server.wait_serving()
    wait_until(lambda: len(workers_of(server.process.pid)) == 2, WAIT_S)
    pids = [p.pid for p in workers_of(server.process.pid)]
    server.process.kill()
    server.process.wait()
    wait_until(
        lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids), WAIT_S
    )


def test_workers_refuse_a_port_that_is_taken(serve, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(port) in result.stderr


def test_sigterm_while_workers_are_still_starting_exits_0(serve, migrated_db):
    """A deploy that stops a pod right after it started: workers killed by the forwarded
    SIGTERM before they could serve lost nothing, so the supervisor still exits 0."""
    server = serve("--workers", "2", DATABASE_URL=pg_url(migrated_db), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    wait_until(lambda: "supervising 2 workers" in server.output, WAIT_S)
    assert server.terminate() == 0, server.output
    assert "all workers stopped" in server.output
