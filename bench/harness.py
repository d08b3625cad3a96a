"""What the standalone bench scripts share around their measurements: a working directory and
a cleanup stack that Ctrl-C and SIGTERM unwind, the exit on an interruption, the seeded
accounts, and the environment their servers run in."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/ is not a package; tests/helpers is
from helpers.settings import without_settings  # noqa: E402

PAGE_TOKEN_SECRET = "bench-page-token-secret-0123456789"


@contextlib.contextmanager
def bench_workdir(prefix: str) -> Iterator[tuple[Path, contextlib.ExitStack]]:
    """A temporary directory and a cleanup stack for what a run starts; both are undone on the
    way out, also when Ctrl-C (KeyboardInterrupt, even for a run started in the background,
    where SIGINT is inherited ignored) or SIGTERM (SystemExit) ends the run."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as cleanup:
        workdir = Path(tempfile.mkdtemp(prefix=prefix))
        cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        yield workdir, cleanup


def exit_with(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())`, and 130 with one line instead of a traceback after Ctrl-C."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("[bench] interrupted: everything it started has been stopped", file=sys.stderr)
        sys.exit(130)


def seed_accounts(dsn: str, rows: int) -> list[str]:
    """`rows` accounts over 1,000 owners with distinct create_times, vacuumed, analysed and
    written out (so no checkpoint lands in a measured run); their ids, in table order."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO ad_accounts (id, owner_id, platform, external_id, name, currency_code, time_zone,"
            " status, create_time, update_time, version)"
            " SELECT gen_random_uuid(), md5((i %% 1000)::text)::uuid, 'META', 'ext_' || i, 'Account ' || i, 'EUR',"
            " 'Europe/Paris', 'ACTIVE', '2026-01-01'::timestamptz + i * interval '1 second',"
            " '2026-01-01'::timestamptz + i * interval '1 second', 1 FROM generate_series(1, %s) AS i",
            (rows,),
        )
        connection.execute("VACUUM ANALYZE ad_accounts")
        connection.execute("CHECKPOINT")
        return [row[0] for row in connection.execute("SELECT id::text FROM ad_accounts").fetchall()]


def server_env(database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a server of this checkout: none of the caller's settings, bench/
    importable, the benches' common settings (successful calls unlogged, a short shutdown
    grace) and `settings` over them."""
    env = without_settings(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    env.update(
        DATABASE_URL=database_url,
        PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET,
        LOG_LEVEL="WARNING",
        GRPC_HOST="127.0.0.1",
        SHUTDOWN_GRACE_S="2",
    )
    env.update(settings)
    return env
