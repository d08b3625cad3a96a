"""The `adaccounts` console script, run for real in subprocesses: serve, check,
migrate, invalid settings, and no password in anything it prints."""

from __future__ import annotations

import socket
import sqlite3
import time
import uuid
from pathlib import Path

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from helpers.cli import ADACCOUNTS, lines, pg_url, run
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.settings import PAGE_TOKEN_SECRET

ROOT = Path(__file__).resolve().parents[1]
HEAD_REVISION = "0003"


@pytest.fixture(scope="module", autouse=True)
def _console_script() -> None:
    if ADACCOUNTS is None:
        pytest.fail("the `adaccounts` console script is not installed: run `pip install --no-deps -e ./clients -e .`")


def tables(database: str) -> set[str]:
    connection = psycopg.connect(pg_url(database))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {name for (name,) in cursor.fetchall()}
    finally:
        connection.close()


# --- serve: zero setup ---------------------------------------------------------------------


def test_serve_with_no_configuration_uses_a_migrated_sqlite_file(serve, tmp_path: Path) -> None:
    server = serve()
    server.wait_serving()

    database = tmp_path / "adaccounts.db"
    assert database.is_file(), "serve did not create adaccounts.db in its working directory"
    with sqlite3.connect(database) as connection:
        names = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"ad_accounts", "ad_account_requests", "alembic_version"} <= names
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD_REVISION,)]

    check = run(tmp_path, "check", "--target", server.target)
    assert check.returncode == 0, check.stdout + check.stderr
    assert lines(check.stdout) == [f"{server.target} '': SERVING"]

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
        assert created.id
        assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=5) == created
        # request_id (AIP-155): a retry returns the account; another request with the id is refused.
        request = pb.CreateAdAccountRequest(ad_account=new_account(), request_id=str(uuid.uuid4()))
        first = stub.CreateAdAccount(request, timeout=5)
        assert stub.CreateAdAccount(request, timeout=5) == first
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateAdAccount(
                pb.CreateAdAccountRequest(ad_account=new_account(), request_id=request.request_id), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    started = time.monotonic()
    assert server.terminate() == 0, server.output
    assert time.monotonic() - started < 5, "SIGTERM took too long"
    assert "Traceback" not in server.output


def test_serve_on_a_port_already_taken_exits_1(serve, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(tmp_path, "serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


# --- check ---------------------------------------------------------------------------------


def test_check_with_nothing_listening_exits_1_with_one_line(tmp_path: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    result = run(tmp_path, "check", "--target", target, "--timeout", "2")
    assert result.returncode == 1
    output = lines(result.stdout + result.stderr)
    assert len(output) == 1, output
    assert output[0].startswith(f"{target} '': UNAVAILABLE")


def test_check_without_target_asks_localhost_on_grpc_port(tmp_path: Path) -> None:
    port = free_port()
    result = run(tmp_path, "check", "--timeout", "2", GRPC_PORT=str(port))
    assert result.returncode == 1
    assert lines(result.stdout + result.stderr)[0].startswith(f"localhost:{port} ''")


def test_check_services(serve, tmp_path: Path) -> None:
    server = serve()
    server.wait_serving()

    liveness = run(tmp_path, "check", "--target", server.target, "--service", "liveness")
    assert liveness.returncode == 0, liveness.stdout + liveness.stderr
    assert lines(liveness.stdout) == [f"{server.target} 'liveness': SERVING"]

    for service in ("readiness", "adaccounts.v1.AdAccountService"):
        ready = run(tmp_path, "check", "--target", server.target, "--service", service)
        assert ready.returncode == 0, ready.stdout + ready.stderr

    unknown = run(tmp_path, "check", "--target", server.target, "--service", "nonexistent")
    assert unknown.returncode == 1
    assert lines(unknown.stdout + unknown.stderr) == [f"{server.target} 'nonexistent': NOT_FOUND"]

    assert server.terminate() == 0, server.output


# --- invalid settings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "settings", "named"),
    [
        (["serve"], {"GRPC_PORT": "abc"}, "GRPC_PORT"),
        (["serve"], {"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
        (["serve", "--workers", "0"], {}, "GRPC_WORKERS"),
        (["serve"], {"DATABASE_URL": "postgresql://app:Pa55word1234@127.0.0.1/x"}, "PAGE_TOKEN_SECRET"),
        (["serve"], {"DATABASE_URL": "postgresql://x", "PAGE_TOKEN_SECRET": "short"}, "PAGE_TOKEN_SECRET"),
        (["serve"], {"DATABASE_URL": "mysql://x", "PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET}, "DATABASE_URL"),
        (["serve"], {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        (["migrate"], {"DATABASE_URL": "mysql://app:Pa55word1234@x/y"}, "DATABASE_URL"),
        (["migrate"], {"DATABASE_URL": "postgresql://x", "DB_CONNECT_TIMEOUT": "0"}, "DB_CONNECT_TIMEOUT"),
        (["check"], {"GRPC_PORT": "abc"}, "GRPC_PORT"),
    ],
    ids=[
        "port_abc",
        "pool_size_0",
        "workers_flag_0",
        "no_secret",
        "short_secret",
        "mysql",
        "log_level",
        "migrate_mysql",
        "migrate_bad_value",
        "check_port_abc",
    ],
)
def test_invalid_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path, args: list[str], settings: dict[str, str], named: str
) -> None:
    result = run(tmp_path, *args, **settings)
    assert result.returncode == 2, result.stdout + result.stderr
    assert lines(result.stderr) == [result.stderr.strip()], result.stderr
    assert named in result.stderr
    assert result.stderr.startswith(f"adaccounts: invalid setting {named}:")
    assert "Traceback" not in result.stderr
    assert "Pa55word1234" not in result.stdout + result.stderr
    assert not (tmp_path / "adaccounts.db").exists(), "an invalid setting must stop before touching a database"


# --- migrate -------------------------------------------------------------------------------


def test_migrate_a_new_postgresql_database_then_again(tmp_path: Path, empty_db: str) -> None:
    password = "M1grateS3cret"  # trust auth: any password is accepted, and must never be printed
    settings = {"DATABASE_URL": pg_url(empty_db, password)}  # all a migrate needs

    first = run(tmp_path, "migrate", **settings)
    assert first.returncode == 0, first.stdout + first.stderr
    assert {"ad_accounts", "alembic_version"} <= tables(empty_db)
    connection = psycopg.connect(pg_url(empty_db))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT version_num FROM alembic_version")
            assert cursor.fetchall() == [(HEAD_REVISION,)]
    finally:
        connection.close()

    again = run(tmp_path, "migrate", **settings)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "current schema" in again.stdout
    assert "Running upgrade" not in again.stderr  # nothing left to apply

    for result in (first, again):
        assert password not in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


# Serving settings, each invalid: `serve` refuses every one of them, `migrate` reads none of them.
BAD_SERVING_SETTINGS = [
    ("PAGE_TOKEN_SECRET", {}),  # unset, with a database configured
    ("PAGE_TOKEN_SECRET", {"PAGE_TOKEN_SECRET": "short"}),
    ("GRPC_TLS_CERT_FILE", {"GRPC_TLS": "tls"}),
    ("AUTH_TOKENS", {"AUTH_TOKENS": "{not json"}),
]


@pytest.mark.parametrize(("named", "bad"), BAD_SERVING_SETTINGS, ids=["no_secret", "short_secret", "tls", "tokens"])
def test_migrate_needs_only_the_database_url_and_serve_checks_the_rest(
    tmp_path: Path, empty_db: str, named: str, bad: dict[str, str]
) -> None:
    migrate = run(tmp_path, "migrate", DATABASE_URL=pg_url(empty_db), **bad)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert f"current schema ({HEAD_REVISION})" in migrate.stdout

    serve = run(tmp_path, "serve", "--port", "0", DATABASE_URL=pg_url(empty_db), **bad)
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert serve.stderr.startswith(f"adaccounts: invalid setting {named}:"), serve.stderr
    assert lines(serve.stderr) == [serve.stderr.strip()]


def test_version_names_the_server_the_contract_and_the_client(tmp_path: Path) -> None:
    import tomllib

    import adaccounts

    server_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    result = run(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [
        f"adaccounts {server_version} (contract {pb.DESCRIPTOR.package}, client {adaccounts.__version__})"
    ]
    assert pb.DESCRIPTOR.package == "adaccounts.v1"


def test_migrate_an_unreachable_database_fails_in_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://u:s3cr3tpass@127.0.0.1:{free_port()}/x"
    result = run(tmp_path, "migrate", DATABASE_URL=url, PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "s3cr3tpass" not in output
    assert "Traceback" not in output
    failure = [line for line in lines(output) if "adaccounts" in line]
    assert len(failure) == 1, output
    assert "failed" in failure[0]
    assert not (tmp_path / "adaccounts.db").exists()


# --- serve against PostgreSQL --------------------------------------------------------------


def test_serve_never_runs_ddl_on_postgresql(serve, tmp_path: Path, empty_db: str) -> None:
    server = serve(DATABASE_URL=pg_url(empty_db), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    # Liveness answers once the server listens, i.e. after start-up, where SQLite is migrated.
    server.wait_serving("liveness")
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
        # No table: this fails (how is not asserted here) but must not create one either.
        pb_grpc.AdAccountServiceStub(channel).GetAdAccount(pb.GetAdAccountRequest(id=str(uuid.uuid4())), timeout=5)
    time.sleep(1.0)  # deliberately: five health checks go by, and still no table, still running
    assert server.process.poll() is None, f"serve stopped:\n{server.output}"
    assert tables(empty_db) == set(), "serve must never create tables on PostgreSQL (run `adaccounts migrate`)"
    # The schema gate: not ready, saying what to do.
    readiness = run(tmp_path, "check", "--target", server.target)
    assert lines(readiness.stdout) == [f"{server.target} '': NOT_SERVING"]
    assert "run `adaccounts migrate`" in server.output
    assert not (tmp_path / "adaccounts.db").exists()
    assert server.terminate() == 0, server.output


def test_serve_never_prints_the_database_password(serve, migrated_db: str) -> None:
    password = "Sup3rS3cret"  # trust auth: any password is accepted
    server = serve(DATABASE_URL=pg_url(migrated_db, password), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET, LOG_LEVEL="DEBUG")
    server.wait_serving()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
        assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=5) == created
        with pytest.raises(grpc.RpcError):
            stub.GetAdAccount(pb.GetAdAccountRequest(id=str(uuid.uuid4())), timeout=5)
    assert server.terminate() == 0, server.output
    output = server.output
    debug = (" DEBUG ", '"level": "DEBUG"')  # text on a terminal, JSON lines otherwise (LOG_FORMAT=auto)
    assert any(mark in output for mark in debug), "LOG_LEVEL=DEBUG was not applied, so this test proves little"
    assert password not in output
    assert "postgresql+psycopg://postgres:***@" in output  # the URL is logged, masked


def test_serve_with_the_database_down_is_alive_not_ready_and_never_prints_the_password(serve, tmp_path: Path) -> None:
    password = "D0wnS3cret"
    url = f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/x"
    server = serve(DATABASE_URL=url, PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET, LOG_LEVEL="DEBUG")
    server.wait_serving("liveness")
    wait_until(lambda: "NOT_SERVING" in server.output, 15, message="serve to log NOT_SERVING")
    readiness = run(tmp_path, "check", "--target", server.target, "--service", "readiness")
    assert readiness.returncode == 1, readiness.stdout + readiness.stderr
    assert lines(readiness.stdout) == [f"{server.target} 'readiness': NOT_SERVING"]
    assert server.terminate() == 0, server.output
    output = server.output
    assert "database unreachable" in output  # the reason is logged ...
    assert password not in output  # ... without the password


def test_migrate_a_database_at_an_unknown_revision_fails_in_one_line(tmp_path: Path, migrated_db: str) -> None:
    # E.g. a database migrated by a newer release than this one.
    # psycopg 3: leaving the block commits, then closes the connection.
    with psycopg.connect(pg_url(migrated_db)) as connection, connection.cursor() as cursor:
        cursor.execute("UPDATE alembic_version SET version_num = '9999'")
    result = run(tmp_path, "migrate", DATABASE_URL=pg_url(migrated_db), PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    failure = [line for line in lines(result.stdout + result.stderr) if line.startswith("adaccounts migrate:")]
    assert len(failure) == 1, result.stderr
    assert "9999" in failure[0]
