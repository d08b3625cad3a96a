"""The benchmark's smoke mode runs to the end and prints its whole table, so bench/ never rots.

Only that it completes and prints every row: never a figure. Speed goals live in the
benchmark itself (the machine is shared and noisy), not in the tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    r"GetAdAccount",
    r"BatchGet\(100\)",
    r"List\(50\) page 1",
    r"List\(50\) page (?!1 )[\d,]+",  # the deep page: 2,000 in the full run, fewer in smoke
    r"Create",
    r"Update",
    # FastAPI's own deployment: uvicorn[standard] (the bench extra), on uvloop and httptools, psycopg 3.
    r"baseline: REST GET, FastAPI \+ SQLModel \(psycopg 3[^|]*\), uvicorn \(uvloop\.Loop, httptools\)[^|]*",
    r"baseline: echo RPC, no database",
    *(rf"ratio {number}: [^|]+" for number in range(1, 6)),
    r"peak RSS per server worker",
]


@pytest.mark.timeout(180)
def test_smoke_run_prints_every_row_of_the_table():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ROWS:
        assert re.search(rf"^\| {row} \|", result.stdout, re.MULTILINE), f"no row {row!r} in:\n{result.stdout}"
