"""What a database outage writes to the log: a bounded number of lines, none naming the
database's host or port (issue 12, row 12)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings

pytestmark = pytest.mark.faults


def test_an_outage_logs_a_bounded_number_of_lines_and_no_host(pg, caplog):
    running = RunningServer(server_settings(pg.url, DB_POOL_SIZE=4, DB_POOL_TIMEOUT=0.2, DB_CONNECT_TIMEOUT=1))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=10)
            caplog.clear()
            caplog.set_level(logging.DEBUG)
            pg.stop()

            def get(_: int) -> grpc.StatusCode:
                try:
                    stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=5)
                except grpc.RpcError as error:
                    return error.code()
                return grpc.StatusCode.OK

            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(get, range(400)))
            assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, set(codes)
            pg.start()
            wait_until(lambda: get(0) == grpc.StatusCode.OK, 15, message="calls to succeed again")
    finally:
        running.stop()
    # The per-call lines (one per call, by design) aside: what the server says about the database.
    about_database = [r for r in caplog.records if r.name != "adaccounts_server.rpc" and r.levelno >= logging.INFO]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name != "adaccounts_server.rpc")
    print(f"\n[outage] {len(about_database)} lines about the database for 400 failed calls:")
    for record in about_database[:20]:
        print(f"  {record.levelname} {record.name}: {record.getMessage()}")
    assert len(about_database) <= 12, [r.getMessage() for r in about_database]
    assert str(pg.port) not in text, "the database's port was logged"
    assert "connection to server at" not in text, "a driver message was logged"
