"""Dashboards are data: valid against Grafana's model, every panel queried, united, named, and every
series name one that turbo-serve or Ray (catalog.RAY_BUILTIN_SERIES) exports."""

import importlib.util
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from prom_harness import DASHBOARDS, evaluable_queries, iter_panels, load_dashboards, metric_names, panel_queries

from turbo_serve.metrics import catalog

SCHEMA = json.loads((Path(__file__).parent / "grafana_dashboard.schema.json").read_text())


def load_builder():
    spec = importlib.util.spec_from_file_location("dashboards_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_json_is_what_the_builder_makes():
    builder = load_builder()
    assert set(load_dashboards()) == set(builder.DASHBOARDS)
    for name, build in builder.DASHBOARDS.items():
        assert (DASHBOARDS / name).read_text() == builder.render(build), f"run python dashboards/build.py ({name})"


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_dashboard_matches_grafanas_model(name):
    dashboard = load_dashboards()[name]
    jsonschema.validate(dashboard, SCHEMA, cls=jsonschema.Draft202012Validator)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for item in dashboard["panels"]:
        pos = item["gridPos"]
        assert pos["x"] + pos["w"] <= 24, item["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"{item['title']} overlaps another panel"
        cells |= area
    for item in panels:
        assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert item["title"] and item["description"]


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_every_panel_has_queries_units_and_named_legends(name):
    for item in iter_panels(load_dashboards()[name]):
        assert item["targets"], f"{item['title']} has no query"
        assert item["fieldConfig"]["defaults"].get("unit"), f"{item['title']} has no unit"
        for t in item["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
            if item["type"] != "table":
                assert t["legendFormat"], f"{item['title']} {t['refId']} has no legend"


def test_dashboards_query_only_exported_series():
    known = catalog.all_series_names()
    used = set()
    for query in panel_queries():
        names = metric_names(query.expr)
        assert names, f"{query.label}: no series in {query.expr}"
        assert names <= known, f"{query.label}: unknown {sorted(names - known)}"
        used |= names
    for metric in catalog.APP_METRICS:
        assert used & set(metric.series_names), f"no panel shows {metric.prometheus_name}"
    assert {catalog.GPU_UTILIZATION.prometheus_name, catalog.GPU_MEMORY_USED.prometheus_name} <= used
    assert set(catalog.RAY_BUILTIN_SERIES) <= used | {"ray_serve_actual_batch_size_count"}


def test_metric_name_extraction_ignores_functions_labels_and_grouping():
    expr = 'histogram_quantile(0.5, sum by (le, stage) (rate(a_bucket{model=~"x|y", s="by(z)"}[5m]))) / on(x) b'
    assert metric_names(expr) == {"a_bucket", "b"}


def test_every_query_parses_as_promql(tmp_path):
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(evaluable_queries())
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_provisioning_points_grafana_at_prometheus_and_the_dashboard_folder():
    provisioning = DASHBOARDS / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["url"].startswith("http")
    [provider] = yaml.safe_load((provisioning / "dashboards" / "turbo-serve.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["folder"] == "turbo-serve"
    assert provider["options"]["path"].startswith("/")


def test_the_schema_rejects_what_grafana_would():
    dashboard = load_dashboards()["overview.json"]
    broken = json.loads(json.dumps(dashboard))
    panel = next(p for p in broken["panels"] if p["type"] != "row")
    del panel["fieldConfig"]["overrides"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft202012Validator)
    broken = json.loads(json.dumps(dashboard))
    broken["graphTooltip"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft202012Validator)
