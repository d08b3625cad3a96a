"""`adaccounts`: serve, migrate, check.

Exit codes: 0 success; 1 the operation failed (database unreachable, probe not
SERVING, port taken, a migration failed); 2 bad usage or an invalid setting;
3 (migrate) timed out on a lock or a statement: the failing revision was not
applied, and a retry is safe.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adaccounts", description="gRPC data service for ad accounts")
    parser.add_argument("--version", action=_PrintVersion, help="print the server's and the contract's versions")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    serve.add_argument("--host", help="interface to listen on (GRPC_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on, 0 for any free one (GRPC_PORT)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (GRPC_WORKERS; default 1)")

    migrate = commands.add_parser(
        "migrate",
        help="upgrade the database to the current schema (alembic upgrade head)",
        description="Apply every migration not yet applied, one at a time per database "
        "(MIGRATION_DATABASE_URL, else DATABASE_URL). Exit 0 applied or already current; "
        "1 failed; 2 invalid setting; 3 timed out on a lock or statement (retry).",
    )
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL instead of running it (offline: no database connection)"
    )
    migrate.add_argument(
        "--from",
        dest="since",
        metavar="REVISION",
        help="with --sql: only the revisions after this one (default: from an empty database)",
    )

    check = commands.add_parser("check", help="ask a server's grpc.health.v1 service; exit 0 when SERVING")
    check.add_argument("--target", help="host:port of the server (default: localhost:GRPC_PORT)")
    check.add_argument("--service", default="", help="health service name (default: '' = the whole server)")
    check.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    check.add_argument("--ca", metavar="FILE", help="connect with TLS, trusting this CA (PEM): GRPC_TLS=tls|mtls")
    check.add_argument("--cert", metavar="FILE", help="with --ca: a client certificate (PEM), for GRPC_TLS=mtls")
    check.add_argument("--key", metavar="FILE", help="the private key (PEM) of --cert")

    args = parser.parse_args(argv)
    sys.exit({"serve": _serve, "migrate": _migrate, "check": _check}[args.command](args))


def version() -> str:
    """`adaccounts 0.1.0 (contract adaccounts.v1, client 1.0.1)`: this server's distribution, the
    proto package it serves and the adaccounts-client distribution that carries that contract."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import adaccounts
    from adaccounts.v1 import ad_accounts_pb2

    try:
        server = installed("adaccounts-server")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        server = "unknown"
    return f"adaccounts {server} (contract {ad_accounts_pb2.DESCRIPTOR.package}, client {adaccounts.__version__})"


class _PrintVersion(argparse.Action):
    """argparse's "version" action, computed only when asked (it imports the generated contract)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(version())
        parser.exit()


def _settings(*, serving: bool = True, **overrides: object) -> Settings:
    """The settings, or exit 2 with one line. `serving=False`: only what every command needs
    (the database URL), not what only `serve` uses (PAGE_TOKEN_SECRET, TLS, tokens)."""
    from .config import SettingsError, load_settings

    try:
        return load_settings(serving=serving, **{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as error:
        print(f"adaccounts: invalid setting {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _configure_logging(level: str, log_format: str = "auto") -> None:
    from .logs import configure

    configure(level, log_format)  # JSON lines unless stderr is a terminal (LOG_FORMAT)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(GRPC_HOST=args.host, GRPC_PORT=args.port, GRPC_WORKERS=args.workers)
    _configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    from . import workers
    from .app import serve

    count = settings.GRPC_WORKERS
    if count > 1:
        return workers.run(settings, count, _configure_logging)
    try:
        serve(settings)
    except OSError as error:
        logging.getLogger("adaccounts").error("%s", error)
        return EXIT_FAILED
    return 0


def _migrate(args: argparse.Namespace) -> int:
    settings = _settings(serving=False)  # the database URL is all a migrate needs
    if args.since and not args.sql:
        print("adaccounts migrate: --from only goes with --sql", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(settings.LOG_LEVEL)
    from .db import safe_url
    from .migrate import MigrationError, MigrationOptions, is_known, revisions, upgrade_sql, upgrade_to_head

    if args.since and not is_known(args.since):
        print(f"adaccounts migrate: --from {args.since}: no such revision ({', '.join(revisions())})", file=sys.stderr)
        return EXIT_USAGE

    url = settings.migration_database_url
    password = url.password
    options = MigrationOptions.from_settings(settings)
    try:
        if args.sql:
            sys.stdout.write(upgrade_sql(url, options, args.since))
            return 0
        run = upgrade_to_head(url, options)
    except MigrationError as error:
        reason = str(error)
        if password:  # never, but never print it even if a driver message quoted it
            reason = reason.replace(str(password), "***")
        print(f"adaccounts migrate: failed on {safe_url(url)}: {reason}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"adaccounts migrate: interrupted on {safe_url(url)}", file=sys.stderr)
        return EXIT_FAILED
    at = ", ".join(run.after) or "none"
    done = f"applied {', '.join(run.applied)}" if run.applied else "nothing to apply"
    print(f"adaccounts migrate: {safe_url(url)} is at the current schema ({at}); {done}")
    return 0


def _check(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = args.target or f"localhost:{_settings(serving=False).GRPC_PORT}"
    if (args.cert is None) != (args.key is None) or (args.cert and not args.ca):
        print("adaccounts check: --cert and --key go together, and with --ca", file=sys.stderr)
        return EXIT_USAGE
    try:
        paths = {"ca": args.ca, "cert": args.cert, "key": args.key}
        files = {name: Path(path).read_bytes() for name, path in paths.items() if path}
    except OSError as error:
        print(f"adaccounts check: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.ca:
        credentials = grpc.ssl_channel_credentials(files["ca"], files.get("key"), files.get("cert"))
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{target} {args.service!r}: {error.code().name} {error.details() or ''}".rstrip())
            return EXIT_FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{target} {args.service!r}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED


if __name__ == "__main__":
    main()
