"""The client distribution installs on its own: into a clean virtual environment it brings
gRPC and protobuf but none of the server's stack, and from there it calls the server; and
there, as a calling service checks its code, the package passes mypy and a caller written
from the README (its examples, and the types they rely on) passes mypy --strict.

Slow (a venv, pip installs and a cold mypy run, about a minute) but in the default suite on
purpose: it is the one place that catches a server dependency creeping into the client
package, or a type only this checkout's stubs and settings make right.
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
from helpers.clients import CLIENTS
from helpers.doc_examples import examples

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


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A clean virtual environment with the client distribution installed, built from a copy
    (setuptools writes build/ and *.egg-info next to the sources); its python."""
    folder = tmp_path_factory.mktemp("client-venv")
    source = folder / "clients"
    shutil.copytree(CLIENTS, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = folder / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=folder)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", source, cwd=folder)
    return python


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_client_installs_without_the_server_stack_and_calls_the_server(client_venv, tmp_path, server, stub, clean_db):
    python = client_venv
    installed = run(python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check", cwd=tmp_path)
    assert "adaccounts-client==" in installed.lower().replace("_", "-")
    present = run(python, "-c", CHECK_ABSENT, *SERVER_STACK, cwd=tmp_path).split()
    assert present == [], f"the client venv can import the server's stack: {present}\n{installed}"

    owner = str(uuid.uuid4())
    created_id = run(python, "-c", CALL_THE_SERVER, server.target, owner, cwd=tmp_path).strip()
    stored = stub.GetAdAccount(pb.GetAdAccountRequest(id=created_id), timeout=5)
    assert (stored.owner_id, stored.external_id) == (owner, "installed-1")


# What a caller relies on, spelled out for mypy: assert_type fails the check on any other type
# (Any included), so an attribute that silently became Any is caught, not just one that is wrong.
CALLER_TYPES = textwrap.dedent(
    """
    from collections.abc import AsyncIterator, Iterator
    from typing import assert_type

    import grpc
    from adaccounts import (
        AdAccount, AdAccountsClient, AdAccountsError, AsyncAdAccountsClient, FieldViolation, Internal,
        InvalidArgument, ListAdAccountsResponse, RpcStatus,
    )
    from google.protobuf import any_pb2


    def errors(error: AdAccountsError, invalid: InvalidArgument, internal: Internal) -> None:
        assert_type(error.code, grpc.StatusCode)
        assert_type(error.details, str)
        assert_type(error.request_id, str | None)
        assert_type(error.status, RpcStatus | None)
        if error.status is not None:
            assert_type(error.status.code, int)
            assert_type(error.status.message, str)
            for detail in error.status.details:
                assert_type(detail, any_pb2.Any)
        assert_type(invalid.field_violations, list[FieldViolation])
        assert_type(internal.error_id, str | None)


    def sync_calls(client: AdAccountsClient, account: AdAccount) -> None:
        assert_type(client.get("id"), AdAccount)
        assert_type(client.batch_get(["id"]), list[AdAccount])
        assert_type(client.list(platforms=["PLATFORM_META"]), ListAdAccountsResponse)
        assert_type(client.iter_ad_accounts(), Iterator[AdAccount])
        assert_type(client.create(account), AdAccount)
        assert_type(client.update(account), AdAccount)
        assert_type(client.delete("id"), None)


    async def async_calls(client: AsyncAdAccountsClient, account: AdAccount) -> None:
        assert_type(await client.get("id"), AdAccount)
        assert_type(await client.batch_get(["id"]), list[AdAccount])
        assert_type(await client.list(), ListAdAccountsResponse)
        assert_type(client.iter_ad_accounts(), AsyncIterator[AdAccount])
        assert_type(await client.create(account), AdAccount)
        assert_type(await client.update(account), AdAccount)
        assert_type(await client.delete("id"), None)
    """
)

# What a calling service installs to type-check its code (as in the client's README).
TYPE_CHECKING = ("mypy>=1.13", "grpc-stubs>=1.53", "types-protobuf>=5.29")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_package_passes_mypy_and_a_caller_from_the_docs_mypy_strict(client_venv, tmp_path):
    python = client_venv
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TYPE_CHECKING, cwd=tmp_path)
    # The README's claim, as it stands: the package as installed.
    run(python, "-m", "mypy", "--no-incremental", "-p", "adaccounts", cwd=tmp_path)

    caller = tmp_path / "caller"
    caller.mkdir()
    files = []
    for number, example in enumerate(examples("python"), start=1):
        path = caller / f"example_{number}.py"  # each its own module: mypy checks them one by one
        path.write_text(f"# {example.name}\n{example.code}")
        files.append(path)
    types = caller / "caller_types.py"
    types.write_text(CALLER_TYPES)
    files.append(types)
    run(python, "-m", "mypy", "--no-incremental", "--strict", *files, cwd=caller)
