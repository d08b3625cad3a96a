"""Prometheus metrics on their own port: scraped after traffic, the numbers moved."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server.config import SettingsError
from helpers.locks import row_lock
from helpers.polling import wait_until
from helpers.ports import free_port
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import server_settings
from prometheus_client.parser import text_string_to_metric_families

SERVICE = "adaccounts.v1.AdAccountService"


@pytest.fixture(scope="module")
def metrics_server(database_url) -> Iterator[RunningServer]:
    running = RunningServer(server_settings(database_url, METRICS_PORT=0, DB_POOL_SIZE=3))
    yield running
    running.stop()


# grpc-go's codes.Code.String() (google.golang.org/grpc/codes/code_string.go), which
# go-grpc-prometheus writes as grpc_code, by code number.
GO_CODE_NAMES = (
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def scrape_text(running: RunningServer, accept: str | None = None, query: str = "") -> str:
    port = running.app.metrics_port
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics{query}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def scrape(running: RunningServer) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The raw text and every sample, keyed by (name, sorted labels)."""
    text = scrape_text(running)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(running: RunningServer, condition, message: str):  # type: ignore[no-untyped-def]
    """The first scrape whose samples satisfy `condition`: a call is counted just after its
    status is sent, so a scrape made as the caller gets its answer may not count it yet."""

    def scraped():  # type: ignore[no-untyped-def]
        text, samples = scrape(running)
        return (text, samples) if condition(samples) else None

    return wait_until(scraped, 5, message=message)


def unary(method: str, **extra: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, **extra}


def test_metrics_move_with_traffic(metrics_server, clean_db):
    _, before = scrape(metrics_server)
    with grpc.insecure_channel(metrics_server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        created = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
        for _ in range(5):
            stub.GetAdAccount(pb.GetAdAccountRequest(id=created.id), timeout=5)
        for request in (pb.GetAdAccountRequest(id=str(uuid.uuid4())), pb.GetAdAccountRequest(id="not-a-uuid")):
            with pytest.raises(grpc.RpcError):
                stub.GetAdAccount(request, timeout=5)
    ping_count = value(before, "adaccounts_db_ping_seconds_count")

    def counted(samples) -> bool:  # type: ignore[no-untyped-def]
        return (
            value(samples, "grpc_server_handling_seconds_count", **unary("GetAdAccount"))
            - value(before, "grpc_server_handling_seconds_count", **unary("GetAdAccount"))
            >= 7
            and value(samples, "adaccounts_db_ping_seconds_count") > ping_count
        )

    text, after = scrape_until(metrics_server, counted, "the 7 calls counted and a ping or two observed")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("grpc_server_started_total", **unary("GetAdAccount")) == 7
    assert moved("grpc_server_handled_total", **unary("GetAdAccount", grpc_code="OK")) == 5
    assert moved("grpc_server_handled_total", **unary("GetAdAccount", grpc_code="NotFound")) == 1
    assert moved("grpc_server_handled_total", **unary("GetAdAccount", grpc_code="InvalidArgument")) == 1
    assert moved("grpc_server_handled_total", **unary("CreateAdAccount", grpc_code="OK")) == 1
    assert moved("grpc_server_handling_seconds_count", **unary("GetAdAccount")) == 7
    assert moved("grpc_server_handling_seconds_sum", **unary("GetAdAccount")) > 0
    # Cumulative buckets: every one of the 7 calls took less than 10 s.
    assert moved("grpc_server_handling_seconds_bucket", **unary("GetAdAccount", le="10.0")) == 7
    assert value(after, "adaccounts_rpcs_in_flight", grpc_service=SERVICE, grpc_method="GetAdAccount") == 0

    assert value(after, "adaccounts_db_pool_size") == 3
    # Every connection is back in the pool once the calls are done.
    assert value(after, "adaccounts_db_pool_checked_out") == 0
    assert value(after, "adaccounts_health_serving") == 1
    assert value(after, "adaccounts_db_ping_seconds_count") > value(before, "adaccounts_db_ping_seconds_count")
    assert value(after, "adaccounts_db_ping_seconds_sum") > 0
    assert "grpc_server_handling_seconds_bucket" in text


def test_codes_are_written_as_go_grpc_prometheus_does_and_nothing_is_created(metrics_server, clean_db):
    """Issue 13: a NOT_FOUND is counted as grpc_code="NotFound" (Go's spelling), and no scrape
    shows a `_created` series, in either exposition format Prometheus asks for."""
    with grpc.insecure_channel(metrics_server.target) as channel, pytest.raises(grpc.RpcError) as raised:
        pb_grpc.AdAccountServiceStub(channel).GetAdAccount(pb.GetAdAccountRequest(id=str(uuid.uuid4())), timeout=5)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    text, samples = scrape_until(
        metrics_server,
        lambda samples: value(samples, "grpc_server_handled_total", **unary("GetAdAccount", grpc_code="NotFound")),
        "the NOT_FOUND counted",
    )
    assert value(samples, "grpc_server_handled_total", **unary("GetAdAccount", grpc_code="NotFound")) >= 1
    assert 'grpc_code="NotFound"' in text
    codes = {dict(labels).get("grpc_code") for (name, labels) in samples if name == "grpc_server_handled_total"}
    assert codes <= set(GO_CODE_NAMES), f"not Go's spelling: {codes - set(GO_CODE_NAMES)}"
    openmetrics = scrape_text(metrics_server, accept=OPENMETRICS)
    assert 'grpc_code="NotFound"' in openmetrics
    # Asked for by name, too (prometheus_client's `name[]` filter).
    names = "?name[]=grpc_server_handled_created&name[]=grpc_server_handled_total"
    restricted = scrape_text(metrics_server, query=names)
    assert "grpc_server_handled_total{" in restricted
    for scraped in (text, openmetrics, restricted):
        assert "_created" not in scraped, [line for line in scraped.splitlines() if "_created" in line][:3]


def test_every_status_code_has_its_go_name() -> None:
    from adaccounts_server.metrics import GO_CODE_NAMES as SERVER_NAMES

    assert {code.value[0]: name for code, name in SERVER_NAMES.items()} == dict(enumerate(GO_CODE_NAMES))
    assert set(SERVER_NAMES) == set(grpc.StatusCode)


def test_in_flight_and_checked_out_show_a_call_in_progress(metrics_server, clean_db, database_url):
    with grpc.insecure_channel(metrics_server.target) as channel:
        stub = pb_grpc.AdAccountServiceStub(channel)
        account = stub.CreateAdAccount(pb.CreateAdAccountRequest(ad_account=new_account()), timeout=5)
        with row_lock(database_url, account.id):
            blocked = stub.UpdateAdAccount.future(
                pb.UpdateAdAccountRequest(ad_account=pb.AdAccount(id=account.id, name="waits")), timeout=20
            )
            scrape_until(
                metrics_server,
                lambda samples: (
                    value(samples, "adaccounts_rpcs_in_flight", grpc_service=SERVICE, grpc_method="UpdateAdAccount")
                    == 1
                    and value(samples, "adaccounts_db_pool_checked_out") >= 1
                ),
                "the blocked update in flight with a connection checked out",
            )
        blocked.result()


def test_health_status_and_secrets_in_the_scrape(database_url):
    password_url = database_url.set(password="Metr1csS3cret")  # trust auth: any password is accepted
    token = "metrics-test-token-abcdef0123456789"
    tokens = {hashlib.sha256(token.encode()).hexdigest(): {"name": "billing", "scope": "read"}}
    running = RunningServer(server_settings(password_url, METRICS_PORT=0, AUTH_TOKENS=json.dumps(tokens)))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            stub.ListAdAccounts(pb.ListAdAccountsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=5)
            with pytest.raises(grpc.RpcError):
                stub.ListAdAccounts(pb.ListAdAccountsRequest(), metadata=[("authorization", "Bearer x")], timeout=5)
        text, samples = scrape_until(
            running,
            lambda samples: value(samples, "grpc_server_handling_seconds_count", **unary("ListAdAccounts")) == 2,
            "both calls counted",
        )
    finally:
        running.stop()
    assert value(samples, "grpc_server_handled_total", **unary("ListAdAccounts", grpc_code="Unauthenticated")) == 1
    for secret in ("Metr1csS3cret", token, tokens and next(iter(tokens))):
        assert secret not in text


def test_metrics_are_off_unless_a_port_is_set(server):
    assert server.app.metrics_port is None


def test_a_bad_metrics_port_is_one_line(database_url):
    with pytest.raises(SettingsError) as raised:
        server_settings(database_url, METRICS_PORT=70000)
    assert str(raised.value).startswith("METRICS_PORT:")


def test_health_gauge_is_zero_while_the_database_is_unreachable(caplog):
    caplog.set_level(logging.INFO, logger="adaccounts_server.health")
    nothing_listens = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    running = RunningServer(server_settings(nothing_listens, METRICS_PORT=0))
    try:
        # The gauge reads 0 before the health monitor's first ping too: it says something only
        # once a ping has failed (the monitor logs it).
        wait_until(
            lambda: [
                r for r in caplog.records if r.getMessage().startswith("health: NOT_SERVING (database unreachable")
            ],
            10,
            message="the health monitor to find the database unreachable",
        )
        _, samples = scrape(running)
    finally:
        running.stop()
    assert ("adaccounts_health_serving", ()) in samples
    assert value(samples, "adaccounts_health_serving") == 0
    assert ("adaccounts_db_ping_seconds_count", ()) in samples
    assert value(samples, "adaccounts_db_ping_seconds_count") == 0  # no ping answered


def test_the_readme_alert_rules_and_metrics_table_name_real_metrics(metrics_server):
    root = Path(__file__).parent.parent
    operating = (root / "docs" / "operations.md").read_text()  # its metrics table
    rules = yaml.safe_load((root / "deploy" / "prometheus" / "alerts.yaml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == {"AdAccountsErrorRatio", "AdAccountsLatencyP99", "AdAccountsNotServing"}
    with grpc.insecure_channel(metrics_server.target) as channel:  # so that every per-call metric has a sample
        pb_grpc.AdAccountServiceStub(channel).ListAdAccounts(pb.ListAdAccountsRequest(), timeout=5)
    text, _ = scrape_until(
        metrics_server,
        lambda samples: value(samples, "grpc_server_handling_seconds_count", **unary("ListAdAccounts")),
        "the call counted",
    )
    exposed = {family.name for family in text_string_to_metric_families(text)}
    exposed |= {f"{name}_total" for name in exposed} | {f"{name}_bucket" for name in exposed}
    for name, expr in alerts.items():
        for metric in re.findall(r"\b((?:grpc_server|adaccounts)_[a-z_]+)", expr):
            assert metric in exposed, f"{name} uses {metric}, which the server does not expose"
        for codes in re.findall(r'grpc_code=~?"([^"]*)"', expr):
            for code in codes.split("|"):
                assert code in GO_CODE_NAMES, f"{name} matches grpc_code {code!r}, which is not Go's spelling"
    assert re.search(r'grpc_code=~"[^"]*\bInternal\b', alerts["AdAccountsErrorRatio"]), "Internal is an error"
    rows = re.findall(r"^\| `((?:grpc_server|adaccounts)_[a-z_]+)`(.*)$", operating, re.M)
    # The replicas' metrics exist only with DATABASE_REPLICA_URLS (test_docs checks them against metrics.py).
    table = [metric for metric, rest in rows if "DATABASE_REPLICA_URLS" not in rest]
    assert len(table) >= 7
    for metric in table:
        assert metric in exposed, f"docs/operations.md lists {metric}, which the server does not expose"
