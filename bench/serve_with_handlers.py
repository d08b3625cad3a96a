"""`adaccounts serve`, with AdAccountService registered either as shipped or as generic handlers.

    python bench/serve_with_handlers.py --handlers registered|generic [SERVE ARGS...]

For bench/handler_registration.py. The server registers AdAccountService through
`server.add_registered_method_handlers` (server/adaccounts_server/app.py). With
`--handlers generic` this launcher patches `grpc.aio._server.Server.add_registered_method_handlers`
so that, for AdAccountService only, the very same handlers go through
`server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(...),))` instead, as the
server did before; every other service (health, reflection) is registered as shipped. With
`--handlers registered` the method is only observed, not changed. Nothing in server/ knows.

Either way the launcher checks that it measures what it claims: `Server.start` is wrapped, and
refuses to start (the process exits non-zero) unless AdAccountService went through
add_registered_method_handlers exactly once and came out registered the way --handlers says,
and was never also handed to add_generic_rpc_handlers by anyone else. On success it prints one
line, `handler_registration: AdAccountService ... via <handlers> handlers`, to stderr, which
the benchmark looks for in the server's log before it measures.

Only `--workers 1`: workers are fresh interpreters (spawn) that would not inherit the patch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc.aio import _server as aio_server

HANDLERS = ("registered", "generic")
# What the launcher prints once the server under it has registered AdAccountService as claimed.
MARKER = "handler_registration: AdAccountService"


def marker(handlers: str) -> str:
    return f"{MARKER} registered via {handlers} handlers"


def patch(handlers: str, service_name: str) -> dict[str, Any]:
    """Wrap the aio Server's registration methods and start(); the record of what they saw."""
    seen: dict[str, Any] = {"registered": 0, "generic": 0, "foreign_generic": 0, "methods": []}
    original_registered = aio_server.Server.add_registered_method_handlers
    original_generic = aio_server.Server.add_generic_rpc_handlers
    original_start = aio_server.Server.start
    ours = set()  # the generic handlers this launcher itself added

    def add_registered_method_handlers(
        self: aio_server.Server, name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        if name != service_name:
            original_registered(self, name, method_handlers)
            return
        seen["methods"] = sorted(method_handlers)
        if handlers == "generic":
            generic = grpc.method_handlers_generic_handler(name, method_handlers)
            ours.add(id(generic))
            original_generic(self, (generic,))
            seen["generic"] += 1
        else:
            original_registered(self, name, method_handlers)
            seen["registered"] += 1

    def add_generic_rpc_handlers(self: aio_server.Server, generic_rpc_handlers: Sequence[Any]) -> None:
        for handler in generic_rpc_handlers:
            if id(handler) not in ours and getattr(handler, "service_name", lambda: None)() == service_name:
                seen["foreign_generic"] += 1
        original_generic(self, generic_rpc_handlers)

    async def start(self: aio_server.Server) -> None:
        if not seen["methods"]:
            # The health-only server (GRPC_HEALTH_PORT) starts after the main one, so the service
            # was registered by then; a server that starts with nothing seen registered it some
            # other way, and the run would not measure what it says.
            raise RuntimeError(
                f"serve_with_handlers: {service_name} was never registered through "
                "add_registered_method_handlers: the patch took no effect"
            )
        expected = {"registered": 1, "generic": 0} if handlers == "registered" else {"registered": 0, "generic": 1}
        actual = {key: seen[key] for key in expected}
        if actual != expected or seen["foreign_generic"]:
            raise RuntimeError(f"serve_with_handlers: {service_name} registered {seen}, not as --handlers {handlers}")
        if not seen.get("announced"):
            seen["announced"] = True
            print(f"{marker(handlers)} ({len(seen['methods'])} methods)", file=sys.stderr, flush=True)
        await original_start(self)

    aio_server.Server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign]
    aio_server.Server.add_generic_rpc_handlers = add_generic_rpc_handlers  # type: ignore[method-assign]
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
    from adaccounts_server.service import SERVICE_NAME

    patch(args.handlers, SERVICE_NAME)
    adaccounts(["serve", *serve_args])


if __name__ == "__main__":
    main()
