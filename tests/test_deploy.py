"""The deploy: Kubernetes manifests valid against the Kubernetes schemas, and agreeing with the
server they run (ports, health service names, settings, secrets, shutdown timing); the
Dockerfile's image layout puts the migrations where the server looks for them.

Docker is not available where the tests run, so the image is not built here: the layout test
copies what the Dockerfile copies and runs the server's offline migration from that copy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from adaccounts_server import app
from adaccounts_server.cli import EXIT_USAGE
from adaccounts_server.config import Settings, load_settings
from adaccounts_server.health import DATABASE_BACKED_SERVICES, LIVENESS_SERVICE
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
# The oldest Kubernetes these manifests are meant for (native gRPC probes GA in 1.27; 1.28's
# schema still wants onPodConditions in every podFailurePolicy rule) and the newest schema
# kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
APP_SECRET, MIGRATOR_SECRET = "adaccounts-app", "adaccounts-migrator"


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
    """The Settings the container would load, with a stand-in value for each Secret key."""
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
    return load_settings(_env_file=None, **values)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    docs = documents()
    assert {d["kind"] for _, d in docs} == {"Deployment", "Service", "Job", "PodDisruptionBudget"}
    for name, document in docs:
        # strict: an unknown (misspelt) field is an error, not silently ignored by the API server.
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} {document['kind']}/{document['metadata']['name']} (Kubernetes {version}): {error}")


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
    assert readiness["grpc"].get("service", "") == "" and "" in DATABASE_BACKED_SERVICES
    assert liveness["grpc"]["service"] == LIVENESS_SERVICE
    assert startup["grpc"]["service"] == LIVENESS_SERVICE
    # A probe reads a status from memory; its timeout need only cover the network.
    assert readiness["timeoutSeconds"] >= 1
    # The monitor notices a dead database within about interval + timeout; readiness asks at least that often.
    assert readiness["periodSeconds"] <= settings.HEALTH_CHECK_INTERVAL_S + settings.HEALTH_CHECK_TIMEOUT_S


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
    readme = (ROOT / "README.md").read_text()
    deploying = readme[readme.index("## Deploying") :]
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
    assert budget.get("maxUnavailable", 0) < dep["spec"]["replicas"]

    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a new pod must be ready before an old one goes"


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
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


# --- the Dockerfile ------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def instruction(keyword: str) -> list[str]:
    return [rest for k, rest in instructions() if k == keyword]


def dockerfile_user() -> int:
    (user,) = instruction("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    return uid


def test_the_dockerfile() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert instruction("ENTRYPOINT") == ['["adaccounts"]']
    assert instruction("CMD") == ['["serve"]']
    assert instruction("EXPOSE") == [str(Settings.model_fields["GRPC_PORT"].default)]
    dockerfile_user()
    (run,) = [r for r in instruction("RUN") if "pip install" in r]
    assert "[test]" not in run and ".[" not in run, "only the server's dependencies"
    # Every file the image needs is both copied and let through the build context filter.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for source, _ in copies():
        assert f"!{source.rstrip('/')}" in ignore or f"!{source}" in ignore, f"{source} is not in the build context"


def copies() -> list[tuple[str, str]]:
    """(source, destination) of each COPY, destinations made absolute with the WORKDIR in force."""
    workdir, found = "/", []
    for keyword, rest in instructions():
        if keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY":
            *sources, destination = rest.split()
            assert not any(s.startswith("--") for s in sources)
            for source in sources:
                found.append((source, str(Path(workdir) / destination) + ("/" if destination.endswith("/") else "")))
    return found


def test_the_image_layout_puts_the_migrations_where_the_server_looks(tmp_path: Path) -> None:
    # Rebuild the image's /app from the Dockerfile's COPY lines, then run the server from it.
    image_root = tmp_path / "image"
    for source, destination in copies():
        target = image_root / destination.lstrip("/")
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target = target / origin.name if destination.endswith("/") else target
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
    app_dir = image_root / "app"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "MIGRATION_", "POSTGRES_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(app_dir / "server"), str(app_dir / "clients")])
    env["MIGRATION_DATABASE_URL"] = "postgresql://migrator:pw@db.invalid/adaccounts"
    where = subprocess.run(
        [sys.executable, "-c", "import adaccounts_server.migrate as m; print(m.__file__); print(m.MIGRATIONS_DIR)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert where.returncode == 0, where.stderr
    module, migrations = where.stdout.split()
    assert Path(module).is_relative_to(app_dir / "server"), "the test imported the checkout, not the image copy"
    assert Path(migrations) == app_dir / "migrations"

    offline = subprocess.run(
        [sys.executable, "-m", "adaccounts_server.cli", "migrate", "--sql"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert offline.returncode == 0, offline.stderr
    assert "CREATE TABLE ad_accounts" in offline.stdout
    assert "CREATE INDEX CONCURRENTLY ix_ad_accounts_owner_id_name_id" in offline.stdout
