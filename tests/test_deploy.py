"""The deploy: Kubernetes manifests valid against the Kubernetes schemas, and agreeing with the
server they run (ports, health service names, settings, secrets, shutdown timing); the
Dockerfile's two stages: the wheels built, then installed with the locked dependencies.

Docker is not available where the tests run, so the image is not built here: a slow test
rehearses both stages (their COPY lines, the build's RUN, the image's install commands in a
fresh venv) and runs the server's offline migration from what that installed.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from adaccounts_server import app
from adaccounts_server.cli import EXIT_USAGE
from adaccounts_server.config import Settings, load_settings
from adaccounts_server.health import DATABASE_BACKED_SERVICES, LIVENESS_SERVICE
from adaccounts_server.workers import metrics_port
from helpers.settings import without_settings
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
# The oldest Kubernetes these manifests are meant for (native gRPC probes GA in 1.27; 1.28's
# schema still wants onPodConditions in every podFailurePolicy rule) and the newest schema
# kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
APP_SECRET, MIGRATOR_SECRET = "adaccounts-app", "adaccounts-migrator"
# Custom resources kubernetes-validate has no schema for: each is checked against its CRD's
# schema, kept under tests/schemas/ (a copy from the operator's release).
CUSTOM_RESOURCE_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): ROOT / "tests" / "schemas" / "podmonitor.monitoring.coreos.com-v1.yaml",
}
# A pod whose database is gone leaves the Services' endpoints within this long.
READINESS_OUTAGE_REMOVAL_S = 10


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def one(kind: str) -> dict[str, Any]:
    matching = [d for _, d in documents() if d["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def deployment() -> dict[str, Any]:
    return one("Deployment")


def job() -> dict[str, Any]:
    return one("Job")


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container(workload).get("env", [])}


def settings_from(workload: dict[str, Any]) -> Settings:
    """The Settings the container would load, with a stand-in value for each Secret key; as its
    command checks them (`migrate` needs only the database URL, `serve` every serving setting)."""
    values: dict[str, object] = {}
    for name, item in env(workload).items():
        if "value" in item:
            values[name] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            values[name] = {
                "DATABASE_URL": "postgresql://adaccounts_app:pw@db:5432/adaccounts",
                "MIGRATION_DATABASE_URL": "postgresql://adaccounts_migrator:pw@db:5432/adaccounts",
                "PAGE_TOKEN_SECRET": "a-page-token-secret-of-32-chars!",
            }[ref["key"]]
    serving = container(workload).get("args") != ["migrate"]
    return load_settings(_env_file=None, serving=serving, **values)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    docs = documents()
    assert {d["kind"] for _, d in docs} == {
        "Deployment",
        "Service",
        "Job",
        "PodDisruptionBudget",
        "PodMonitor",
        "HorizontalPodAutoscaler",
    }
    for name, document in docs:
        if (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCE_SCHEMAS:
            continue  # test_custom_resources_are_valid_against_their_crd_schemas
        # strict: an unknown (misspelt) field is an error, not silently ignored by the API server.
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {document['kind']}/{document['metadata']['name']} (Kubernetes {version}): {error}")


def strict(schema: Any) -> Any:
    """A CRD's OpenAPI schema as JSON Schema that refuses unknown fields: the API server would
    prune them silently (a misspelt field just vanishes), as kubernetes-validate's strict mode."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def test_custom_resources_are_valid_against_their_crd_schemas() -> None:
    """kubernetes-validate knows Kubernetes' own kinds only; every other kind here must have its
    CRD's schema in CUSTOM_RESOURCE_SCHEMAS, or this fails rather than leave it unchecked."""
    for name, document in documents():
        key = (document["apiVersion"], document["kind"])
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)
            continue  # one of Kubernetes' own
        except kubernetes_validate.SchemaNotFoundError:
            assert key in CUSTOM_RESOURCE_SCHEMAS, f"{name}: no schema to check {key} against"
        except kubernetes_validate.ValidationError:
            continue  # reported by test_every_manifest_is_valid_against_the_kubernetes_schemas
        schema = strict(yaml.safe_load(CUSTOM_RESOURCE_SCHEMAS[key].read_text()))
        try:
            jsonschema.validate(document, schema)
        except jsonschema.ValidationError as error:
            where = "/".join(str(part) for part in error.absolute_path)
            pytest.fail(f"{name} {document['kind']}/{document['metadata']['name']}: {where}: {error.message}")
        # The CRD leaves metadata to the API server: the part of it that matters here.
        metadata = document["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"])
        assert len(metadata["name"]) <= 63
        assert "namespace" not in metadata, "applied to the Deployment's namespace, like the other manifests"


def test_the_crd_check_catches_a_misspelt_field() -> None:
    (monitor,) = [d for _, d in documents() if d["kind"] == "PodMonitor"]
    schema = strict(yaml.safe_load(CUSTOM_RESOURCE_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")].read_text()))
    misspelt = copy.deepcopy(monitor)
    misspelt["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, schema)


# --- the Deployment agrees with the server -------------------------------------------------


def test_probes_ask_the_servers_health_services_on_its_port() -> None:
    server = container(deployment())
    settings = settings_from(deployment())
    (port,) = [p for p in server["ports"] if p["name"] == "grpc"]
    assert port["containerPort"] == settings.GRPC_PORT == Settings.model_fields["GRPC_PORT"].default
    assert settings.GRPC_HOST == "0.0.0.0", "the server must listen on the pod's address"

    readiness, liveness, startup = server["readinessProbe"], server["livenessProbe"], server["startupProbe"]
    for probe in (readiness, liveness, startup):
        assert probe["grpc"]["port"] == settings.GRPC_PORT  # gRPC probes take a number, not a port name
    # Readiness follows the database (and the schema); liveness and startup only the process,
    # so a database outage never restarts pods.
    assert readiness["grpc"].get("service", "") == ""
    assert "" in DATABASE_BACKED_SERVICES
    assert liveness["grpc"]["service"] == LIVENESS_SERVICE
    assert startup["grpc"]["service"] == LIVENESS_SERVICE
    # A probe reads a status from memory; its timeout need only cover the network.
    assert readiness["timeoutSeconds"] >= 1
    # The monitor notices a dead database within about interval + timeout; readiness asks at least that often.
    assert readiness["periodSeconds"] <= settings.HEALTH_CHECK_INTERVAL_S + settings.HEALTH_CHECK_TIMEOUT_S


def test_readiness_rides_out_one_slow_ping_but_not_an_outage() -> None:
    """Issue 13: one slow `SELECT 1` must not take every pod out of the Services at once (they
    all ping the same database). One failed ping keeps readiness NOT_SERVING for at most
    HEALTH_CHECK_INTERVAL_S + HEALTH_CHECK_TIMEOUT_S (the monitor waits for a late answer
    through its next check), so failureThreshold must exceed the probes that can land in that
    window; and a real outage must still take the pod out promptly."""
    readiness = container(deployment())["readinessProbe"]
    settings = settings_from(deployment())
    window = settings.HEALTH_CHECK_INTERVAL_S + settings.HEALTH_CHECK_TIMEOUT_S
    period, failures = readiness["periodSeconds"], readiness["failureThreshold"]
    probes_in_window = math.floor(window / period) + 1  # a closed window: a probe at each end
    assert failures > probes_in_window, (
        f"a {window:g} s NOT_SERVING blip from one slow ping can fail {probes_in_window} probes "
        f"{period} s apart: failureThreshold {failures} takes the pod out of the Services"
    )
    # NOT_SERVING within `window` of the database going, then `failures` probes to notice.
    assert window + failures * period <= READINESS_OUTAGE_REMOVAL_S
    assert readiness["successThreshold"] == 1, "back in the Services at the first probe once SERVING"
    # Said beside them, in the manifest and in docs/deploying.md.
    text = (MANIFESTS / "deployment.yaml").read_text()
    comment = text[: text.index("readinessProbe:")].rsplit("startupProbe", 1)[-1]
    assert "HEALTH_CHECK_INTERVAL_S" in comment
    assert "HEALTH_CHECK_TIMEOUT_S" in comment
    probes = (ROOT / "docs" / "deploying.md").read_text()
    assert f"{failures} failures" in probes
    assert "HEALTH_CHECK_INTERVAL_S" in probes


def test_metrics_ports_are_the_workers_and_the_pod_monitor_scrapes_each() -> None:
    server = container(deployment())
    settings = settings_from(deployment())
    assert settings.METRICS_PORT, "METRICS_PORT is set, so that the server serves metrics"
    metrics = {p["name"]: p["containerPort"] for p in server["ports"] if p["name"].startswith("metrics")}
    # Worker i serves METRICS_PORT + i (workers.metrics_port): one container port for each.
    expected = {f"metrics-{i}": metrics_port(settings.METRICS_PORT, i) for i in range(settings.GRPC_WORKERS)}
    assert metrics == expected, "one metrics-<i> container port per worker, at METRICS_PORT + i"
    others = {settings.GRPC_PORT, settings.GRPC_HEALTH_PORT}
    assert not others & set(metrics.values()), "a metrics port collides with the gRPC or health port"
    assert all(p["protocol"] == "TCP" for p in server["ports"])

    monitor = one("PodMonitor")
    pod_labels = deployment()["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert matches(selector, pod_labels)
    assert not matches(selector, job()["spec"]["template"]["metadata"]["labels"])
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == list(expected), "the PodMonitor scrapes every worker's port, by name"
    for endpoint in endpoints:
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert endpoint.get("scheme", "http") == "http", "the metrics endpoint is plain HTTP"


def test_termination_grace_outlasts_the_servers_own_shutdown() -> None:
    spec = deployment()["spec"]["template"]["spec"]
    settings = settings_from(deployment())
    pre_stop = container(deployment())["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.SHUTDOWN_GRACE_S + app._FINAL_STOP_GRACE_S + app._CUT_SHORT_WAIT_S
    assert spec["terminationGracePeriodSeconds"] > needed, (
        "Kubernetes would SIGKILL the server before it finished draining"
    )


def test_settings_in_the_manifests_are_the_servers_own() -> None:
    for workload in (deployment(), job()):
        for name in env(workload):
            assert name in Settings.model_fields, f"{workload['kind']}: {name} is not a setting of the server"
        settings_from(workload)  # every value valid (raises SettingsError otherwise)


def test_secrets_come_from_secrets_and_each_role_only_where_it_belongs() -> None:
    secret_fields = {
        name for name, field in Settings.model_fields.items() if field.annotation in (SecretStr, SecretStr | None)
    }
    assert {"DATABASE_URL", "MIGRATION_DATABASE_URL", "PAGE_TOKEN_SECRET"} <= secret_fields
    refs: dict[str, dict[str, tuple[str, str]]] = {}
    for workload in (deployment(), job()):
        refs[workload["kind"]] = {}
        for name, item in env(workload).items():
            if name in secret_fields:
                assert "value" not in item, f"{workload['kind']}: {name} must come from a Secret, not a literal"
                ref = item["valueFrom"]["secretKeyRef"]
                refs[workload["kind"]][name] = (ref["name"], ref["key"])
        assert not container(workload).get("envFrom"), "name each variable, so the tests can check it"
    # The server: the DML-only role and the page-token key, from its own Secret.
    assert refs["Deployment"] == {
        "DATABASE_URL": (APP_SECRET, "DATABASE_URL"),
        "PAGE_TOKEN_SECRET": (APP_SECRET, "PAGE_TOKEN_SECRET"),
    }
    # The Job: only the DDL-capable role, from another Secret; it needs nothing of the server's.
    assert refs["Job"] == {"MIGRATION_DATABASE_URL": (MIGRATOR_SECRET, "MIGRATION_DATABASE_URL")}
    job_settings = settings_from(job())
    assert job_settings.migration_database_url.username == "adaccounts_migrator"


def test_the_readme_creates_the_secrets_the_manifests_reference() -> None:
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    found = re.findall(r"kubectl create secret generic(?:[^\n\\]|\\\n)*", deploying)
    commands = [shlex.split(command.replace("\\\n", " ")) for command in found]
    created: dict[str, set[str]] = {}
    for words in commands:
        name = words[4]
        keys = {w.split("=", 2)[1] for w in words if w.startswith("--from-literal=")}
        created[name] = keys
    assert created == {
        APP_SECRET: {"DATABASE_URL", "PAGE_TOKEN_SECRET"},
        MIGRATOR_SECRET: {"MIGRATION_DATABASE_URL"},
    }


def test_services_and_budget_select_the_server_pods_and_never_the_migrate_job() -> None:
    dep = deployment()
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], pod_labels)
    job_labels = job()["spec"]["template"]["metadata"]["labels"]

    services = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}
    assert set(services) == {"adaccounts", "adaccounts-headless"}
    assert services["adaccounts-headless"]["spec"]["clusterIP"] == "None"  # one A record per pod: round_robin
    assert services["adaccounts"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    port_names = {p["name"]: p["containerPort"] for p in container(dep)["ports"]}
    for service in services.values():
        assert matches(service["spec"]["selector"], pod_labels)
        assert not matches(service["spec"]["selector"], job_labels)
        (port,) = service["spec"]["ports"]
        assert port["port"] == port_names[port["targetPort"]] == 50051

    budget = one("PodDisruptionBudget")["spec"]
    assert matches(budget["selector"]["matchLabels"], pod_labels)
    assert not matches(budget["selector"]["matchLabels"], job_labels)
    assert "replicas" not in dep["spec"], "the HorizontalPodAutoscaler owns the pod count"
    assert budget.get("maxUnavailable", 0) < one("HorizontalPodAutoscaler")["spec"]["minReplicas"]

    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a new pod must be ready before an old one goes"


# PostgreSQL's defaults, on the primary and on each read replica: max_connections, less the
# connections kept for superusers (superuser_reserved_connections).
POSTGRES_MAX_CONNECTIONS, POSTGRES_SUPERUSER_RESERVED = 100, 3


def test_the_autoscaler_stays_within_postgresqls_connections_on_the_primary_and_each_replica() -> None:
    """Issue 15: at maxReplicas plus the rollout's surge, every worker's pool and health-monitor
    connection (to the primary and to each replica alike) fits PostgreSQL's default
    max_connections, less the superusers' reserve and the migrate Job's connection."""
    dep, hpa = deployment(), one("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    (metric,) = spec["metrics"]
    assert (metric["type"], metric["resource"]["name"], metric["resource"]["target"]["type"]) == (
        "Resource",
        "cpu",
        "Utilization",
    )
    assert container(dep)["resources"]["requests"]["cpu"], "CPU utilization is measured against the request"
    assert 0 < metric["resource"]["target"]["averageUtilization"] < 100

    settings = settings_from(dep)
    low, high = spec["minReplicas"], spec["maxReplicas"]
    assert one("PodDisruptionBudget")["spec"]["maxUnavailable"] < low <= high
    surge = dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    if isinstance(surge, str):  # a percentage of the desired pods, rounded up
        surge = math.ceil(high * int(surge.rstrip("%")) / 100)
    migrate_connections = job()["spec"].get("parallelism", 1)
    budget = POSTGRES_MAX_CONNECTIONS - POSTGRES_SUPERUSER_RESERVED - migrate_connections
    per_pod = settings.GRPC_WORKERS * (settings.DB_POOL_SIZE + 1)
    pods = high + surge
    assert pods * per_pod <= budget, f"{pods} pods x {per_pod} connections > {budget}, on the primary and each replica"
    # The arithmetic is written beside it, with these very numbers.
    text = (MANIFESTS / "hpa.yaml").read_text()
    arithmetic = f"({high} + {surge}) x {settings.GRPC_WORKERS} x ({settings.DB_POOL_SIZE} + 1) = {pods * per_pod}"
    assert arithmetic in text, f"hpa.yaml's comment should say {arithmetic}, within {budget}"
    assert f"= {budget}" in text, f"hpa.yaml's comment should say {arithmetic}, within {budget}"
    # Down slowly (a pod leaving drains its calls), so bursty traffic does not flap the pod count.
    scale_down = spec["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 120
    assert all(policy["type"] == "Pods" and policy["value"] == 1 for policy in scale_down["policies"])


def test_the_migrate_job_runs_the_same_release_once_and_gives_up_cleanly() -> None:
    migrate, server = job(), deployment()
    assert container(migrate)["args"] == ["migrate"]
    assert container(migrate)["image"] == container(server)["image"], "migrate the schema of the release deployed"
    assert container(server)["args"] == ["serve"]
    spec = migrate["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # needed by podFailurePolicy; retries are new pods
    assert spec["backoffLimit"] >= 1
    settings = settings_from(migrate)
    assert spec["activeDeadlineSeconds"] > settings.MIGRATION_WAIT_S, "the Job would be killed while waiting its turn"
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": "migrate", "operator": "In", "values": [EXIT_USAGE]}


def test_pods_run_as_the_images_unprivileged_user() -> None:
    uid = dockerfile_user()
    for workload in (deployment(), job()):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["automountServiceAccountToken"] is False
        security = container(workload)["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        resources = container(workload)["resources"]
        assert resources["requests"]["cpu"]
        assert resources["requests"]["memory"]
        assert resources["limits"]["memory"]


# --- the Dockerfile ------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM of the Dockerfile and the instructions after it."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def stages() -> list[Stage]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            named = re.split(r"\s+(?i:as)\s+", rest, maxsplit=1)
            found.append(Stage(named[0], named[1] if len(named) == 2 else None))
        else:
            assert found, f"{keyword} before the first FROM"
            found[-1].instructions.append((keyword, rest))
    return found


def image() -> Stage:
    """The last stage: the image that runs."""
    return stages()[-1]


def instruction(keyword: str, stage: Stage | None = None) -> list[str]:
    return [rest for k, rest in (stage or image()).instructions if k == keyword]


def dockerfile_user() -> int:
    (user,) = instruction("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    return uid


def install_commands() -> list[str]:
    """The image's RUN that installs the server, split at `&&`."""
    (run,) = [r for r in instruction("RUN") if "pip install" in r]
    return [command.strip() for command in run.split("&&")]


def test_the_dockerfile() -> None:
    build, final = stages()  # two: one builds the wheels, the other is the image
    assert (build.base, build.name) == ("python:3.11-slim", "build")
    assert (final.base, final.name) == ("python:3.11-slim", None)
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert instruction("ENTRYPOINT") == ['["adaccounts"]']
    assert instruction("CMD") == ['["serve"]']
    assert instruction("EXPOSE") == [str(Settings.model_fields["GRPC_PORT"].default)]
    dockerfile_user()
    # The image gets the wheels and the lock, never the source tree.
    assert {(origin, source) for source, _, origin in copies(final)} == {
        (None, "requirements.lock"),
        ("build", f"{instruction('WORKDIR', build)[-1]}/dist/"),
    }
    commands = install_commands()
    # The dependencies exactly as locked (every file's hash checked, no build from source), the
    # two wheels without dependencies of their own choosing, and proof the set is complete.
    assert commands[:3] == [
        "pip install --require-hashes --only-binary :all: -r requirements.lock",
        "pip install --no-deps wheels/*.whl",
        "pip check",
    ]
    assert not any("--editable" in c or " -e " in c or "[" in c for c in commands), "only the server's dependencies"
    # No compiler, nor any other system package, in the image.
    assert not any(tool in run for run in instruction("RUN") for tool in ("apt-get", "gcc", "build-essential"))
    # Every file the stages copy from the build context is let through its filter.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for stage in (build, final):
        for source, _, origin in copies(stage):
            if origin is None:
                assert f"!{source.rstrip('/')}" in ignore or f"!{source}" in ignore, f"{source} is not in the context"


def copies(stage: Stage) -> list[tuple[str, str, str | None]]:
    """(source, destination, --from stage or None for the context) of each COPY of `stage`,
    destinations made absolute with the WORKDIR in force."""
    workdir, found = "/", []
    for keyword, rest in stage.instructions:
        if keyword == "WORKDIR":
            workdir = str(Path(workdir) / rest)
        elif keyword == "COPY":
            *sources, destination = rest.split()
            flags = [s for s in sources if s.startswith("--")]
            origin = None
            for flag in flags:
                assert flag.startswith("--from="), f"COPY {flag}: not understood here"
                origin = flag.removeprefix("--from=")
            for source in sources:
                if not source.startswith("--"):
                    end = "/" if destination.endswith("/") else ""
                    found.append((source, str(Path(workdir) / destination) + end, origin))
    return found


def workdir_at(stage: Stage, run: str) -> str:
    """The WORKDIR in force at `stage`'s RUN `run`."""
    workdir = "/"
    for keyword, rest in stage.instructions:
        if keyword == "WORKDIR":
            workdir = str(Path(workdir) / rest)
        elif (keyword, rest) == ("RUN", run):
            return workdir
    raise AssertionError(f"no RUN {run}")


def lay_out(stage: Stage, root: Path, built: dict[str, Path]) -> None:
    """`stage`'s COPY lines carried out under `root` (the stage's /)."""
    for source, destination, origin in copies(stage):
        target = root / destination.lstrip("/")
        origin_path = ROOT / source if origin is None else built[origin] / source.lstrip("/")
        if origin_path.is_dir():
            shutil.copytree(origin_path, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            target = target / origin_path.name if destination.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin_path, target)


def sh(command: str, cwd: Path, path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`command` as the Dockerfile's RUN runs it (a shell), with `path` first on PATH and none of
    the server's settings, nor this checkout on sys.path."""
    env = {k: v for k, v in without_settings(dict(os.environ)).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{path}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_image_installs_its_wheels_with_the_locked_dependencies_and_finds_the_migrations(
    tmp_path: Path,
) -> None:
    """No Docker here: the two stages rehearsed. The build stage's COPY lines and RUN, as written,
    in a copy of its WORKDIR; then the image's: its COPY lines, and its install commands, as
    written, with a fresh venv's pip standing for the image's (the lock's hashes checked, binary
    wheels only), far from the checkout; and the server's offline migration from there."""
    build, final = stages()
    build_root, image_root = tmp_path / "build", tmp_path / "image"
    lay_out(build, build_root, {})
    (wheel,) = instruction("RUN", build)
    sh(wheel, build_root / workdir_at(build, wheel).lstrip("/"), Path(sys.executable).parent)

    lay_out(final, image_root, {"build": build_root})
    (install,) = [r for r in instruction("RUN") if "pip install" in r]
    install_dir = image_root / workdir_at(final, install).lstrip("/")
    wheels = sorted(path.name for path in (install_dir / "wheels").glob("*.whl"))
    assert [name.split("-")[0] for name in wheels] == ["adaccounts_client", "adaccounts_server"], wheels
    venv = tmp_path / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    for command in install_commands():
        if command.split()[0] in ("pip", "adaccounts"):  # not rm, mkdir, chown: the image's own paths
            sh(command, install_dir, bin_dir)

    where = sh("python -c 'import adaccounts_server.migrate as m; print(m.MIGRATIONS_DIR)'", tmp_path, bin_dir)
    migrations = Path(where.stdout.strip())
    assert migrations.is_relative_to(venv), f"the migrations are not the installed package's: {migrations}"
    assert (migrations / "env.py").is_file()
    assert list((migrations / "versions").glob("0001_*.py"))
    offline = sh("adaccounts migrate --sql", tmp_path, bin_dir)
    assert "CREATE TABLE ad_accounts" in offline.stdout
    postgresql = sh(
        "MIGRATION_DATABASE_URL=postgresql://migrator:pw@db.invalid/adaccounts adaccounts migrate --sql",
        tmp_path,
        bin_dir,
    )
    assert "CREATE INDEX CONCURRENTLY ix_ad_accounts_owner_id_name_id" in postgresql.stdout
