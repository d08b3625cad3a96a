"""GRPC_MAX_CONCURRENT_STREAMS: one connection cannot have more calls open than that; others can."""

from __future__ import annotations

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.locks import row_lock
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings


def test_a_connection_gets_at_most_max_concurrent_streams_calls_at_once(database_url, clean_db):
    running = RunningServer(server_settings(database_url, GRPC_MAX_CONCURRENT_STREAMS=1))
    try:
        own_connection = [("grpc.use_local_subchannel_pool", 1)]  # channels would otherwise share one connection
        with (
            grpc.insecure_channel(running.target, options=own_connection) as busy,
            grpc.insecure_channel(running.target, options=own_connection) as other,
        ):
            stub = pb_grpc.AdAccountServiceStub(busy)
            account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            with row_lock(database_url, account.id):
                blocked = stub.UpdateAdAccount.future(
                    pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account.id, name="waits")), timeout=20
                )
                # The busy connection's only stream is taken: a second call on it waits for it...
                with pytest.raises(grpc.RpcError) as raised:
                    stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=1)
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                # ... while another connection is served at once.
                other_stub = pb_grpc.AdAccountServiceStub(other)
                assert other_stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=5).id == account.id
            assert blocked.result().name == "waits"
            assert stub.GetAdAccount(pb.GetAdAccountRequest(id=account.id), timeout=5).name == "waits"
    finally:
        running.stop()


def test_the_default_is_100(server):
    assert server.app.settings.GRPC_MAX_CONCURRENT_STREAMS == 100
