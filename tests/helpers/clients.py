"""What the client tests share: the client's source tree, a method name, and a fake server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
LIST_METHOD = "/adaccounts.v1.AdAccountService/ListAdAccounts"


class FakeServer:
    """A gRPC server on a free loopback port answering every method with `behaviour(request, context)`
    (bytes in, bytes out): for outcomes the real server cannot be made to produce on demand."""

    def __init__(self, behaviour: Any) -> None:
        self.behaviour = behaviour
        handler = grpc.unary_unary_rpc_method_handler(lambda request, context: self.behaviour(request, context))

        class Everything(grpc.GenericRpcHandler):
            def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
                return handler

        self._server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[Everything()])
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(None)
