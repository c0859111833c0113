"""The Grafana dashboards of deploy/grafana, read as their panels' queries."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included (rows themselves left out)."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(kind: str) -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, query) of every target on a data source of type ``kind``:
    ``prometheus`` (PromQL) or ``grafana-postgresql-datasource`` (SQL)."""
    for path in DASHBOARDS:
        board = load(path)
        for panel in panels(board):
            for target in panel["targets"]:
                if target["datasource"]["type"] == kind:
                    yield path.name, panel["title"], target["expr"] if kind == "prometheus" else target["rawSql"]


def concrete_sql(query: str) -> str:
    """A panel's SQL with Grafana's macros replaced by what they stand for over the last day."""
    query = re.sub(r"\$__timeGroupAlias\(([\w.]+),[^)]*\)", r"""date_trunc('minute', \1) AS "time\"""", query)
    query = re.sub(r"\$__timeFilter\(([\w.]+)\)", r"\1 BETWEEN now() - interval '1 day' AND now() + interval '1 hour'",
                   query)
    assert "$" not in query, f"a Grafana macro the test does not know: {query}"
    return query
