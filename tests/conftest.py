"""Fixtures, and only fixtures: a fresh PostgreSQL database per run, built by the Alembic
migrations, a real server on a free port with real stubs, and the same on SQLite for the
contract tests. What the tests share besides fixtures is in tests/helpers."""

from __future__ import annotations

import io
import logging
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import logs
from adaccounts_server.migrate import upgrade_to_head
from helpers.backends import Backend
from helpers.cli import ADACCOUNTS, Served, clean_env, pg_url
from helpers.databases import Route, create_database, drop_database, libpq_url
from helpers.pg_instance import ThrowawayPostgres
from helpers.pgbouncer import INSTALL_HINT, PgBouncer, pgbouncer_binary
from helpers.ports import free_port
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, server_settings
from sqlalchemy.engine import URL, make_url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`@pytest.mark.backends(...)`: run the test once per database named (helpers/backends.py);
    `@pytest.mark.postgresql_only(reason)` skips it on every other one."""
    backends = metafunc.definition.get_closest_marker("backends")
    if backends is None or "backend" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("postgresql_only")
    params = [
        pytest.param(name, marks=pytest.mark.skip(reason=f"PostgreSQL only: {only.args[0]}"))
        if only is not None and name != "postgresql"
        else name
        for name in backends.args
    ]
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the servers log meanwhile, as the JSON lines `adaccounts serve` writes when stderr is not a terminal."""
    stream = io.StringIO()
    handler = logs.handler(stream, "json")
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


# --- the shared PostgreSQL -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def database_url() -> Iterator[URL]:
    """A fresh database on the shared PostgreSQL, at the current schema via Alembic."""
    name = f"adaccounts_test_{uuid.uuid4().hex[:12]}"
    url = create_database(ADMIN_URL, name)
    try:
        upgrade_to_head(url)
        yield url
    finally:
        drop_database(ADMIN_URL, name)


@pytest.fixture(scope="session")
def server(database_url: URL) -> Iterator[RunningServer]:
    running = RunningServer(server_settings(database_url))
    yield running
    running.stop()


@pytest.fixture
def clean_db(database_url: URL) -> None:
    # psycopg 3: leaving the block commits, then closes the connection.
    with psycopg.connect(libpq_url(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("TRUNCATE ad_accounts")


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


# --- the embedded SQLite default, and either database for the contract tests ---------------------


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> URL:
    """A SQLite file brought to the current schema as `adaccounts migrate` does (upgrade_to_head)."""
    url = make_url(f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'adaccounts.db'}")
    upgrade_to_head(url)
    return url


@pytest.fixture(scope="session")
def sqlite_server(sqlite_url: URL) -> Iterator[RunningServer]:
    running = RunningServer(server_settings(sqlite_url))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def sqlite_channel(sqlite_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sqlite_server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    """A database with a server on it, ad_accounts empty: PostgreSQL unless the test is
    parametrized by `@pytest.mark.backends` (see pytest_generate_tests)."""
    name = getattr(request, "param", "postgresql")
    if name == "postgresql":
        names = ("database_url", "server", "channel")
    elif name == "sqlite":
        names = ("sqlite_url", "sqlite_server", "sqlite_channel")
    else:
        raise ValueError(f"no backend {name!r}")
    chosen = Backend(name, *(request.getfixturevalue(fixture) for fixture in names))
    chosen.clean()
    return chosen


@pytest.fixture
def stub(backend: Backend) -> pb_grpc.AdAccountServiceStub:
    """A stub on an empty table (PostgreSQL's, unless the test is parametrized by backend)."""
    return backend.stub


# --- a private PostgreSQL to stop, stall and restart --------------------------------------------


@pytest.fixture(scope="module")
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A private PostgreSQL for one test module (never the shared one), at the current schema via Alembic.

    For tests that stop, stall or restart the database; use it through `pg`.
    """
    instance = ThrowawayPostgres()
    try:
        instance.start()
        upgrade_to_head(instance.url)
        yield instance
    finally:
        instance.cleanup()


@pytest.fixture
def pg(throwaway_pg: ThrowawayPostgres) -> Iterator[ThrowawayPostgres]:
    """The module's throwaway PostgreSQL, running and answering when the test starts and after it ends."""
    throwaway_pg.resume()
    if not throwaway_pg.running:
        throwaway_pg.start()
    yield throwaway_pg
    throwaway_pg.resume()
    if not throwaway_pg.running:
        throwaway_pg.start()


# --- Faults and PgBouncer (issue 5: tests/test_faults.py, tests/test_pgbouncer.py) ----------------


@pytest.fixture(scope="module")
def pgbouncer(throwaway_pg: ThrowawayPostgres) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction-pooling mode in front of the module's throwaway PostgreSQL."""
    if pgbouncer_binary() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    bouncer = PgBouncer("127.0.0.1", throwaway_pg.port, throwaway_pg.database)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.cleanup()


@pytest.fixture(params=["direct", "pgbouncer"])
def route(request: pytest.FixtureRequest, pg: ThrowawayPostgres) -> Route:
    """The module's throwaway PostgreSQL, reached directly or through PgBouncer (transaction pooling)."""
    if request.param == "direct":
        chosen = Route("direct", pg)
    else:
        chosen = Route("pgbouncer", pg, request.getfixturevalue("pgbouncer"))
    chosen.wait_ready()
    return chosen


# --- the console script (tests/test_cli.py, tests/test_workers.py) ------------------------------


@pytest.fixture
def empty_db() -> Iterator[str]:
    """The name of a new, empty database (no migrations) on the shared PostgreSQL."""
    name = f"adaccounts_cli_{uuid.uuid4().hex[:12]}"
    create_database(ADMIN_URL, name)
    try:
        yield name
    finally:
        drop_database(ADMIN_URL, name)


@pytest.fixture
def migrated_db(empty_db: str) -> str:
    upgrade_to_head(make_url(pg_url(empty_db)).set(drivername="postgresql+psycopg"))
    return empty_db


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start `adaccounts serve --host 127.0.0.1 --port <free>` in tmp_path with the given settings."""
    started: list[Served] = []

    def start(*args: str, **settings: str) -> Served:
        assert ADACCOUNTS is not None, "the `adaccounts` console script is not installed"
        port = free_port()
        n = len(started)
        stdout, stderr = tmp_path / f"serve{n}.out", tmp_path / f"serve{n}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [ADACCOUNTS, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
                cwd=tmp_path,
                env=clean_env(**settings),
                stdout=out,
                stderr=err,
            )
        served = Served(process, f"127.0.0.1:{port}", stdout, stderr)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
