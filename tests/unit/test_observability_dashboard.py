"""The Grafana dashboard: regenerated and compared with docs/dashboard.json, laid out on the grid,
every query valid PromQL (promtool parses and evaluates it)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pyalbert.observability import dashboard as d

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "dashboard.json"


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as the dashboard's defaults would make them."""
    return expr.replace("$__rate_interval", "5m").replace('"$model"', '".*"')


def test_checked_in_dashboard_is_current():
    assert CHECKED_IN.read_text() == d.render(), (
        "docs/dashboard.json is stale: run `python -m pyalbert.observability.dashboard > "
        "docs/dashboard.json` and commit it")


def test_panels_cover_the_figures_operators_look_at():
    titles = {p["title"] for p in d.build()["panels"]}
    assert {"Time to first token", "Inter-token latency", "Tokens/s", "Requests running / waiting",
            "KV-cache use", "Replicas up", "Gateway: replica health", "Requests/s by status",
            "Errors by code", "Rejections by key and code", "5xx ratio"} <= titles
    legends = [t["legendFormat"] for p in d.build()["panels"] for t in p.get("targets", ())]
    assert {"p50 {{model}}", "p95 {{model}}", "in (prompt) {{model}}", "out (generated) {{model}}",
            "running {{model}}", "waiting {{model}}"} <= set(legends)


def test_layout_ids_and_grid():
    panels = d.build()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] for t in p["targets"])
            assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))]


def test_every_query_filters_by_the_model_variable_where_series_have_a_model():
    for title, expr in d.queries():
        if title == "Rejections by key and code":
            continue  # per key, not per model
        assert '$model' in expr, title


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing: ./scripts/bootstrap")
def test_every_query_is_valid_promql(tmp_path):
    cases = [{"expr": grafana_to_promql(expr), "eval_time": "1m", "exp_samples": []}
             for _, expr in d.queries()]
    (tmp_path / "empty.yml").write_text("groups: []\n")
    (tmp_path / "t.yml").write_text(yaml.safe_dump({
        "rule_files": ["empty.yml"], "tests": [{"interval": "1m", "input_series": [],
                                                "promql_expr_test": cases}]}))
    done = subprocess.run(["promtool", "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(cases) >= 15


def test_dashboard_json_round_trips():
    doc = json.loads(d.render())
    assert doc["uid"] == "albert-deploy" and doc["schemaVersion"] == 39
    assert [v["name"] for v in doc["templating"]["list"]] == ["datasource", "model"]


def test_snapshot_draws_each_panel_with_its_legend():
    import xml.etree.ElementTree as ET

    from pyalbert.observability import snapshot as s

    assert s.legend("p95 {{model}} {{ host }}", {"model": "m", "host": "h"}) == "p95 m h"
    svg = s.render([
        ("Time to first token", "s", [("p95 m", [(0.0, 0.5), (60.0, 1.5), (120.0, math.nan)])]),
        ("KV-cache use", "percentunit", []),
    ], "title <&>")
    root = ET.fromstring(svg)  # well-formed, title escaped
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert texts[0] == "title <&>"
    assert {"Time to first token", "KV-cache use", "p95 m", "no data", "1.5s"} <= set(texts)
    (line,) = root.iter(f"{ns}polyline")
    assert len(line.get("points").split()) == 2  # NaN points are left out
