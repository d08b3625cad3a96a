"""The contract: committed generated code matches protos/, buf lint passes, and
the service and method names are the ones clients are promised."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "clients"
GENERATED = sorted(
    path
    for pattern in ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")
    for path in (CLIENTS / "adaccounts" / "v1").glob(pattern)
)
# Pinned so that a new buf release cannot change what "lint passes" means.
BUF = "@bufbuild/buf@1.75.0"
REGENERATE = "run `python scripts/generate_protos.py` and commit the result"


def _generate_protos_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    assert GENERATED, "no generated code under clients/adaccounts/v1"
    _generate_protos_module().generate(tmp_path)
    fresh = sorted(
        path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file() and path.suffix in (".py", ".pyi")
    )
    committed = sorted(path.relative_to(CLIENTS) for path in GENERATED)
    assert fresh == committed, f"generated files differ from the committed ones: {REGENERATE}"
    stale = [str(name) for name in committed if (tmp_path / name).read_bytes() != (CLIENTS / name).read_bytes()]
    assert not stale, f"stale generated code {stale}: {REGENERATE}"


@pytest.mark.timeout(600)  # the first run downloads buf
def test_buf_lint_passes() -> None:
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail(f"npx not found: install Node.js (with npm) to run `npx --yes {BUF} lint`")
    result = subprocess.run(
        [npx, "--yes", BUF, "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, f"`npx {BUF} lint` failed:\n{result.stdout}{result.stderr}"


def test_service_and_method_names() -> None:
    assert pb.DESCRIPTOR.package == "adaccounts.v1"
    service = pb.DESCRIPTOR.services_by_name["AdAccountService"]
    assert service.full_name == "adaccounts.v1.AdAccountService"
    assert [method.name for method in service.methods] == [
        "GetAdAccount",
        "BatchGetAdAccounts",
        "ListAdAccounts",
        "CreateAdAccount",
        "UpdateAdAccount",
        "DeleteAdAccount",
    ]
    expected_io = {
        "GetAdAccount": ("GetAdAccountRequest", "AdAccount"),
        "BatchGetAdAccounts": ("BatchGetAdAccountsRequest", "BatchGetAdAccountsResponse"),
        "ListAdAccounts": ("ListAdAccountsRequest", "ListAdAccountsResponse"),
        "CreateAdAccount": ("CreateAdAccountRequest", "AdAccount"),
        "UpdateAdAccount": ("UpdateAdAccountRequest", "AdAccount"),
        "DeleteAdAccount": ("DeleteAdAccountRequest", "google.protobuf.Empty"),
    }
    for method in service.methods:
        request, response = expected_io[method.name]
        assert method.input_type.full_name.removeprefix("adaccounts.v1.") == request
        assert method.output_type.full_name.removeprefix("adaccounts.v1.") == response
        assert not method.client_streaming and not method.server_streaming


def test_proto_path_and_stub() -> None:
    from adaccounts.v1 import ad_accounts_pb2_grpc

    assert pb.DESCRIPTOR.name == "adaccounts/v1/ad_accounts.proto"
    assert hasattr(ad_accounts_pb2_grpc, "AdAccountServiceStub")
