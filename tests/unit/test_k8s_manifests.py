"""deploy/k8s: the kustomization renders, every resource validates against the Kubernetes
schemas (kubernetes-validate, offline), the custom resources (ServiceMonitor, KEDA
ScaledObject) have what their operators require, and the pieces agree with each other
and with the project's settings and commands."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fleet_telemetry.core.settings import Settings
from fleet_telemetry.ingest.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.31", "1.33")
"""The oldest version whose features the manifests use (PDB unhealthyPodEvictionPolicy GA), and a newer one."""
CUSTOM_KINDS = {"ServiceMonitor", "ScaledObject"}


def listed_resources() -> list[dict[str, Any]]:
    """The documents of the files kustomization.yaml lists, each file parsed on its own."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        docs.extend(doc for doc in yaml.safe_load_all((BASE / name).read_text()) if doc)
    return docs


def rendered() -> list[dict[str, Any]]:
    """The kustomization rendered by kubectl or kustomize; the listed files as they are
    when neither is installed."""
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(BASE)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(BASE)]
    else:
        return listed_resources()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    docs = rendered()
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one resource of each kind in the base"
    return by_kind


def container(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    (only,) = spec["template"]["spec"]["containers"]
    return dict(only)


def test_every_listed_file_parses_and_the_render_holds_them_all(resources: dict[str, dict[str, Any]]) -> None:
    listed = {doc["kind"] for doc in listed_resources()}
    assert listed == set(resources) == {
        "ConfigMap", "Secret", "Job", "Deployment", "Service", "PodDisruptionBudget", "CronJob",
        "ServiceMonitor", "ScaledObject"}
    for doc in resources.values():
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleet-telemetry"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_built_in_resources_validate_against_the_kubernetes_schemas(
    resources: dict[str, dict[str, Any]], version: str
) -> None:
    for kind, doc in resources.items():
        if kind not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_does_refuse_a_misspelt_field() -> None:
    wrong = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"selectr": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSIONS[0], strict=True)


def test_every_setting_in_the_config_map_and_secret_is_a_valid_fleet_setting(
    resources: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config, secret = resources["ConfigMap"]["data"], resources["Secret"]["stringData"]
    assert not set(config) & set(secret)
    known = {f"FLEET_{name.upper()}" for name in Settings.model_fields}
    assert set(config) | set(secret) <= known
    for secret_setting in ("FLEET_DATABASE_URL", "FLEET_REDIS_URL", "FLEET_KAFKA_SASL_PASSWORD"):
        assert secret_setting in secret and secret_setting not in config
    for name, value in {**config, **secret}.items():
        monkeypatch.setenv(name, value)
    Settings(_env_file=None)  # type: ignore[call-arg]  # raises on any value it would refuse


def test_every_workload_runs_a_fleet_command_with_the_config_and_secret(resources: dict[str, dict[str, Any]]) -> None:
    commands = {"Deployment": ["fleet", "consume"], "Job": ["fleet", "migrate"], "CronJob": ["fleet", "maintain"]}
    for kind, command in commands.items():
        c = container(resources[kind])
        assert c["args"][:2] == command
        assert {ref.get("configMapRef", {}).get("name") or ref.get("secretRef", {}).get("name")
                for ref in c["envFrom"]} == {"fleet-config", "fleet-secrets"}
        answer = subprocess.run([sys.executable, "-m", "fleet_telemetry.cli", *c["args"][1:], "--help"],
                                capture_output=True, text=True, timeout=60)
        assert answer.returncode == 0, answer.stderr


def test_the_worker_is_probed_on_its_health_endpoints_and_outlives_its_shutdown_deadline(
    resources: dict[str, dict[str, Any]]
) -> None:
    config = resources["ConfigMap"]["data"]
    worker = resources["Deployment"]
    c = container(worker)
    (port,) = c["ports"]
    assert port["name"] == "metrics" and port["containerPort"] == int(config["FLEET_METRICS_PORT"])
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # Liveness gives the worker at least its own staleness window before a restart.
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= float(config["FLEET_HEALTH_STALE_SECONDS"])
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(config["FLEET_SHUTDOWN_TIMEOUT_SECONDS"]) + 10


def test_the_service_budget_and_monitor_select_the_workers(resources: dict[str, dict[str, Any]]) -> None:
    pod_labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = resources["Service"]
    pdb = resources["PodDisruptionBudget"]["spec"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["maxUnavailable"] == 1

    monitor = resources["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"], "a ServiceMonitor needs at least one endpoint"
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_keda_scales_the_workers_on_the_groups_lag_up_to_the_partition_count(
    resources: dict[str, dict[str, Any]]
) -> None:
    config = resources["ConfigMap"]["data"]
    scaled = resources["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == resources["Deployment"]["metadata"]["name"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(meta)
    assert meta["bootstrapServers"] == config["FLEET_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == config["FLEET_CONSUMER_GROUP"]
    assert meta["topic"] == config["FLEET_TELEMETRY_TOPIC"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"  # KEDA itself never goes past the partitions
    partitions = inspect.signature(ensure_topics).parameters["partitions"].default
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == partitions
