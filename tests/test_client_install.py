"""The client distribution installs on its own: into a clean virtual environment it brings
gRPC and protobuf but none of the server's stack, and from there it calls the server.

Slow (a venv and a pip install, about 10-20 s) but in the default suite on purpose: it is
the one test that catches a server dependency creeping into the client package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from test_client import CLIENTS

SERVER_STACK = ("sqlalchemy", "sqlmodel", "psycopg", "pydantic_settings", "pydantic", "alembic", "adaccounts_server")

CHECK_ABSENT = """
import importlib.util, sys
present = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is not None]
print(" ".join(present))
"""

CALL_THE_SERVER = textwrap.dedent(
    """
    import sys, uuid
    from adaccounts import PLATFORM_GOOGLE, AdAccount, AdAccountsClient, NotFound

    target, owner = sys.argv[1], sys.argv[2]
    with AdAccountsClient(target, timeout=10) as client:
        created = client.create(AdAccount(owner_id=owner, platform=PLATFORM_GOOGLE, external_id="installed-1",
                                          name="From a clean venv", currency_code="EUR", time_zone="UTC"))
        assert client.get(created.id) == created
        try:
            client.get(str(uuid.uuid4()))
        except NotFound as error:
            assert error.code.name == "NOT_FOUND"
        print(created.id)
    """
)


def run(*command: str | Path, cwd: Path) -> str:
    # A clean environment for the child: no PYTHONPATH or virtualenv leaking in from this one.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_client_installs_without_the_server_stack_and_calls_the_server(tmp_path, server, stub, clean_db):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "clients"
    shutil.copytree(CLIENTS, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source, cwd=tmp_path)

    installed = run(python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check", cwd=tmp_path)
    assert "adaccounts-client==" in installed.lower().replace("_", "-")
    present = run(python, "-c", CHECK_ABSENT, *SERVER_STACK, cwd=tmp_path).split()
    assert present == [], f"the client venv can import the server's stack: {present}\n{installed}"

    owner = str(uuid.uuid4())
    created_id = run(python, "-c", CALL_THE_SERVER, server.target, owner, cwd=tmp_path).strip()
    stored = stub.GetAdAccount(pb.GetAdAccountRequest(id=created_id), timeout=5)
    assert (stored.owner_id, stored.external_id) == (owner, "installed-1")
