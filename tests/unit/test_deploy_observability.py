"""The operator's kit in deploy/: the Prometheus alerting rules (promtool checks them and
runs their unit tests, each rule firing and not firing) and the Grafana dashboards; every
metric they read is one the worker or ``fleet maintain`` exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from fleet_telemetry.core.metrics import MaintainMetrics, PipelineMetrics
from tests.dashboards import DASHBOARDS, GRAFANA, load, panels, queries

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
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


def test_every_dashboard_panel_queries_exported_metrics_or_the_fleet_tables() -> None:
    exported = exported_names()
    promql = list(queries("prometheus"))
    assert {board for board, _, _ in promql} == {"pipeline.json"}
    for board, title, expr in promql:
        read = set(_METRIC_NAME.findall(expr))
        assert read and read <= exported, (board, title, read - exported)
    assert {board for board, _, _ in queries("grafana-postgresql-datasource")} == {"fleet.json"}


def test_the_dashboards_are_provisioned_with_the_data_sources_their_panels_name() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "fleet.yml").read_text())["datasources"]
    provisioned = {(s["type"], s["uid"]) for s in sources}
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fleet.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert [p.name for p in DASHBOARDS] == ["fleet.json", "pipeline.json"]
    for path in DASHBOARDS:
        board = load(path)
        assert board["uid"] and board["title"].startswith("Fleet telemetry")
        titles = [panel["title"] for panel in panels(board)]
        assert len(titles) == len(set(titles)), f"{path.name}: panel titles repeat"
        for panel in panels(board):
            assert panel["title"] and panel["description"], (path.name, panel)
            for target in panel["targets"]:
                assert (target["datasource"]["type"], target["datasource"]["uid"]) in provisioned, (path.name, panel)
    assert "Trips and stops are not recorded yet" in load(GRAFANA / "dashboards" / "fleet.json")["description"]
