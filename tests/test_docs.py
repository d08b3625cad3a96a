"""The documentation matches the code: README.md and docs/ link only to files (and headings) that
exist and reach every page of docs/; docs/configuration.md is what scripts/generate_config_docs.py
writes from the settings' descriptions (as test_contract does for the generated code); every
setting has a description; the alert rules pass `promtool check rules` and their unit tests, fed
only series the server exposes; and the settings, metrics and CLI options the docs name are the
code's own."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import types
from functools import cache
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import yaml
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts_server.config import Settings
from adaccounts_server.metrics import GO_CODE_NAMES, Metrics, replica_metrics, server_gauges
from grpc_health.v1 import health_pb2
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS_DIR.rglob("*.md"))]
CONFIGURATION = DOCS_DIR / "configuration.md"
REGENERATE = "run `python scripts/generate_config_docs.py` and commit the result"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
# Labels Prometheus adds to every scraped series (the target's), not the server.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "container"}
README_MAX_LINES = 150


def _generate_config_docs_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_config_docs", ROOT / "scripts" / "generate_config_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the configuration reference --------------------------------------------------------------


def test_every_setting_has_a_description() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"settings without Field(description=...) in server/adaccounts_server/config.py: {missing}"


def test_the_configuration_doc_is_not_stale() -> None:
    fresh = _generate_config_docs_module().render()
    assert CONFIGURATION.exists(), f"no docs/configuration.md: {REGENERATE}"
    assert CONFIGURATION.read_text() == fresh, f"docs/configuration.md is stale: {REGENERATE}"
    for name in Settings.model_fields:
        assert f"| `{name}` |" in fresh


# --- links ------------------------------------------------------------------------------------

_FENCED = re.compile(r"^```.*?^```", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The file without its code (fenced blocks, inline code spans), where links are not links."""
    return _INLINE_CODE.sub("", _FENCED.sub("", path.read_text()))


@cache
def _anchors(path: Path) -> frozenset[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCED.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(anchors)


def _local_links(path: Path) -> list[tuple[str, Path, str]]:
    """(the link as written, the file or folder it points at, its anchor) for every local link."""
    found = []
    for target in _LINK.findall(_prose(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        found.append((target, (path.parent / file_part).resolve() if file_part else path, anchor))
    return found


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_local_link_resolves(doc: Path) -> None:
    broken = []
    for written, target, anchor in _local_links(doc):
        if not target.exists():
            broken.append(f"{written}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{written}: no heading with anchor #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_page_of_docs_is_reachable_from_the_readme() -> None:
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        todo += [target for _, target, _ in _local_links(page) if target.suffix == ".md" and target.is_file()]
    unreached = [str(page.relative_to(ROOT)) for page in DOCS_DIR.rglob("*.md") if page not in reached]
    assert not unreached, f"no chain of links from README.md leads to {unreached}"


def test_the_readme_stays_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/ and link it"


# --- names the docs mention -------------------------------------------------------------------

# UPPER_SNAKE words in the docs that are not settings of the server.
NOT_SETTINGS = {
    "ADACCOUNTS_TARGET",  # where the examples call (docs/api.md)
    "ADACCOUNTS_TEST_ADMIN_URL",  # the tests' PostgreSQL
    "OTEL_EXPORTER_OTLP_ENDPOINT",  # OpenTelemetry's own variables
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_SERVICE_NAME",
    "ON_ERROR_STOP",  # psql
    "SO_REUSEPORT",  # the socket option
}
# adaccounts_* words in the docs that are not metrics: the package and the database roles.
NOT_METRICS = {"adaccounts_server", "adaccounts_app", "adaccounts_migrator"}


def test_every_setting_the_docs_name_is_a_setting() -> None:
    known = set(Settings.model_fields) | NOT_SETTINGS | {code.name for code in grpc.StatusCode}
    known |= set(health_pb2.HealthCheckResponse.ServingStatus.keys())
    known |= {value.name for enum in pb.DESCRIPTOR.enum_types_by_name.values() for value in enum.values}
    unknown = {
        f"{word} ({doc.relative_to(ROOT)})"
        for doc in MARKDOWN
        for word in re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", doc.read_text())
        if word not in known
    }
    assert not unknown, f"the docs name settings the server does not have: {sorted(unknown)}"


def _exposition() -> str:
    """What metrics.py exposes, every family with a sample (no server needed)."""
    metrics = Metrics()
    method = f"/{pb.DESCRIPTOR.services_by_name['AdAccountService'].full_name}/GetAdAccount"
    metrics.call_started(method)
    metrics.call_ended(method, grpc.StatusCode.OK, 0.01)
    metrics.ping_answered(0.001)
    database = types.SimpleNamespace(pool_size=8, checked_out=lambda: 0)
    metrics.watch(lambda: server_gauges(database, lambda: True, 128))
    # With DATABASE_REPLICA_URLS: one replica, measured and in rotation.
    replica = types.SimpleNamespace(name="replica-1", reads=0)
    replicated = types.SimpleNamespace(
        primary_reads=0,
        replicas=[replica],
        fallbacks={"none_in_rotation": 0, "token": 0, "failed": 0},
        lag_s=lambda _replica: 0.1,
        in_rotation=lambda _replica: True,
    )
    metrics.watch(lambda: replica_metrics(replicated))  # type: ignore[arg-type]
    return generate_latest(metrics.registry).decode()


def _exposed_samples() -> dict[str, dict[str, set[str]]]:
    """Sample name → label name → the values seen."""
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(_exposition()):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return samples


def test_every_metric_the_docs_name_is_exposed() -> None:
    exposed = set(_exposed_samples()) | {family.name for family in text_string_to_metric_families(_exposition())}
    unknown = {
        f"{word} ({doc.relative_to(ROOT)})"
        for doc in MARKDOWN
        for word in re.findall(r"\b(?:grpc_server|adaccounts)_[a-z_]+\b", doc.read_text())
        if word not in exposed | NOT_METRICS
    }
    assert not unknown, f"the docs name metrics server/adaccounts_server/metrics.py does not expose: {sorted(unknown)}"


def test_every_metric_the_server_exposes_is_in_the_operations_table() -> None:
    operations = (DOCS_DIR / "operations.md").read_text()
    missing = []
    for family in text_string_to_metric_families(_exposition()):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        if not re.search(rf"^\| `{name}` \|", operations, re.M):
            missing.append(name)
    assert not missing, f"docs/operations.md's metrics table lacks {missing}"


def test_every_cli_option_the_docs_give_exists(capsys) -> None:
    from adaccounts_server.cli import main

    options: dict[str, set[str]] = {}
    for command in ("serve", "migrate", "check"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options[command] = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
    wrong = set()
    for doc in MARKDOWN:
        for command, rest in re.findall(r"\badaccounts (serve|migrate|check)\b([^`\n]*)", doc.read_text()):
            rest = rest.split(" #", 1)[0]  # a comment after the command
            for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                if option not in options[command]:
                    wrong.add(f"adaccounts {command} {option} ({doc.relative_to(ROOT)})")
    assert not wrong, f"the docs give options the CLI does not have: {sorted(wrong)}"


# --- the alert rules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found: install Debian's `prometheus` package "
            "(apt-get install --no-install-recommends prometheus; .ci/run does when it is missing)"
        )
    return found


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    if "input" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


def test_the_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, f"promtool check rules {RULES.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"
    alerts = [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    assert sorted(alerts) == ["AdAccountsErrorRatio", "AdAccountsLatencyP99", "AdAccountsNotServing"]


def test_the_alert_rules_fire_in_their_unit_tests(promtool: str) -> None:
    """Each alert fires in its scenario and stays quiet in the healthy one (promtool test rules)."""
    result = _run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    assert result.returncode == 0, (
        f"promtool test rules {RULE_TESTS.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"
    )
    tested = {
        test["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for test in case["alert_rule_test"]
    }
    rules = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert tested == rules, f"alerts without a unit test: {sorted(rules - tested)}"


def test_the_rule_unit_tests_feed_only_series_the_server_exposes(promtool: str) -> None:
    """So that `promtool test rules` proves the rules work on the server's own metric names and
    labels: a rule on a name or label the server does not expose could not fire there."""
    text = _exposition()
    lint = _run([promtool, "check", "metrics"], input=text)
    assert lint.returncode == 0, f"promtool check metrics on metrics.py's exposition:\n{lint.stdout}{lint.stderr}"
    exposed = _exposed_samples()
    methods = {method.name for method in pb.DESCRIPTOR.services_by_name["AdAccountService"].methods}
    allowed_values = {
        "grpc_code": set(GO_CODE_NAMES.values()),
        "grpc_method": methods,
        "grpc_service": {pb.DESCRIPTOR.services_by_name["AdAccountService"].full_name},
    }
    wrong = []
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for item in case["input_series"]:
            match = re.fullmatch(r"(\w+)\{(.*)\}", item["series"].strip())
            assert match, f"not a series selector: {item['series']}"
            name, labels = match.group(1), dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if name not in exposed:
                wrong.append(f"{name}: not exposed by metrics.py")
                continue
            for key, value in labels.items():
                if key in TARGET_LABELS:
                    continue
                if key not in exposed[name]:
                    wrong.append(f"{name}: no label {key}")
                elif value not in allowed_values.get(key, exposed[name][key]):
                    wrong.append(f"{name}: {key}={value!r} is never a value the server writes")
            missing = set(exposed[name]) - set(labels)
            if missing:
                wrong.append(f"{name}: lacks the server's labels {sorted(missing)}")
    assert not wrong, "alerts.test.yaml feeds series the server does not expose: " + "; ".join(sorted(set(wrong)))
