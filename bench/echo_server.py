"""A bare gRPC echo server: the ceiling for GetAdAccount on the same server settings.

It is what the real server does for a point read minus the database and the service's own
code: a grpc.aio server with the same options (read from the same settings), each call
answered on the event loop with a prebuilt AdAccount of a point read's size, as
GetAdAccount's read is awaited on the event loop without a worker thread.
GetAdAccount ÷ this is how much of the cost of a call is the database path rather than
gRPC itself.

    python bench/echo_server.py --port P [--workers N] [--handlers registered|generic]

With --workers N it runs N processes sharing the port (SO_REUSEPORT), like `adaccounts
serve --workers N`, so the comparison is with the same number of processes.

--handlers says how the echo method is registered: `generic` (the default), through
`server.add_generic_rpc_handlers`, as the real server registers AdAccountService
(docs/decisions/0008); or `registered`, through `server.add_registered_method_handlers`.
bench/handler_registration.py measures one against the other.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal

import grpc
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts_server.config import load_settings
from google.protobuf import timestamp_pb2

SERVICE = "adaccounts.bench.Echo"
HANDLERS = ("registered", "generic")

# What GetAdAccount returns for a seeded row, so that the bytes on the wire match.
ANSWER = pb.AdAccount(
    id="0b8e5d7e-6f6a-4b8e-9c1e-2f3a4b5c6d7e",
    owner_id="7c9e6679-7425-40de-944b-e07fc1f90ae7",
    platform=pb.PLATFORM_META,
    external_id="ext_12345",
    name="Account 12345",
    currency_code="EUR",
    time_zone="Europe/Paris",
    status=pb.STATUS_ACTIVE,
    create_time=timestamp_pb2.Timestamp(seconds=1767225600),
    update_time=timestamp_pb2.Timestamp(seconds=1767225600),
    etag='W/"1"',
)


async def serve(port: int, reuse_port: bool, handlers: str = "generic") -> None:
    settings = load_settings()
    options = [
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", settings.GRPC_MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", settings.GRPC_MAX_MESSAGE_BYTES),
    ]
    streams = getattr(settings, "GRPC_MAX_CONCURRENT_STREAMS", None)
    if streams is not None:
        options.append(("grpc.max_concurrent_streams", streams))
    server = grpc.aio.server(options=options)

    async def echo(request: pb.GetAdAccountRequest, context: grpc.aio.ServicerContext) -> pb.AdAccount:
        return ANSWER

    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=pb.GetAdAccountRequest.FromString, response_serializer=pb.AdAccount.SerializeToString
    )
    if handlers == "registered":
        server.add_registered_method_handlers(SERVICE, {"Echo": handler})
    elif handlers == "generic":
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
    else:
        raise ValueError(f"handlers: {handlers!r}, not one of {HANDLERS}")
    server.add_insecure_port(f"{settings.GRPC_HOST}:{port}")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def _worker(port: int, handlers: str) -> None:
    asyncio.run(serve(port, reuse_port=True, handlers=handlers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--handlers",
        choices=HANDLERS,
        default="generic",
        help="how the echo method is registered: generic (the default, as the server) or registered",
    )
    args = parser.parse_args()
    if args.workers == 1:
        asyncio.run(serve(args.port, reuse_port=False, handlers=args.handlers))
        return
    # The supervisor only waits: SIGTERM is forwarded to the workers, which stop on it.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(args.port, args.handlers)) for _ in range(args.workers)]
    for worker in workers:
        worker.start()

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                worker.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
