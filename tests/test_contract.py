"""The contract: committed generated code matches protos/, buf lint passes, `buf breaking`
finds nothing against the last released contract, the service and method names are the ones
clients are promised, and the client's runtime floors are what its generated code demands."""

from __future__ import annotations

import ast
import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement
from packaging.version import Version

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
# The contract as last released (adaccounts-client 1.0.0): a Buf image of protos/ at that
# release, imports included, source info left out. Moved on at each release (clients/CHANGELOG.md).
RELEASED = ROOT / "protos" / "released.binpb"


def _generate_protos_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_protos", ROOT / "scripts" / "generate_protos.py")
    assert spec is not None
    assert spec.loader is not None
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


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail(f"npx not found: install Node.js (with npm) to run `npx --yes {BUF} {args[0]}`")
    return subprocess.run([npx, "--yes", BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=540)


@pytest.mark.timeout(600)  # the first run downloads buf
def test_buf_lint_passes() -> None:
    result = buf("lint")
    assert result.returncode == 0, f"`npx {BUF} lint` failed:\n{result.stdout}{result.stderr}"


@pytest.mark.timeout(600)
def test_no_breaking_change_since_the_last_release() -> None:
    """buf.yaml's `breaking` rules (FILE: wire, JSON and generated-code compatibility) against the
    released contract: removing, renumbering, retyping or renaming anything of adaccounts.v1 fails."""
    result = buf("breaking", "--against", str(RELEASED.relative_to(ROOT)))
    assert result.returncode == 0, (
        f"`npx {BUF} breaking --against {RELEASED.relative_to(ROOT)}` found changes that break adaccounts.v1 "
        f"clients:\n{result.stdout}{result.stderr}\nMake the change additive, or start adaccounts.v2."
    )


@pytest.mark.timeout(600)
def test_buf_breaking_catches_a_breaking_change(tmp_path: Path) -> None:
    """The check above is live: the same command on a copy of the contract with a field
    renumbered and an RPC removed fails, naming both."""
    shutil.copy2(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.binpb"))
    proto = tmp_path / "protos" / "adaccounts" / "v1" / "ad_accounts.proto"
    text = proto.read_text()
    broken = re.sub(r"string etag = (\d+);", lambda m: f"string etag = {int(m.group(1)) + 100};", text, count=1)
    broken = re.sub(r"\n\s*rpc DeleteAdAccount\([^)]*\) returns \([^)]*\)\s*(\{[^}]*\}|;)", "\n", broken, count=1)
    assert broken.count("etag = ") == text.count("etag = "), "edit failed"
    assert "rpc DeleteAdAccount" not in broken, "edit failed"
    proto.write_text(broken)
    result = buf("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode != 0, f"buf breaking passed a breaking change:\n{result.stdout}{result.stderr}"
    assert "etag" in result.stdout, result.stdout
    assert "DeleteAdAccount" in result.stdout, result.stdout


def test_the_released_image_holds_the_contract() -> None:
    """An image without adaccounts.v1 in it would make `buf breaking` compare nothing, and pass."""
    image = descriptor_pb2.FileDescriptorSet.FromString(RELEASED.read_bytes())  # a Buf image is one on the wire
    files = {file.name: file for file in image.file}
    released = files["adaccounts/v1/ad_accounts.proto"]
    assert released.package == "adaccounts.v1"
    assert [service.name for service in released.service] == ["AdAccountService"]
    assert {message.name for message in released.message_type} >= {"AdAccount", "ListAdAccountsRequest"}


def test_the_clients_runtime_floors_are_what_its_generated_code_demands() -> None:
    """The generated code refuses a grpcio older than GRPC_GENERATED_VERSION and a protobuf older
    than the version in its ValidateProtobufRuntimeVersion call: those are the client's floors,
    no higher (a caller may have any runtime the code works with) and no lower (pip would
    install a runtime the code refuses at import)."""
    grpc_code = (CLIENTS / "adaccounts" / "v1" / "ad_accounts_pb2_grpc.py").read_text()
    (grpc_generated,) = re.findall(r"^GRPC_GENERATED_VERSION = '([^']+)'$", grpc_code, re.M)
    pb2 = ast.parse((CLIENTS / "adaccounts" / "v1" / "ad_accounts_pb2.py").read_text())
    (check,) = [
        node
        for node in ast.walk(pb2)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "ValidateProtobufRuntimeVersion"
    ]
    major, minor, patch, suffix = (ast.literal_eval(arg) for arg in check.args[1:5])
    protobuf_generated = f"{major}.{minor}.{patch}{suffix}"

    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        (bound,) = [spec for spec in requirement.specifier if spec.operator == ">="]
        floors[requirement.name] = Version(bound.version)
    assert floors["grpcio"] == Version(grpc_generated), "grpcio's floor is GRPC_GENERATED_VERSION"
    assert floors["protobuf"] == Version(protobuf_generated), "protobuf's floor is the generated code's version"
    # grpcio-status of a release needs that release of grpcio: never above grpcio's floor.
    assert floors["grpcio-status"] <= floors["grpcio"]


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
        assert not method.client_streaming
        assert not method.server_streaming


def test_proto_path_and_stub() -> None:
    from adaccounts.v1 import ad_accounts_pb2_grpc

    assert pb.DESCRIPTOR.name == "adaccounts/v1/ad_accounts.proto"
    assert hasattr(ad_accounts_pb2_grpc, "AdAccountServiceStub")
