"""`adaccounts serve`, with AdAccountService registered either as shipped or the other way.

    python bench/serve_with_handlers.py --handlers registered|generic [SERVE ARGS...]

For bench/handler_registration.py. The server registers AdAccountService through
`adaccounts_server.app.register_service` (generic handlers, as shipped). This launcher replaces
that one function with one that registers the very same handlers the way --handlers says:
`server.add_generic_rpc_handlers(...)` or `server.add_registered_method_handlers(...)`. Nothing
in server/ knows. The launcher checks that it measures what it claims: `Server.start` is
wrapped and refuses to start (the process exits non-zero) unless the service was registered
exactly once, the way --handlers says; then it prints one line,
`handler_registration: AdAccountService registered via <handlers> handlers`, to stderr, which
the benchmark looks for in the server's log before it measures.

Only `--workers 1`: workers are fresh interpreters (spawn) that would not inherit the patch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from grpc.aio import _server as aio_server

HANDLERS = ("registered", "generic")
# What the launcher prints once the server under it has registered AdAccountService as claimed.
MARKER = "handler_registration: AdAccountService"


def marker(handlers: str) -> str:
    return f"{MARKER} registered via {handlers} handlers"


def patch(handlers: str) -> dict[str, Any]:
    """Replace app.register_service and wrap Server.start; the record of what was registered."""
    from adaccounts_server import app
    from adaccounts_server.service import SERVICE_NAME

    seen: dict[str, Any] = {"registrations": 0, "methods": []}
    original_start = aio_server.Server.start

    def register_service(server: grpc.aio.Server, method_handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        seen["registrations"] += 1
        seen["methods"] = sorted(method_handlers)
        if handlers == "generic":
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers),))
        else:
            server.add_registered_method_handlers(SERVICE_NAME, method_handlers)

    async def start(self: aio_server.Server) -> None:
        if seen["registrations"] != 1 or not seen["methods"]:
            # The health-only server starts after the main one, which registered the service
            # by then: anything else means the run would not measure what it says.
            raise RuntimeError(f"serve_with_handlers: {SERVICE_NAME} registered {seen}, not once via {handlers}")
        if not seen.get("announced"):
            seen["announced"] = True
            print(f"{marker(handlers)} ({len(seen['methods'])} methods)", file=sys.stderr, flush=True)
        await original_start(self)

    app.register_service = register_service  # type: ignore[assignment]
    aio_server.Server.start = start  # type: ignore[method-assign]
    # The class grpc.aio.server() builds is the one patched.
    assert grpc.aio.server is aio_server.server, "grpc.aio.server is not grpc.aio._server.server"
    return seen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handlers", choices=HANDLERS, required=True)
    args, serve_args = parser.parse_known_args(argv)
    if "--workers" not in serve_args or serve_args[serve_args.index("--workers") + 1 :][:1] != ["1"]:
        parser.error("pass --workers 1: worker processes would not inherit the patch")
    from adaccounts_server.cli import main as adaccounts

    patch(args.handlers)
    adaccounts(["serve", *serve_args])


if __name__ == "__main__":
    main()
