"""The server as a new user installs it: its wheel, and the client's (which alone owns the
generated contract, package `adaccounts`), built from the checkout and installed into a clean
virtual environment, pip resolving the server's dependencies from the index this machine's pip
is set up with; then, from a directory outside the checkout, `adaccounts migrate` and
`adaccounts serve` against a new PostgreSQL database. Also: `pip check` is clean there, and no
file belongs to two distributions.

Slow (two wheel builds, a venv, a full install: about a minute) but in the default suite: it is
the one test of the server as released rather than as checked out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import adaccounts
import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server.migrate import revisions
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.databases import create_database, drop_database
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.settings import ADMIN_URL, PAGE_TOKEN_SECRET, without_settings
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
SERVER_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SERVING = health_pb2.HealthCheckResponse.SERVING
TIMEOUT_S = 20.0

# Run in the venv: every installed distribution and the files its RECORD lists.
OWNERS = """
import json
from importlib.metadata import distributions
print(json.dumps({dist.metadata["Name"]: [str(f) for f in dist.files or ()] for dist in distributions()}))
"""


def environment(**settings: str) -> dict[str, str]:
    """This machine's environment (its pip configuration included) without any server setting,
    virtualenv or PYTHONPATH of this test run's, plus `settings`."""
    env = {k: v for k, v in without_settings(dict(os.environ)).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(settings)
    return env


def run(*command: str | Path, cwd: Path, timeout: float = 300, **settings: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=environment(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{' '.join(map(str, command[:4]))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the two wheels installed (dependencies resolved by pip); its bin/."""
    folder = tmp_path_factory.mktemp("wheel-install")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = folder / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("clients", "server"):
        ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "*.db")
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    dist = folder / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, source / "clients", source, cwd=folder)
    wheels = sorted(dist.glob("*.whl"))
    assert [wheel.name.split("-")[0] for wheel in wheels] == ["adaccounts_client", "adaccounts_server"], wheels

    run(sys.executable, "-m", "venv", folder / "venv", cwd=folder)
    bin_dir = folder / "venv" / "bin"
    # Not --no-deps: pip resolves every dependency of the server, the client's from its wheel.
    run(bin_dir / "python", "-m", "pip", "install", "--disable-pip-version-check", *wheels, cwd=folder)
    return bin_dir


@pytest.fixture
def empty_db() -> Iterator[str]:
    name = f"adaccounts_wheel_{uuid.uuid4().hex[:12]}"
    create_database(ADMIN_URL, name)
    try:
        yield make_url(ADMIN_URL).set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    finally:
        drop_database(ADMIN_URL, name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pip_check_is_clean_and_no_file_belongs_to_two_distributions(venv: Path, tmp_path: Path) -> None:
    check = run(venv / "python", "-m", "pip", "check", "--disable-pip-version-check", cwd=tmp_path)
    assert "No broken requirements found" in check.stdout

    owned = json.loads(run(venv / "python", "-c", OWNERS, cwd=tmp_path).stdout)
    owners: dict[str, list[str]] = {}
    for distribution, files in owned.items():
        for file in files:
            owners.setdefault(file, []).append(distribution)
    shared = {file: names for file, names in owners.items() if len(names) > 1}
    assert shared == {}, f"files owned by more than one distribution: {shared}"
    # The contract is the client's alone; the server ships its code and its migrations.
    assert {owners[f][0] for f in owners if f.startswith("adaccounts/")} == {"adaccounts-client"}
    server = [f for f, names in owners.items() if names == ["adaccounts-server"]]
    assert not [f for f in server if f.startswith("adaccounts/")]
    for revision in revisions():
        assert [f for f in server if f.startswith(f"adaccounts_server/migrations/versions/{revision}_")], revision
    assert "adaccounts_server/migrations/env.py" in server
    assert "adaccounts_server/migrations/script.py.mako" in server


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_migrate_and_serve_from_outside_the_checkout(venv: Path, tmp_path: Path, empty_db: str) -> None:
    elsewhere = tmp_path / "elsewhere"  # no pyproject, no migrations, no .env: only the install
    elsewhere.mkdir()
    adaccounts_cli = venv / "adaccounts"

    version = run(adaccounts_cli, "--version", cwd=elsewhere)
    assert version.stdout.strip() == (
        f"adaccounts {SERVER_VERSION} (contract adaccounts.v1, client {adaccounts.__version__})"
    )
    where = run(venv / "python", "-c", "import adaccounts_server.migrate as m; print(m.MIGRATIONS_DIR)", cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(venv.parent), where.stdout

    # The database URL is all a migrate needs.
    migrate = run(adaccounts_cli, "migrate", cwd=elsewhere, DATABASE_URL=empty_db)
    head = revisions()[-1]
    assert migrate.stdout.strip().endswith(f"is at the current schema ({head}); applied {', '.join(revisions())}")
    assert "Traceback" not in migrate.stderr

    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(adaccounts_cli), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=elsewhere,
            env=environment(DATABASE_URL=empty_db, PAGE_TOKEN_SECRET=PAGE_TOKEN_SECRET),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()}"
                try:
                    return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == SERVING
                except grpc.RpcError:
                    return False

            try:
                wait_until(serving, TIMEOUT_S, interval=0.1, message="SERVING")
            except AssertionError as error:
                raise AssertionError(f"{error}:\n{log.read_text()}") from None
            stub = pb_grpc.AdAccountServiceStub(channel)
            created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
            assert stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=5) == created
        check = run(adaccounts_cli, "check", "--target", target, cwd=elsewhere)
        assert check.stdout.strip() == f"{target} '': SERVING"

        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT_S) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in log.read_text()
    assert not (elsewhere / "adaccounts.db").exists(), "PostgreSQL configured: no SQLite file"
