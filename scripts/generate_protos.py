"""Generate the Python code for the contract in protos/ (the one codegen command).

    python scripts/generate_protos.py            # writes clients/adaccounts/v1/*_pb2*.py{,i}

Generated files are never edited by hand: change the .proto and run this again.
tests/test_contract.py fails when the committed files are stale.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def _plugin(name: str) -> str:
    """A protoc plugin installed next to this interpreter (the `test` dependency group)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: pip install -r requirements-dev.lock (it comes with mypy-protobuf)")
    return found


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) over every .proto under protos/ into out_dir."""
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # Type stubs for the service stubs too (mypy-protobuf), so editors and mypy see
        # each method's request and response types.
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTOS)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed (see the messages above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: clients/)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
