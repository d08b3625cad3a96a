"""TLS and mutual TLS from settings: who gets in, who is refused, and certificates rotated in place."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server.config import SettingsError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.pki import CertificateAuthority, Issued
from helpers.polling import wait_until
from helpers.server import RunningServer
from helpers.settings import server_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = CertificateAuthority(folder, "trusted"), CertificateAuthority(folder, "other")
    return {
        "ca": ca,
        "other_ca": other_ca,
        "server": ca.issue("localhost", server=True),
        "client": ca.issue("billing-service", server=False),
        "stranger": other_ca.issue("billing-service", server=False),  # same name, wrong CA
    }


def tls_settings(database_url, mode: str, server: Issued, client_ca: Path | None = None, **overrides: object):
    values: dict[str, object] = {
        "GRPC_TLS": mode,
        "GRPC_TLS_CERT_FILE": server.cert,
        "GRPC_TLS_KEY_FILE": server.key,
    }
    if client_ca is not None:
        values["GRPC_TLS_CLIENT_CA_FILE"] = client_ca
    values.update(overrides)
    return server_settings(database_url, **values)


@pytest.fixture(scope="module")
def mtls_server(database_url, pki) -> Iterator[RunningServer]:
    running = RunningServer(tls_settings(database_url, "mtls", pki["server"], pki["ca"].cert))
    yield running
    running.stop()


def credentials(ca: CertificateAuthority, client: Issued | None = None) -> grpc.ChannelCredentials:
    key, chain = client.pair() if client else (None, None)
    return grpc.ssl_channel_credentials(ca.cert.read_bytes(), private_key=key, certificate_chain=chain)


def list_accounts(target: str, channel_credentials: grpc.ChannelCredentials | None) -> pb.ListAdAccountsResponse:
    channel = (
        grpc.insecure_channel(target)
        if channel_credentials is None
        else grpc.secure_channel(target, channel_credentials)
    )
    with channel:
        return pb_grpc.AdAccountServiceStub(channel).ListAdAccounts(pb.ListAdAccountsRequest(page_size=1), timeout=5)


def refused(target: str, channel_credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        list_accounts(target, channel_credentials)
    return raised.value.code()


def test_mtls_lets_in_a_client_with_a_certificate_from_the_ca(mtls_server, pki):
    list_accounts(mtls_server.target, credentials(pki["ca"], pki["client"]))
    with grpc.secure_channel(mtls_server.target, credentials(pki["ca"], pki["client"])) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, pki):
    assert refused(mtls_server.target, credentials(pki["ca"])) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server, pki):
    assert refused(mtls_server.target, credentials(pki["ca"], pki["stranger"])) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_plaintext(mtls_server):
    assert refused(mtls_server.target, None) == grpc.StatusCode.UNAVAILABLE


def test_tls_without_client_certificates_and_the_client_checks_the_server(database_url, pki):
    running = RunningServer(tls_settings(database_url, "tls", pki["server"]))
    try:
        list_accounts(running.target, credentials(pki["ca"]))
        # A client that trusts another CA does not accept this server; a plaintext one cannot talk to it.
        assert refused(running.target, credentials(pki["other_ca"])) == grpc.StatusCode.UNAVAILABLE
        assert refused(running.target, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_plaintext_server_is_the_default(server):
    assert server.app.settings.GRPC_TLS == "off"
    list_accounts(server.target, None)


def test_certificates_replaced_in_place_are_served_to_new_connections(database_url, tmp_path, pki):
    old = pki["ca"].issue("localhost", server=True, file_name="rotating")
    running = RunningServer(tls_settings(database_url, "tls", old))
    try:
        list_accounts(running.target, credentials(pki["ca"]))
        new_ca = CertificateAuthority(tmp_path, "rotated")
        new = new_ca.issue("localhost", server=True)
        for source, target in ((new.cert, old.cert), (new.key, old.key)):  # as a re-mounted Secret does
            staged = target.with_suffix(".tmp")
            staged.write_bytes(source.read_bytes())
            os.replace(staged, target)
        list_accounts(running.target, credentials(new_ca))
        assert refused(running.target, credentials(pki["ca"])) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("mode", "files", "named"),
    [
        ("tls", {}, "GRPC_TLS_CERT_FILE: required with GRPC_TLS=tls"),
        ("tls", {"GRPC_TLS_CERT_FILE": "server"}, "GRPC_TLS_KEY_FILE: required with GRPC_TLS=tls"),
        ("mtls", {"GRPC_TLS_CERT_FILE": "server", "GRPC_TLS_KEY_FILE": "key"}, "GRPC_TLS_CLIENT_CA_FILE: required"),
        ("off", {"GRPC_TLS_CERT_FILE": "server"}, "GRPC_TLS_CERT_FILE: set, but GRPC_TLS=off does not use it"),
        (
            "tls",
            {"GRPC_TLS_CERT_FILE": "server", "GRPC_TLS_KEY_FILE": "key", "GRPC_TLS_CLIENT_CA_FILE": "ca"},
            "GRPC_TLS_CLIENT_CA_FILE: set, but GRPC_TLS=tls does not use it",
        ),
        ("tls", {"GRPC_TLS_CERT_FILE": "missing", "GRPC_TLS_KEY_FILE": "key"}, "GRPC_TLS_CERT_FILE: cannot read"),
        ("tls", {"GRPC_TLS_CERT_FILE": "key", "GRPC_TLS_KEY_FILE": "key"}, "GRPC_TLS_CERT_FILE: "),
        ("tls", {"GRPC_TLS_CERT_FILE": "server", "GRPC_TLS_KEY_FILE": "server"}, "GRPC_TLS_KEY_FILE: "),
        ("plaintext", {}, "GRPC_TLS: "),
    ],
)
def test_tls_settings_are_checked_in_one_line(database_url, pki, tmp_path, mode, files, named):
    paths = {
        "server": pki["server"].cert,
        "key": pki["server"].key,
        "ca": pki["ca"].cert,
        "missing": tmp_path / "nope.pem",
    }
    with pytest.raises(SettingsError) as raised:
        server_settings(database_url, GRPC_TLS=mode, **{name: paths[which] for name, which in files.items()})
    message = str(raised.value)
    assert message.startswith(named), message
    assert "\n" not in message


def check(*args: str) -> subprocess.CompletedProcess[str]:
    adaccounts = shutil.which("adaccounts")
    assert adaccounts, "pip install --no-deps -e ./clients -e ."
    return subprocess.run([adaccounts, "check", *args], capture_output=True, text=True, timeout=30)


def test_adaccounts_check_speaks_mtls(mtls_server, pki):
    target = ["--target", mtls_server.target, "--service", "liveness"]
    ca, client = str(pki["ca"].cert), pki["client"]
    good = check(*target, "--ca", ca, "--cert", str(client.cert), "--key", str(client.key))
    assert (good.returncode, good.stdout.strip()) == (0, f"{mtls_server.target} 'liveness': SERVING"), good.stderr
    no_cert = check(*target, "--ca", ca)
    assert no_cert.returncode == 1
    assert "UNAVAILABLE" in no_cert.stdout
    plaintext = check(*target)
    assert plaintext.returncode == 1
    assert "UNAVAILABLE" in plaintext.stdout
    for bad in (["--ca", ca, "--cert", str(client.cert)], ["--cert", str(client.cert), "--key", str(client.key)]):
        usage = check(*target, *bad)
        assert usage.returncode == 2
        assert "--cert and --key go together" in usage.stderr
    missing = check(*target, "--ca", "/nonexistent/ca.pem")
    assert missing.returncode == 2
    assert "cannot read /nonexistent/ca.pem" in missing.stderr


def test_plaintext_health_port_serves_probes_and_nothing_else(database_url, pki):
    """Kubernetes' native gRPC probes cannot do TLS: GRPC_HEALTH_PORT gives them health alone."""
    settings = tls_settings(database_url, "mtls", pki["server"], pki["ca"].cert, GRPC_HEALTH_PORT=0)
    running = RunningServer(settings)
    try:
        health_target = f"127.0.0.1:{running.app.health_port}"
        with grpc.insecure_channel(health_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "liveness", "readiness"):
                wait_until(
                    lambda service=service: (
                        health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ),
                    10,
                    interval=0.1,
                    message=f"{service!r} SERVING on the health port",
                )
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.AdAccountServiceStub(channel).ListAdAccounts(pb.ListAdAccountsRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        refused(running.target, None)  # the main port still requires mutual TLS
    finally:
        running.stop()
