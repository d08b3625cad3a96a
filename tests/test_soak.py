"""Soak: a bounded run of steady mixed load against an in-process server on the real PostgreSQL.

Six client threads call Get/List/Create/Update/Delete for SOAK_SECONDS (default 60; set it to
a few hundred for a longer soak). Memory (RSS of this process, which holds the server and the
clients) is sampled after a warm-up and at the end; growth must stay under a generous bound,
and at rest no connection may stay checked out of the pool. The figures are printed
(`pytest -m faults -s tests/test_soak.py`).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil
import pytest
from helpers.load import OK, Load, codes_text
from helpers.polling import wait_until
from helpers.server import RunningServer
from helpers.settings import server_settings

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
WARM_UP_S = min(10.0, SOAK_SECONDS / 6)
SAMPLE_EVERY_S = 5.0
RSS_GROWTH_BOUND_MB = 50.0

pytestmark = pytest.mark.faults  # not `slow`: that is the clean-venv installs (docs/development.md)

MB = 1024 * 1024


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / MB


@pytest.mark.timeout(SOAK_SECONDS + 120)
def test_soak_keeps_memory_flat_and_leaves_no_connection_checked_out(database_url, clean_db):
    running = RunningServer(server_settings(database_url))
    pause = threading.Event()  # never set: waits below are the soak's own pacing
    try:
        load = Load(running.target, threads=6, record=False)
        began = time.monotonic()
        with load:
            pause.wait(WARM_UP_S)
            start_rss = rss_mb()
            samples = [(time.monotonic() - began, start_rss)]
            ends = began + WARM_UP_S + SOAK_SECONDS
            while (left := ends - time.monotonic()) > 0:
                pause.wait(min(SAMPLE_EVERY_S, left))
                samples.append((time.monotonic() - began, rss_mb()))
        took = time.monotonic() - began
        end_rss = samples[-1][1]
        calls = sum(load.counts.values())
        codes = load.counts_by_code()

        wait_until(lambda: running.app.guard.in_flight == 0, 10, message="no call in progress")
        # At rest means that the count comes back to zero (a leaked connection never would).
        wait_until(lambda: running.app.database.checked_out() == 0, 10, message="no connection checked out")
        checked_out = running.app.database.checked_out()
    finally:
        running.stop()

    peak = max(rss for _, rss in samples)
    half = samples[len(samples) // 2][1]
    print(
        f"\n[soak] {took:.0f} s ({WARM_UP_S:.0f} s warm-up + {SOAK_SECONDS:.0f} s measured), 6 threads: {calls} calls"
        f" ({calls / took:.0f}/s): {codes_text(codes)}; RSS after warm-up {start_rss:.1f} MB, at the end"
        f" {end_rss:.1f} MB (growth {end_rss - start_rss:+.1f} MB, second half {end_rss - half:+.1f} MB,"
        f" peak {peak:.1f} MB); checked out at rest: {checked_out}\n"
        f"[soak] RSS samples (s, MB): {', '.join(f'{t:.0f}:{rss:.1f}' for t, rss in samples)}"
    )
    assert set(codes) == {OK}, f"calls failed on a healthy database: {codes_text(codes)}"
    assert end_rss - start_rss < RSS_GROWTH_BOUND_MB
    assert checked_out == 0
