"""A throwaway PostgreSQL primary with one streaming replica, for the read-replica tests and bench.

Never the shared PostgreSQL: both clusters are ThrowawayPostgres instances (a temporary
directory each, trust auth, 127.0.0.1 on free ports). The primary is initdb'ed and migrated
with the project's migrations; the replica is a `pg_basebackup -R` of it (its own replication
slot, so the primary keeps the WAL it has not had yet, however long it is down), started as a
hot standby: it gets the schema, and everything else, through replication.

    with PrimaryAndReplica() as pair:
        settings = server_settings(pair.primary.url, DATABASE_REPLICA_URLS=pair.replica_urls_setting)
        pair.pause_replay()   # the replica stays connected and answers, but falls behind
        pair.stall_replica()  # SIGSTOP: the replica accepts TCP connections and never answers

LSNs are ints here (a WAL position as a 64-bit integer: greater is newer), as the server's
x-consistency-token carries them (16 lowercase hex digits).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import psycopg
from adaccounts_server.migrate import upgrade_to_head
from sqlalchemy.engine import URL

from .pg_instance import ThrowawayPostgres
from .polling import wait_until

SLOT = "adaccounts_replica_1"


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' (PostgreSQL's pg_lsn text) -> its 64-bit integer."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_token(lsn: int) -> str:
    """An LSN as the server's x-consistency-token: 16 lowercase hex digits."""
    return f"{lsn:016x}"


class StandbyPostgres(ThrowawayPostgres):
    """A hot standby of `primary`: made by pg_basebackup on its first start (instead of initdb),
    a plain ThrowawayPostgres afterwards (stop, start, restart, pause/resume = SIGSTOP/SIGCONT of
    its postmaster and every child, cleanup)."""

    def __init__(self, primary: ThrowawayPostgres, slot: str = SLOT) -> None:
        super().__init__(primary.database)
        self.primary = primary
        self.slot = slot

    def start(self) -> None:
        if not self._initialised:
            self._run(
                "pg_basebackup",
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.primary.port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",  # standby.signal and primary_conninfo: a standby of the primary
                "-C",
                "-S",
                self.slot,
                "-c",
                "fast",
                "--no-sync",
            )
            # Appended as the standby's own (the primary's postgresql.conf came with the backup):
            # readable while replaying, and reporting its replay position to the primary each second.
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write("\n# tests/helpers/replication.py\nhot_standby = on\nwal_receiver_status_interval = 1s\n")
            # The primary's CREATE DATABASE came with the backup: nothing more to create.
            self._initialised = True
        super().start()


class PrimaryAndReplica:
    """A migrated throwaway primary and one streaming replica of it; cleaned up by cleanup()
    (or leaving the `with` block) whatever state they are in, even when start() failed halfway."""

    def __init__(self, database: str = "adaccounts", *, migrate: bool = True) -> None:
        self.primary = ThrowawayPostgres(database)
        self.replica = StandbyPostgres(self.primary)
        self._migrate = migrate

    def start(self) -> PrimaryAndReplica:
        self.primary.start()
        _allow_replication_from_loopback(self.primary)
        self.replica.start()
        if self._migrate:
            upgrade_to_head(self.primary.url)  # the replica gets the schema by replaying it
        self.wait_caught_up()
        return self

    def cleanup(self) -> None:
        try:
            self.replica.cleanup()
        finally:
            self.primary.cleanup()

    def __enter__(self) -> PrimaryAndReplica:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    # --- where the server under test connects ----------------------------------------------------

    @property
    def urls(self) -> tuple[URL, URL]:
        """(primary, replica): SQLAlchemy URLs (psycopg 3), as the `postgres` superuser."""
        return self.primary.url, self.replica.url

    @property
    def replica_urls(self) -> list[URL]:
        return [self.replica.url]

    @property
    def replica_urls_setting(self) -> str:
        """DATABASE_REPLICA_URLS: the replica URLs as one comma-separated string."""
        return ",".join(url.render_as_string(hide_password=False) for url in self.replica_urls)

    # --- WAL positions ---------------------------------------------------------------------------

    def primary_lsn(self) -> int:
        """Where the primary's WAL ends now: the end of the last record inserted, committed or not
        yet written out (the throwaway clusters run with synchronous_commit=off, so a commit's WAL
        may reach pg_current_wal_lsn(), and the replica, up to wal_writer_delay later)."""
        return _record_end(lsn_to_int(_one(self.primary, "SELECT pg_current_wal_insert_lsn()::text")))

    def replay_lsn(self) -> int:
        """How far the replica has replayed (0 before it has replayed anything)."""
        value = _one(self.replica, "SELECT pg_last_wal_replay_lsn()::text")
        return lsn_to_int(value) if value else 0

    def wait_caught_up(self, timeout: float = 30.0, lsn: int | None = None) -> int:
        """Until the replica has replayed `lsn` (default: the primary's position now); that LSN."""
        target = self.primary_lsn() if lsn is None else lsn
        wait_until(
            lambda: self.replay_lsn() >= target,
            timeout,
            interval=0.05,
            message=f"the replica to replay up to {int_to_token(target)}",
        )
        return target

    def end_wal_on_a_page_boundary(self, attempts: int = 20) -> int:
        """Write WAL (non-transactional logical messages: no table changes) until the last record
        ends exactly at the end of a WAL page, so that pg_current_wal_insert_lsn() is past the
        next page's header, where no replay position ever stops; that page boundary. Background
        WAL (a standby snapshot, say) may land meanwhile: then it tries again."""
        with contextlib.closing(psycopg.connect(self.primary.dsn, autocommit=True)) as connection:

            def insert_lsn() -> int:
                return lsn_to_int(connection.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])

            def emit(size: int) -> None:
                connection.execute("SELECT pg_logical_emit_message(false, 'pad', repeat('x', %s))", (size,))

            for _ in range(attempts):
                room = WAL_PAGE_BYTES - insert_lsn() % WAL_PAGE_BYTES
                if room < MESSAGE_RECORD_OVERHEAD_BYTES + 256:  # too little for a message with a long data header
                    emit(1000)  # on to the next page
                    continue
                emit(room - MESSAGE_RECORD_OVERHEAD_BYTES)
                after = insert_lsn()
                if _record_end(after) != after and _record_end(after) % WAL_PAGE_BYTES == 0:
                    return _record_end(after)
        raise RuntimeError(f"could not end the WAL on a page boundary in {attempts} attempts")

    # --- faults ----------------------------------------------------------------------------------

    def pause_replay(self) -> None:
        """The replica keeps receiving WAL and answering queries, but replays nothing more: it
        falls behind with each write on the primary (pg_wal_replay_pause)."""
        _one(self.replica, "SELECT pg_wal_replay_pause()")
        wait_until(
            lambda: _one(self.replica, "SELECT pg_get_wal_replay_pause_state()") == "paused",
            10,
            message="the replica's replay to pause",
        )

    def resume_replay(self) -> None:
        _one(self.replica, "SELECT pg_wal_replay_resume()")

    def replay_paused(self) -> bool:
        return _one(self.replica, "SELECT pg_is_wal_replay_paused()") is True

    def stop_replica(self) -> None:
        """Fast shutdown of the replica (its clients disconnected)."""
        self.replica.stop()

    def start_replica(self) -> None:
        self.replica.start()

    def restart_replica(self) -> None:
        self.replica.restart()

    def stall_replica(self) -> None:
        """SIGSTOP the replica's postmaster and all its children: TCP connects still succeed,
        nothing is ever answered."""
        self.replica.pause()

    def unstall_replica(self) -> None:
        """SIGCONT all that stall_replica() stopped (a no-op when not stalled)."""
        self.replica.resume()

    def postmaster_pid(self, which: str = "primary") -> int | None:
        """The postmaster of `which` ('primary' | 'replica'), None when it is not running."""
        return (self.primary if which == "primary" else self.replica)._postmaster_pid()

    @property
    def directories(self) -> tuple[Path, Path]:
        return self.primary.directory, self.replica.directory


WAL_PAGE_BYTES = 8192
WAL_SEGMENT_BYTES = 16 * 1024 * 1024
SHORT_PAGE_HEADER_BYTES, LONG_PAGE_HEADER_BYTES = 24, 40  # MAXALIGNed XLogPageHeaderData / XLogLongPageHeaderData
# A pg_logical_emit_message(false, 'pad', <n bytes>) record is MAXALIGN(n + this) bytes, for n of 256 or more
# (XLogRecord, a long data block header, xl_logical_message, the prefix 'pad' and its NUL): PostgreSQL 15, 64-bit.
MESSAGE_RECORD_OVERHEAD_BYTES = 57


def _record_end(insert_lsn: int) -> int:
    """pg_current_wal_insert_lsn() is where the next record begins: past the page header when the
    last record ended on a page boundary, where no replay position ever stops. The end of the last
    record instead, so that waiting for a replica to reach it cannot wait for a record to come."""
    if insert_lsn % WAL_SEGMENT_BYTES == LONG_PAGE_HEADER_BYTES:
        return insert_lsn - LONG_PAGE_HEADER_BYTES
    if insert_lsn % WAL_PAGE_BYTES == SHORT_PAGE_HEADER_BYTES:
        return insert_lsn - SHORT_PAGE_HEADER_BYTES
    return insert_lsn


def _allow_replication_from_loopback(primary: ThrowawayPostgres) -> None:
    """initdb's pg_hba.conf has `host replication all 127.0.0.1/32 <auth>` (trust, with -A trust);
    add it if a future initdb does not, and reload."""
    hba = primary.data / "pg_hba.conf"
    lines = [line.split() for line in hba.read_text().splitlines() if not line.lstrip().startswith("#")]
    if any(words[:4] == ["host", "replication", "all", "127.0.0.1/32"] for words in lines if len(words) >= 4):
        return
    with hba.open("a") as conf:
        conf.write("host replication all 127.0.0.1/32 trust\n")
    _one(primary, "SELECT pg_reload_conf()")


def _one(instance: ThrowawayPostgres, query: str) -> object:
    """The single value `query` returns on `instance` (a connection of its own, autocommit)."""
    with contextlib.closing(psycopg.connect(instance.dsn, autocommit=True)) as connection:
        row = connection.execute(query).fetchone()
    return row[0] if row else None
