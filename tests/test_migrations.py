"""Migrations you can trust at deploy: `adaccounts migrate` serialised, bounded by lock and
statement timeouts, failing in one line with an exit code that says what happened; the
models and the migrations in agreement; every revision reversible; the offline SQL; the
second migration (indexes built CONCURRENTLY) on a populated, busy table; the schema gate
in the health monitor; the third (the request ids of CreateAdAccount in a table of their
own) backfilled in batches; and the two database roles docs/deploying.md tells operators to create.

All against real PostgreSQL: a fresh database per test on the shared server.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import models
from adaccounts_server.config import load_settings
from adaccounts_server.migrate import (
    ADVISORY_LOCK_KEY,
    MIGRATIONS_DIR,
    MigrationBusy,
    MigrationOptions,
    downgrade_to,
    head_revision,
    revisions,
    upgrade_to,
    upgrade_to_head,
)
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.cli import ADACCOUNTS
from helpers.databases import create_database, drop_database
from helpers.polling import wait_until
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, PAGE_TOKEN_SECRET, server_settings, without_settings
from sqlalchemy import MetaData, create_engine, pool
from sqlalchemy.engine import URL, make_url
from sqlmodel import SQLModel

ROOT = Path(__file__).resolve().parents[1]
HEAD = "0003"
INDEX_REVISION = "0002"  # the CONCURRENTLY index builds
NEW_INDEXES = ("ix_ad_accounts_owner_id_update_time_id", "ix_ad_accounts_owner_id_name_id")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- helpers -------------------------------------------------------------------------------


def dsn(url: URL) -> str:
    """A libpq URL for psycopg and psql."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def connect(url: URL, autocommit: bool = True):  # type: ignore[no-untyped-def]
    return psycopg.connect(dsn(url), autocommit=autocommit)


def query(url: URL, sql: str, *args: object) -> list[tuple]:
    connection = connect(url)
    try:
        with connection.cursor() as cursor:
            # No arguments: no parameters at all (psycopg 3 then sends the SQL as is, unparsed).
            cursor.execute(sql, args or None)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def version(url: URL) -> list[str]:
    return [row[0] for row in query(url, "SELECT version_num FROM alembic_version")]


def indexes(url: URL) -> dict[str, bool]:
    """Index name -> valid, on ad_accounts."""
    rows = query(
        url,
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'ad_accounts'::regclass",
    )
    return dict(rows)


def run(*args: str, timeout: float = 30, **settings: str) -> subprocess.CompletedProcess[str]:
    """`adaccounts ARGS` in a subprocess with only the given settings."""
    assert ADACCOUNTS is not None, "the `adaccounts` console script is not installed"
    env = without_settings(dict(os.environ))
    env.update(settings)
    return subprocess.run(
        [ADACCOUNTS, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT / "tests"
    )


def spawn(*args: str, **settings: str) -> subprocess.Popen[str]:
    assert ADACCOUNTS is not None
    env = without_settings(dict(os.environ))
    env.update(settings)
    return subprocess.Popen(
        [ADACCOUNTS, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT / "tests"
    )


def migrate_url(url: URL, password: str = "M1gr4t0rS3cret") -> str:
    """The URL an operator would put in MIGRATION_DATABASE_URL (trust auth: any password works)."""
    return url.set(drivername="postgresql", password=password).render_as_string(hide_password=False)


def failure_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line `adaccounts migrate` prints on failure (alembic's progress lines aside)."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    mine = [line for line in output.splitlines() if line.startswith("adaccounts")]
    assert len(mine) == 1, output
    return mine[0]


def no_diff(url: URL) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


@pytest.fixture
def fresh_db() -> Iterator[URL]:
    """A new, empty database on the shared PostgreSQL."""
    name = f"adaccounts_mig_{uuid.uuid4().hex[:12]}"
    url = create_database(ADMIN_URL, name)
    try:
        yield url
    finally:
        drop_database(ADMIN_URL, name)


def populate(url: URL, rows: int, owners: int = 250) -> None:
    query(
        url,
        "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone, status, "
        "create_time, update_time, version) "
        "SELECT gen_random_uuid(), ('00000000-0000-0000-0000-' || lpad((g %% %s)::text, 12, '0'))::uuid, 'META', "
        "'act_' || g, md5(g::text), 'EUR', 'Europe/Paris', 'ACTIVE', "
        "now() - g * interval '1 second', now() - g * interval '1 second', 1 FROM generate_series(1, %s) g",
        owners,
        rows,
    )
    query(url, "ANALYZE ad_accounts")


# --- the script directory ------------------------------------------------------------------


def test_revisions_are_linear_and_head_is_the_newest() -> None:
    assert revisions() == ["0001", "0002", HEAD]
    assert head_revision() == HEAD
    files = sorted((MIGRATIONS_DIR / "versions").glob("*.py"))
    assert [path.name.split("_")[0] for path in files] == revisions()
    for path in files:
        assert path.name.split("_")[0] in revisions(), f"{path.name}: file name should start with its revision"


# --- drift, reversibility ------------------------------------------------------------------


def test_models_and_migrations_agree(database_url: URL) -> None:
    # The session database is built by the migrations; autogenerate must find nothing to do.
    assert version(database_url) == [HEAD]
    assert no_diff(database_url) == []


def test_the_drift_check_would_notice_a_difference(database_url: URL) -> None:
    # Guard against a comparison that can never fail: an index only in the models is reported.
    metadata = MetaData()
    for table in SQLModel.metadata.tables.values():
        table.to_metadata(metadata)
    import sqlalchemy as sa

    sa.Index("ix_only_in_the_models", metadata.tables["ad_accounts"].c.currency_code)
    engine = create_engine(database_url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)
    engine.dispose()
    assert [(op[0], op[1].name) for op in diff] == [("add_index", "ix_only_in_the_models")]


def test_upgrade_downgrade_upgrade_on_postgresql(fresh_db: URL) -> None:
    first = upgrade_to_head(fresh_db)
    assert first.before == ()
    assert first.applied == ["0001", "0002", HEAD]
    assert no_diff(fresh_db) == []

    downgrade_to(fresh_db, "0002")
    assert version(fresh_db) == ["0002"]
    assert query(fresh_db, "SELECT to_regclass('ad_account_requests')") == [(None,)]

    downgrade_to(fresh_db, "0001")
    assert version(fresh_db) == ["0001"]
    assert not set(NEW_INDEXES) & set(indexes(fresh_db))

    downgrade_to(fresh_db, "base")
    assert version(fresh_db) == []
    assert query(fresh_db, "SELECT to_regclass('ad_accounts')") == [(None,)]

    again = upgrade_to_head(fresh_db)
    assert again.applied == ["0001", "0002", HEAD]
    assert version(fresh_db) == [HEAD]
    assert all(indexes(fresh_db).values())
    assert no_diff(fresh_db) == []


def test_upgrade_downgrade_upgrade_on_sqlite(tmp_path: Path) -> None:
    url = make_url(f"sqlite:///{tmp_path / 'adaccounts.db'}")
    upgrade_to_head(url)
    assert no_diff(url) == []
    downgrade_to(url, "base")
    upgrade_to_head(url)
    assert no_diff(url) == []


# --- adaccounts migrate: exit codes, one line, settings ------------------------------------


def test_migrate_uses_migration_database_url_and_reports_what_it_applied(fresh_db: URL) -> None:
    # The Job sets only MIGRATION_DATABASE_URL (no DATABASE_URL, no PAGE_TOKEN_SECRET).
    first = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db))
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().endswith(f"is at the current schema ({HEAD}); applied 0001, 0002, {HEAD}")
    assert "M1gr4t0rS3cret" not in first.stdout + first.stderr

    # The server's own URL points nowhere: migrate must not use it when MIGRATION_DATABASE_URL is set.
    again = run(
        "migrate",
        MIGRATION_DATABASE_URL=migrate_url(fresh_db),
        DATABASE_URL="postgresql://app:x@127.0.0.1:1/nowhere",
        PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().endswith(f"({HEAD}); nothing to apply")


def test_an_invalid_migration_database_url_exits_2_naming_it() -> None:
    result = run("migrate", MIGRATION_DATABASE_URL="mysql://root:Pa55word1234@db/x")
    assert result.returncode == 2
    assert result.stderr.startswith("adaccounts: invalid setting MIGRATION_DATABASE_URL:")
    assert "Pa55word1234" not in result.stdout + result.stderr


def test_migration_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in set(os.environ) - set(without_settings(dict(os.environ))):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    settings = load_settings(_env_file=None, MIGRATION_DATABASE_URL="postgresql://m:pw@db/app")
    assert settings.migration_database_url.drivername == "postgresql+psycopg"
    assert settings.uses_embedded_database  # the Job needs no server settings
    assert "pw" not in repr(settings)
    plain = load_settings(
        _env_file=None, DATABASE_URL="postgresql://app:pw@db/app", PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET
    )
    assert plain.migration_database_url == plain.database_url  # one role for both, when not split
    options = MigrationOptions.from_settings(
        load_settings(_env_file=None, MIGRATION_LOCK_TIMEOUT_S=1.5, MIGRATION_STATEMENT_TIMEOUT_S=30)
    )
    assert (options.lock_timeout_s, options.statement_timeout_s, options.wait_s) == (1.5, 30, 600)


def test_plain_alembic_from_the_checkout_needs_only_the_database_url(fresh_db: URL) -> None:
    # For developers: alembic.ini at the root, env.py reading the server's settings; no
    # PAGE_TOKEN_SECRET or any other serving setting, and an invalid one is not its business.
    alembic = shutil.which("alembic", path=str(Path(sys.executable).parent)) or shutil.which("alembic")
    assert alembic, "alembic is not installed next to this interpreter"
    env = without_settings(dict(os.environ))
    env.update(DATABASE_URL=migrate_url(fresh_db), GRPC_TLS="tls", AUTH_TOKENS="{not json")

    def alembic_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([alembic, *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)

    upgrade_to_head(fresh_db)
    current = alembic_run("current")
    assert current.returncode == 0, current.stdout + current.stderr
    assert current.stdout.strip() == f"{HEAD} (head)"
    assert "Traceback" not in current.stderr
    assert "M1gr4t0rS3cret" not in current.stdout + current.stderr

    env["DATABASE_URL"] = "mysql://root:Pa55word1234@db/x"  # what it does check: the URL, in one line
    refused = alembic_run("current")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "alembic: invalid setting DATABASE_URL: unsupported database 'mysql' (postgresql or sqlite)"
    )


def test_concurrent_migrates_all_exit_0_and_apply_each_revision_once(fresh_db: URL) -> None:
    # Hold the migrate lock until all three are connected and waiting for it, so they truly race.
    holder = connect(fresh_db)
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
    processes = [spawn("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db)) for _ in range(3)]
    try:
        wait_until(
            lambda: (
                query(
                    fresh_db,
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'adaccounts-migrate' "
                    "AND datname = current_database()",
                )[0][0]
                == 3
            ),
            timeout=15,
            message="three migrates connected and waiting",
        )
        # Deliberately: each polls pg_try_advisory_lock, and a failed try leaves no trace to wait for.
        time.sleep(0.3)  # let each of them try (and fail) to take the lock at least once
        assert version_or_none(fresh_db) is None, "a migrate ran while another held the lock"
        released = time.monotonic()
        holder.close()  # releases the lock
        results = [(p, *p.communicate(timeout=30)) for p in processes]
        elapsed = time.monotonic() - released
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    codes = [p.returncode for p, _, _ in results]
    assert codes == [0, 0, 0], results
    stdouts = sorted(out.strip().split("; ")[-1] for _, out, _ in results)
    assert stdouts == [f"applied 0001, 0002, {HEAD}", "nothing to apply", "nothing to apply"], stdouts
    logs = "".join(err for _, _, err in results)
    assert logs.count("Running upgrade  -> 0001") == 1
    assert logs.count("Running upgrade 0001 -> 0002") == 1
    assert logs.count(f"Running upgrade 0002 -> {HEAD}") == 1
    assert version(fresh_db) == [HEAD]
    assert all(indexes(fresh_db).values())
    print(f"\n3 concurrent migrates: exit codes {codes}, all done {elapsed:.2f} s after the lock was released")


def version_or_none(url: URL) -> list[str] | None:
    if query(url, "SELECT to_regclass('alembic_version')") == [(None,)]:
        return None
    return version(url)


def test_a_migrate_waiting_too_long_for_another_exits_3(fresh_db: URL) -> None:
    holder = connect(fresh_db)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        started = time.monotonic()
        result = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db), MIGRATION_WAIT_S="1")
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert result.returncode == 3, result.stdout + result.stderr
    line = failure_line(result)
    assert "another `adaccounts migrate`" in line, line
    assert "MIGRATION_WAIT_S" in line, line
    assert elapsed < 8
    assert version_or_none(fresh_db) is None


def test_a_migration_waiting_on_a_busy_table_fails_fast_and_a_retry_completes(fresh_db: URL) -> None:
    upgrade_to(fresh_db, "0001")
    populate(fresh_db, 1000)
    # A write transaction still open: CREATE INDEX CONCURRENTLY must wait for it to end.
    writer = connect(fresh_db, autocommit=False)
    with writer.cursor() as cursor:
        cursor.execute("UPDATE ad_accounts SET version = version + 1 WHERE external_id = 'act_1'")
    try:
        started = time.monotonic()
        result = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db), MIGRATION_LOCK_TIMEOUT_S="1")
        elapsed = time.monotonic() - started
    finally:
        writer.rollback()
        writer.close()
    assert result.returncode == 3, result.stdout + result.stderr
    line = failure_line(result)
    assert (
        f"revision {INDEX_REVISION} waited more than 1 s for a lock on a table in use (MIGRATION_LOCK_TIMEOUT_S)"
        in line
    )
    assert "M1gr4t0rS3cret" not in result.stdout + result.stderr
    assert elapsed < 6, f"took {elapsed:.1f} s"
    assert version(fresh_db) == ["0001"]
    print(f"\nlock timeout 1 s: migrate exited 3 after {elapsed:.2f} s (incl. interpreter start): {line}")

    # The failed concurrent build left an INVALID index behind (PostgreSQL commits its catalog
    # entry before waiting); the retry drops it and builds it again.
    assert indexes(fresh_db).get(NEW_INDEXES[0]) is False, indexes(fresh_db)
    retry = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert version(fresh_db) == [HEAD]
    found = indexes(fresh_db)
    assert set(NEW_INDEXES) <= set(found)
    assert all(found.values()), found


def test_ddl_queued_behind_a_reader_gives_up_after_lock_timeout_so_traffic_is_not_held(fresh_db: URL) -> None:
    # ACCESS EXCLUSIVE DDL (here: 0001's downgrade, DROP TABLE) behind an open reader. While
    # it waits, every new query on the table queues behind it; lock_timeout bounds that queue.
    upgrade_to(fresh_db, "0001")
    reader = connect(fresh_db, autocommit=False)
    with reader.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM ad_accounts")
    waits: list[float] = []

    def traffic() -> None:
        wait_until(  # once the DDL is queued behind the reader
            lambda: query(
                fresh_db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )[0][0],
            10,
            message="the DDL to wait on the reader's lock",
        )
        connection = connect(fresh_db)
        started = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM ad_accounts")
        waits.append(time.monotonic() - started)
        connection.close()

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        with pytest.raises(MigrationBusy) as raised:
            downgrade_to(fresh_db, "base", MigrationOptions(lock_timeout_s=1.0))
    finally:
        thread.join(10)
        reader.rollback()
        reader.close()
    assert str(raised.value).startswith("the downgrade of revision 0001 waited more than 1 s for a lock")
    assert version(fresh_db) == ["0001"]
    assert waits, f"a query waited {waits} s behind the DDL"
    assert 0.3 < waits[0] < 2.0, f"a query waited {waits} s behind the DDL"


# --- the offline SQL -----------------------------------------------------------------------


def test_migrate_sql_prints_the_script_without_connecting_and_psql_can_apply_it(fresh_db: URL) -> None:
    unreachable = "postgresql://migrator:0ffl1neS3cret@127.0.0.1:1/nowhere"
    full = run("migrate", "--sql", MIGRATION_DATABASE_URL=unreachable)
    assert full.returncode == 0, full.stderr
    sql = full.stdout
    assert "0ffl1neS3cret" not in sql + full.stderr
    assert f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})" in sql
    assert "SET lock_timeout = 5000" in sql
    assert "SET statement_timeout = 60000" in sql
    assert "CREATE TABLE ad_accounts" in sql
    assert "CREATE TABLE IF NOT EXISTS ad_account_requests" in sql
    assert "INSERT INTO ad_account_requests" in sql  # the backfill, in one statement offline
    for name in NEW_INDEXES:
        assert f"CREATE INDEX CONCURRENTLY {name} ON ad_accounts" in sql

    since = run("migrate", "--sql", "--from", "0001", MIGRATION_DATABASE_URL=unreachable)
    assert since.returncode == 0, since.stderr
    assert "CREATE TABLE ad_accounts" not in since.stdout
    assert "CREATE INDEX CONCURRENTLY ix_ad_accounts_owner_id_name_id" in since.stdout

    bad = run("migrate", "--sql", "--from", "0999", MIGRATION_DATABASE_URL=unreachable)
    assert bad.returncode == 2
    assert "0999" in failure_line(bad)
    assert run("migrate", "--from", "0001", MIGRATION_DATABASE_URL=unreachable).returncode == 2

    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql not installed")
    applied = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn(fresh_db)], input=sql, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    assert version(fresh_db) == [HEAD]
    assert no_diff(fresh_db) == []


# --- the second migration on a populated, busy table ---------------------------------------


def test_concurrent_index_build_on_a_populated_table_does_not_block_writes(fresh_db: URL) -> None:
    rows = 50_000
    upgrade_to(fresh_db, "0001")
    populate(fresh_db, rows)
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def writes() -> None:  # the service's traffic: short committed updates, each bounded
        connection = connect(fresh_db)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET statement_timeout = 5000")
                n = 0
                while not stop.is_set():
                    n += 1
                    started = time.monotonic()
                    cursor.execute(
                        "UPDATE ad_accounts SET version = version + 1, update_time = now() WHERE external_id = %s",
                        (f"act_{n % rows + 1}",),
                    )
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.005)  # deliberately: steady traffic, not as fast as it can go
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    thread = threading.Thread(target=writes)
    thread.start()
    try:
        wait_until(lambda: len(latencies) >= 5, 10, message="writes under way")
        started = time.monotonic()
        result = upgrade_to_head(fresh_db)
        took = time.monotonic() - started
        written = len(latencies)
        wait_until(lambda: len(latencies) >= written + 5, 10, message="writes going on after the build")
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    assert result.applied == [INDEX_REVISION, HEAD]
    found = indexes(fresh_db)
    assert set(NEW_INDEXES) <= set(found), found
    assert all(found.values()), found
    assert len(latencies) > 20
    assert max(latencies) < 1.0, f"a write waited {max(latencies):.2f} s during the index build"

    owner = "00000000-0000-0000-0000-000000000007"
    for order, index in (("name, id", NEW_INDEXES[1]), ("update_time DESC, id DESC", NEW_INDEXES[0])):
        plan = "\n".join(
            row[0]
            for row in query(
                fresh_db, f"EXPLAIN SELECT * FROM ad_accounts WHERE owner_id = %s ORDER BY {order} LIMIT 51", owner
            )
        )
        assert index in plan, plan
    print(
        f"\n0002 and 0003 on {rows} rows: {took:.2f} s, {len(latencies)} concurrent writes, "
        f"slowest {max(latencies) * 1000:.1f} ms"
    )


# --- the third migration: the request ids backfilled ------------------------------------


def requests_and_accounts(url: URL) -> tuple[int, int, int]:
    """(request rows, accounts with a request_id, request rows that match their account exactly)."""
    ((requests,),) = query(url, "SELECT count(*) FROM ad_account_requests")
    ((accounts,),) = query(url, "SELECT count(*) FROM ad_accounts WHERE request_id IS NOT NULL")
    ((matching,),) = query(
        url,
        "SELECT count(*) FROM ad_account_requests r JOIN ad_accounts a ON a.request_id = r.request_id "
        "AND a.id = r.account_id AND a.create_time = r.create_time WHERE r.request_hash IS NULL",
    )
    return requests, accounts, matching


def test_0003_backfills_the_request_ids_in_batches_while_writes_go_on(fresh_db: URL) -> None:
    rows = 25_000  # 12,500 with a request_id: more than one batch
    upgrade_to(fresh_db, INDEX_REVISION)
    populate(fresh_db, rows)
    query(fresh_db, "UPDATE ad_accounts SET request_id = gen_random_uuid() WHERE external_id ~ '[02468]$'")
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def writes() -> None:  # an old release's traffic: updates, and creates with a request_id
        connection = connect(fresh_db)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET statement_timeout = 5000")
                n = 0
                while not stop.is_set():
                    n += 1
                    started = time.monotonic()
                    cursor.execute(
                        "UPDATE ad_accounts SET version = version + 1 WHERE external_id = %s", (f"act_{n % rows + 1}",)
                    )
                    cursor.execute(
                        "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, "
                        "time_zone, status, create_time, update_time, version, request_id) VALUES "
                        "(gen_random_uuid(), gen_random_uuid(), 'META', %s, 'x', 'EUR', 'UTC', 'ACTIVE', now(), "
                        "now(), 1, gen_random_uuid())",
                        (f"new_{n}",),
                    )
                    latencies.append(time.monotonic() - started)
                    time.sleep(0.005)  # deliberately: steady traffic, not as fast as it can go
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    thread = threading.Thread(target=writes)
    thread.start()
    try:
        wait_until(lambda: len(latencies) >= 5, 10, message="writes under way")
        started = time.monotonic()
        result = upgrade_to_head(fresh_db)
        took = time.monotonic() - started
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    assert result.applied == [HEAD]
    assert len(latencies) > 10
    assert max(latencies) < 1.0, f"a write waited {max(latencies):.2f} s during the backfill"
    requests, accounts, matching = requests_and_accounts(fresh_db)
    # Every account that had a request_id when the backfill started has its request row, exact
    # (an old pod's create after that may not: the server falls back to ad_accounts.request_id).
    assert requests == matching >= rows // 2, (requests, accounts, matching)
    assert accounts - requests <= len(latencies)
    assert no_diff(fresh_db) == []
    slowest = max(latencies) * 1000
    print(f"\n0003 backfilled {requests} request ids in {took:.2f} s, slowest concurrent write {slowest:.1f} ms")

    downgrade_to(fresh_db, INDEX_REVISION)
    assert query(fresh_db, "SELECT to_regclass('ad_account_requests')") == [(None,)]
    ((left,),) = query(fresh_db, "SELECT count(*) FROM ad_accounts WHERE request_id IS NOT NULL")
    assert left == accounts, "the downgrade must not touch ad_accounts"


def test_0003_interrupted_half_way_is_completed_by_a_retry(fresh_db: URL) -> None:
    # A backfill batch that fails (a timeout, a killed Job) leaves the table and some rows
    # behind, committed, with alembic_version still at 0002: the retry must finish the job.
    upgrade_to(fresh_db, INDEX_REVISION)
    populate(fresh_db, 1000)
    query(fresh_db, "UPDATE ad_accounts SET request_id = gen_random_uuid()")
    upgrade_to_head(fresh_db)
    query(
        fresh_db,
        "DELETE FROM ad_account_requests WHERE request_id IN (SELECT request_id FROM ad_account_requests LIMIT 400)",
    )
    query(fresh_db, f"UPDATE alembic_version SET version_num = '{INDEX_REVISION}'")

    retry = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db))
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert version(fresh_db) == [HEAD]
    assert requests_and_accounts(fresh_db) == (1000, 1000, 1000)


def test_0003_backfills_on_sqlite(tmp_path: Path) -> None:
    import sqlite3

    url = make_url(f"sqlite:///{tmp_path / 'adaccounts.db'}")
    upgrade_to(url, INDEX_REVISION)
    with sqlite3.connect(tmp_path / "adaccounts.db") as connection:
        for n, request_id in enumerate([uuid.uuid4().hex, None, uuid.uuid4().hex]):
            connection.execute(
                "INSERT INTO ad_accounts VALUES (?, ?, 'META', ?, 'x', 'EUR', 'UTC', 'ACTIVE', "
                "'2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000', 1, ?)",
                (uuid.uuid4().hex, uuid.uuid4().hex, f"act_{n}", request_id),
            )
    upgrade_to_head(url)
    assert no_diff(url) == []
    with sqlite3.connect(tmp_path / "adaccounts.db") as connection:
        copied = connection.execute(
            "SELECT count(*) FROM ad_account_requests r JOIN ad_accounts a ON a.request_id = r.request_id "
            "AND a.id = r.account_id AND a.create_time = r.create_time WHERE r.request_hash IS NULL"
        ).fetchone()
        assert copied == (2,)
        assert connection.execute("SELECT count(*) FROM ad_account_requests").fetchone() == (2,)


# --- the schema gate -----------------------------------------------------------------------


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def schema_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.endswith(".health") and "schema" in r.getMessage()]


@pytest.mark.parametrize("at", ["none", "0001", "0002"])
def test_a_server_on_a_database_behind_the_code_is_not_ready_until_migrated(
    fresh_db: URL, at: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adaccounts_server.health")
    if at != "none":
        upgrade_to(fresh_db, at)
    server = RunningServer(server_settings(fresh_db))
    try:
        expected = f"database schema at {at}, code expects {HEAD}: run `adaccounts migrate`"
        wait_until(lambda: any(expected in line for line in schema_lines(caplog)), 10, message=expected)
        time.sleep(1.0)  # deliberately: five more pings, and still one line, still not ready, still alive
        assert [line for line in schema_lines(caplog) if expected in line] == [f"health: NOT_SERVING ({expected})"]
        for service in ("", "readiness", "adaccounts.v1.AdAccountService"):
            assert health(server.target, service) == NOT_SERVING
        assert health(server.target, "liveness") == SERVING
        assert version_or_none(fresh_db) == (None if at == "none" else [at]), "the server must never migrate"

        upgrade_to_head(fresh_db)  # the Job runs; the server notices without a restart
        wait_until(lambda: health(server.target) == SERVING, 10, message="SERVING after migrate")
    finally:
        server.stop()


def test_a_server_on_a_database_ahead_of_the_code_keeps_serving(fresh_db: URL, caplog) -> None:
    # A newer release migrated, then the app was rolled back: expand/contract keeps old code working.
    caplog.set_level(logging.INFO, logger="adaccounts_server.health")
    upgrade_to_head(fresh_db)
    query(fresh_db, "UPDATE alembic_version SET version_num = '0004'")
    server = RunningServer(server_settings(fresh_db))
    try:
        wait_until(lambda: health(server.target) == SERVING, 10, message="SERVING")
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=5) == created
        assert schema_lines(caplog) == [
            f"health: SERVING (database schema at 0004, newer than this code's {HEAD} "
            "(a newer release migrated it; migrations are backward compatible))"
        ]
    finally:
        server.stop()
    # ... while the old release's migrate refuses to touch a schema it does not know.
    result = run("migrate", MIGRATION_DATABASE_URL=migrate_url(fresh_db))
    assert result.returncode == 1
    assert "revision 0004, which this code does not know" in failure_line(result)


# --- the two roles of docs/deploying.md ----------------------------------------------------


def readme_roles_sql() -> str:
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    match = re.search(r"```sql\n(.*?)```", deploying, re.S)
    assert match, "docs/deploying.md: no ```sql block with the roles"
    return match.group(1)


def test_the_readme_roles_migrator_migrates_and_the_app_role_serves_without_ddl_rights() -> None:
    suffix = uuid.uuid4().hex[:8]
    migrator, app, database = f"adaccounts_migrator_{suffix}", f"adaccounts_app_{suffix}", f"adaccounts_{suffix}"
    sql = readme_roles_sql()
    sql = re.sub(r"\badaccounts_migrator\b", migrator, sql)
    sql = re.sub(r"\badaccounts_app\b", app, sql)
    sql = re.sub(r"\badaccounts\b", database, sql)
    admin = make_url(ADMIN_URL)
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql not installed")
    created = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn(admin)], input=sql, capture_output=True, text=True
    )
    as_migrator = admin.set(drivername="postgresql+psycopg", username=migrator, database=database)
    as_app = admin.set(drivername="postgresql+psycopg", username=app, database=database)
    server = None
    try:
        assert created.returncode == 0, created.stderr

        denied = run("migrate", MIGRATION_DATABASE_URL=migrate_url(as_app))  # the app role cannot migrate
        assert denied.returncode == 1
        assert "permission denied" in failure_line(denied)

        migrated = run("migrate", MIGRATION_DATABASE_URL=migrate_url(as_migrator))
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr

        server = RunningServer(server_settings(as_app))
        wait_until(lambda: health(server.target) == SERVING, 10, message="SERVING as the app role")
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            created_account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            stub.UpdateAdAccount(
                pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=created_account.id, name="Renamed")), timeout=5
            )
            assert stub.ListAdAccounts(pb.ListAdAccountsRequest(), timeout=5).ad_accounts[0].name == "Renamed"
            stub.DeleteAdAccount(pb.DeleteAdAccountRequest(id=created_account.id), timeout=5)
        for ddl in ("CREATE TABLE intruder (i int)", "DROP INDEX ix_ad_accounts_name_id", "TRUNCATE ad_accounts"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                query(as_app, ddl)
    finally:
        if server is not None:
            server.stop()
        drop_database(ADMIN_URL, database)
        query(admin, f'DROP ROLE IF EXISTS "{migrator}"')
        query(admin, f'DROP ROLE IF EXISTS "{app}"')


def test_models_module_declares_the_new_indexes() -> None:
    names = {index.name for index in models.AdAccount.__table__.indexes}
    assert set(NEW_INDEXES) <= names
