"""Fixtures: a fresh PostgreSQL database per run, built by the Alembic migrations,
and a real server on a free port with real stubs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
import threading
import uuid
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import logs
from adaccounts_server.app import App
from adaccounts_server.config import Settings, load_settings
from adaccounts_server.migrate import upgrade_to_head
from pg_instance import ThrowawayPostgres, wait_until
from pgbouncer import INSTALL_HINT, PgBouncer, pgbouncer_binary
from sqlalchemy.engine import URL, make_url

# The PostgreSQL this machine runs (trust auth); override to use another.
ADMIN_URL = os.environ.get("ADACCOUNTS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PAGE_TOKEN_SECRET = "tests-page-token-secret-0123456789"
# Every variable the server reads as a setting: a test's subprocess or Settings must not
# pick up one the machine running the tests happens to have.
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)


def without_settings(environ: dict[str, str]) -> dict[str, str]:
    """`environ` minus every variable that is a server setting."""
    return {name: value for name, value in environ.items() if name.upper() not in SETTING_NAMES}


def test_settings(database_url: URL | str, **overrides: object) -> Settings:
    """Settings for a server on a free loopback port, ignoring any .env file."""
    values: dict[str, object] = {
        "DATABASE_URL": str(database_url) if isinstance(database_url, str) else database_url.render_as_string(False),
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": 0,
        "PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
        "HEALTH_CHECK_INTERVAL_S": 0.2,
        "HEALTH_CHECK_TIMEOUT_S": 1.0,
        "SHUTDOWN_GRACE_S": 5.0,
        "_env_file": None,
    }
    values.update(overrides)
    return load_settings(**values)


test_settings.__test__ = False  # a helper, not a test, whatever its name


class RunningServer:
    """An App serving on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = App(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.port = self._call(self.app.start())
        self.target = f"127.0.0.1:{self.port}"
        self._stopping: concurrent.futures.Future[None] | None = None

    def _call(self, coroutine, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def begin_stop(self) -> concurrent.futures.Future[None]:
        """Start the App's graceful stop (as SIGTERM does) and return at once; stop() finishes it."""
        self._stopping = asyncio.run_coroutine_threadsafe(self.app.stop(), self._loop)
        return self._stopping

    def stop(self) -> None:
        try:
            if self._stopping is None:
                self._call(self.app.stop())
            else:
                self._stopping.result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


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


def create_database(admin_url: str, name: str) -> URL:
    connection = psycopg.connect(admin_url, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    connection.close()
    return make_url(admin_url).set(drivername="postgresql+psycopg", database=name)


def drop_database(admin_url: str, name: str) -> None:
    connection = psycopg.connect(admin_url, autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    connection.close()


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
    running = RunningServer(test_settings(database_url))
    yield running
    running.stop()


@pytest.fixture
def clean_db(database_url: URL) -> None:
    dsn = database_url.set(drivername="postgresql").render_as_string(False)
    # psycopg 3: leaving the block commits, then closes the connection.
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("TRUNCATE ad_accounts")


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel, clean_db: None) -> pb_grpc.AdAccountServiceStub:
    """A stub on an empty table."""
    return pb_grpc.AdAccountServiceStub(channel)


def new_account(**fields: object) -> pb.AdAccount:
    """A valid account to create; fields override the defaults."""
    values: dict[str, object] = {
        "owner_id": str(uuid.uuid4()),
        "platform": pb.PLATFORM_META,
        "external_id": f"act_{uuid.uuid4().hex[:10]}",
        "name": "Acme EU",
        "currency_code": "EUR",
        "time_zone": "Europe/Paris",
    }
    values.update(fields)
    return pb.AdAccount(**values)


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


class Route:
    """How a server under test reaches a throwaway PostgreSQL: directly, or through PgBouncer."""

    def __init__(self, name: str, pg: ThrowawayPostgres, bouncer: PgBouncer | None = None) -> None:
        self.name = name
        self.pg = pg  # the PostgreSQL itself, for faults and for looking at pg_stat_activity
        self.bouncer = bouncer

    @property
    def url(self) -> URL:
        """What the server under test connects to."""
        return self.bouncer.url if self.bouncer is not None else self.pg.url

    @property
    def dsn(self) -> str:
        return self.bouncer.dsn if self.bouncer is not None else self.pg.dsn

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until a query through this route answers (PgBouncer retries logins only every few seconds)."""

        def answers() -> bool:
            try:
                connection = psycopg.connect(self.dsn)
            except psycopg.Error:
                return False
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                return True
            except psycopg.Error:
                return False
            finally:
                connection.close()

        wait_until(answers, timeout, interval=0.1, message=f"PostgreSQL to answer through the {self.name} route")


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
