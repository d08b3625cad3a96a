"""The `adaccounts` console script, run for real in subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from .polling import wait_until
from .settings import ADMIN_URL, without_settings

# The console script installed next to this interpreter (the README's test command installs it).
ADACCOUNTS = shutil.which("adaccounts", path=str(Path(sys.executable).parent)) or shutil.which("adaccounts")
TIMEOUT_S = 15.0
SERVING = health_pb2.HealthCheckResponse.SERVING
# Reconnect quickly while polling a server that is still starting.
FAST_RECONNECT = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without any server setting, plus `settings`."""
    env = without_settings(dict(os.environ))
    env.update(settings)
    return env


def run(cwd: Path, *args: str, timeout: float = TIMEOUT_S, **settings: str) -> subprocess.CompletedProcess[str]:
    """`adaccounts ARGS` in `cwd` with only the given settings."""
    assert ADACCOUNTS is not None, "the `adaccounts` console script is not installed"
    return subprocess.run(
        [ADACCOUNTS, *args], cwd=cwd, env=clean_env(**settings), capture_output=True, text=True, timeout=timeout
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def pg_url(database: str, password: str | None = None) -> str:
    """A bare postgresql:// URL (as operators write it) to a database on the test server."""
    url = make_url(ADMIN_URL).set(drivername="postgresql", database=database)
    if password is not None:
        url = url.set(password=password)
    return url.render_as_string(hide_password=False)


@dataclass
class Served:
    """`adaccounts serve` in a subprocess, its output in files (never a full pipe)."""

    process: subprocess.Popen[bytes]
    target: str
    stdout: Path
    stderr: Path

    @property
    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def wait_serving(self, service: str = "", timeout: float = TIMEOUT_S) -> None:
        request = health_pb2.HealthCheckRequest(service=service)
        with grpc.insecure_channel(self.target, options=FAST_RECONNECT) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                if self.process.poll() is not None:
                    pytest.fail(f"serve exited with {self.process.returncode} before SERVING:\n{self.output}")
                try:
                    return health.Check(request, timeout=0.5).status == SERVING
                except grpc.RpcError:
                    return False

            try:
                wait_until(serving, timeout, message=f"{service!r} SERVING on {self.target}")
            except AssertionError as error:
                pytest.fail(f"{error}:\n{self.output}")

    def terminate(self, timeout: float = TIMEOUT_S) -> int:
        """SIGTERM, then the exit code (killed and failed if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"serve did not exit within {timeout:g} s of SIGTERM:\n{self.output}")
