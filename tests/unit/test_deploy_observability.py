"""The operator's kit in deploy/: the Prometheus alerting rules (promtool checks them and
runs their unit tests, each rule firing and not firing) and the Grafana dashboards; every
metric they read is one the worker or ``fleet maintain`` exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from fleet_telemetry.core.metrics import MaintainMetrics, PipelineMetrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"

_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created")}
_METRIC_NAME = re.compile(r"\b(fleet_[a-z0-9_]+|up)\b")


def exported_names() -> set[str]:
    """Every sample name the worker's and ``fleet maintain``'s /metrics can show."""
    names = {"up"}  # Prometheus's own, per scrape target
    registries: list[CollectorRegistry] = [PipelineMetrics().registry, MaintainMetrics().registry]
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool (Debian package prometheus; ./deploy/dev.sh test installs it) is needed"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_alerting_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerting_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - firing == set(), "rules never tested firing"
    assert names - quiet == set(), "rules never tested not firing"


def test_every_rule_says_how_bad_and_what_to_do_and_reads_exported_metrics() -> None:
    exported = exported_names()
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, rule["alert"]
        read = set(_METRIC_NAME.findall(rule["expr"]))
        assert read and read <= exported, (rule["alert"], read - exported)
