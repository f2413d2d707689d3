"""Builds turbo-serve's Grafana dashboards (overview.json, stages.json) from the metric catalog.

    python dashboards/build.py           # rewrite the JSON files next to this script
    python dashboards/build.py --check   # exit 1 if the committed JSON differs from what this builds

The JSON is committed so Grafana can provision it without Python; tests check that it matches this
builder, that it is valid against Grafana's dashboard model, and (against a live Prometheus) that
every query returns data. Metric names come from turbo_serve.metrics.catalog only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from turbo_serve.metrics import catalog as c

SCHEMA_VERSION = 41
"""Grafana 12.0's dashboard schema; Grafana migrates older dashboards up, never newer ones down."""
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
HERE = Path(__file__).resolve().parent
MODEL = 'model=~"$model"'
"""Filter of the per-job metrics by the dashboard's model variable (All = .*)."""


def rate(series: str, selector: str = "") -> str:
    matchers = f"{{{selector}}}" if selector else ""
    return f"rate({series}{matchers}[$__rate_interval])"


def quantile(q: float, metric: c.MetricDef, by: str = "", selector: str = MODEL) -> str:
    grouping = ", ".join(["le", *filter(None, [by])])
    return f"histogram_quantile({q}, sum by ({grouping}) ({rate(metric.prometheus_name + '_bucket', selector)}))"


def mean(metric: c.MetricDef, by: str, selector: str = MODEL) -> str:
    name = metric.prometheus_name
    return f"sum by ({by}) ({rate(name + '_sum', selector)}) / sum by ({by}) ({rate(name + '_count', selector)})"


def target(expr: str, legend: str, *, table: bool = False) -> dict:
    query = {"refId": "", "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "editorMode": "code"}
    if table:
        query.update(format="table", instant=True, range=False)
    else:
        query.update(range=True, instant=False)
    return query


def thresholds(*steps: tuple[float, str], base: str = "green") -> dict:
    return {"mode": "absolute", "steps": [{"color": base, "value": None}] + [{"color": col, "value": v} for v, col in steps]}


def panel(
    kind: str,
    title: str,
    description: str,
    targets: list[dict],
    *,
    unit: str,
    width: int = 12,
    height: int = 8,
    min_value: float | None = 0,
    max_value: float | None = None,
    steps: dict | None = None,
    stack: bool = False,
    overrides: list[dict] | None = None,
) -> dict:
    for ref, query in zip("ABCDEFGH", targets):
        query["refId"] = ref
    defaults: dict = {
        "unit": unit,
        "color": {"mode": "thresholds" if kind == "stat" else "palette-classic"},
        "thresholds": steps or thresholds(),
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 25 if stack else 5,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if steps else "off"},
        }
        options = {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    else:  # table
        options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}}
    result = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": options,
        "transformations": [],
    }
    if kind == "table":
        hidden = {"Time": True, "Value": True, "__name__": True, "job": True}
        result["transformations"] = [{"id": "organize", "options": {"excludeByName": hidden}}]
    return result


def dashed(ref_id: str) -> dict:
    """Field override drawing one query's series as a dashed line (capacities next to usage)."""
    style = {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}
    return {"matcher": {"id": "byFrameRefID", "options": ref_id}, "properties": [style]}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}}


def lay_out(panels: list[dict]) -> list[dict]:
    """Assign ids and grid positions left to right, wrapping at Grafana's 24 columns; rows start a line."""
    x = y = line_height = 0
    for number, item in enumerate(panels, start=1):
        item["id"] = number
        pos = item["gridPos"]
        if item["type"] == "row" or x + pos["w"] > 24:
            x, y, line_height = 0, y + line_height, 0
        pos["x"], pos["y"] = x, y
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if item["type"] == "row":
            x, y, line_height = 0, y + pos["h"], 0
    return panels


def variables() -> list[dict]:
    model_query = f"label_values({c.JOBS_FINISHED.prometheus_name}, model)"
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        },
        {
            "name": "model",
            "label": "Model",
            "type": "query",
            "datasource": DATASOURCE,
            "definition": model_query,
            "query": {"query": model_query, "refId": "ModelVariable", "qryType": 1},
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,
            "sort": 1,
            "regex": "",
            "hide": 0,
            "options": [],
        },
    ]


def dashboard(uid: str, title: str, description: str, panels: list[dict], links: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["turbo-serve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": links,
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables()},
        "panels": lay_out(panels),
    }


def link(title: str, uid: str) -> dict:
    return {
        "title": title,
        "type": "link",
        "icon": "dashboard",
        "tooltip": "",
        "url": f"/d/{uid}",
        "tags": [],
        "asDropdown": False,
        "targetBlank": False,
        "includeVars": True,
        "keepTime": True,
    }


OVERVIEW_UID = "turbo-serve-overview"
STAGES_UID = "turbo-serve-stages"


def overview() -> dict:
    finished = c.JOBS_FINISHED.prometheus_name
    by_state = c.JOBS_BY_STATE.prometheus_name
    gpu_labels = "{{instance}} GPU {{gpu}}"
    panels = [
        row("Jobs"),
        panel(
            "timeseries", "Jobs finished per minute", "Jobs reaching a terminal state, by outcome.",
            [target(f"sum by (outcome) ({rate(finished, MODEL)}) * 60", "{{outcome}}")],
            unit="suffix: jobs/min", width=8,
        ),
        panel(
            "timeseries", "Jobs by state", "Jobs in each non-terminal state, as the job store counts them.",
            [target(f"max by (state) ({by_state})", "{{state}}")],
            unit="short", width=8, stack=True,
        ),
        panel(
            "stat", "Queue depth", "Jobs accepted and waiting for their first stage.",
            [target(f'max({by_state}{{state="queued"}})', "queued")],
            unit="short", width=4, steps=thresholds((5, "orange"), (20, "red")),
        ),
        panel(
            "stat", "Rejected (429) per minute", "Submissions refused because the queue was full.",
            [target(f"sum({rate(c.JOBS_REJECTED.prometheus_name)}) * 60", "429/min")],
            unit="suffix: /min", width=4, steps=thresholds((0.1, "orange"), (5, "red")),
        ),
        panel(
            "timeseries", "End-to-end latency", "Submission to finished mp4, completed jobs; quantiles over the rate interval.",
            [target(quantile(q, c.JOB_E2E), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)],
            unit="s", width=12,
        ),
        panel(
            "timeseries", "Queue wait", "Submission to the start of the job's first stage.",
            [target(quantile(q, c.QUEUE_WAIT), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)],
            unit="s", width=12,
        ),
        panel(
            "timeseries", "Refused requests per minute", "429 (queue full) and 422 (validation) by field.",
            [
                target(f"sum({rate(c.JOBS_REJECTED.prometheus_name)}) * 60", "429 queue full"),
                target(f"sum by (field) ({rate(c.VALIDATION_ERRORS.prometheus_name)}) * 60", "422 {{field}}"),
            ],
            unit="suffix: /min", width=12, steps=thresholds((5, "red")),
        ),
        panel(
            "timeseries", "HTTP responses by status", "Requests through Serve's HTTP proxy, per second.",
            [target(f"sum by (status_code) ({rate('ray_serve_num_http_requests_total')})", "{{status_code}}")],
            unit="reqps", width=12,
        ),
        row("GPUs"),
        panel(
            "timeseries", "GPU utilization", "NVML utilization per GPU (share of time a kernel ran).",
            [target(c.GPU_UTILIZATION.prometheus_name, gpu_labels)],
            unit="percent", width=12, max_value=100, steps=thresholds((95, "red"), base="green"),
        ),
        panel(
            "timeseries", "GPU memory used", "Device memory in use per GPU, and each GPU's size (dashed).",
            [
                target(c.GPU_MEMORY_USED.prometheus_name, gpu_labels),
                target(c.GPU_MEMORY_TOTAL.prometheus_name, gpu_labels + " total"),
            ],
            unit="bytes", width=12, overrides=[dashed("B")],
        ),
        panel(
            "timeseries", "GPU memory used %", "Used over total per GPU; near 100% the next job may OOM.",
            [target(f"100 * {c.GPU_MEMORY_USED.prometheus_name} / {c.GPU_MEMORY_TOTAL.prometheus_name}", gpu_labels)],
            unit="percent", width=8, max_value=100, steps=thresholds((85, "orange"), (95, "red")),
        ),
        panel(
            "stat", "GPUs visible", "GPUs NVML sees across all exporters; 0 means no NVIDIA driver on any node.",
            [target(f"sum({c.GPU_COUNT.prometheus_name})", "GPUs")],
            unit="short", width=4, steps=thresholds((1, "green"), base="red"),
        ),
        panel(
            "table", "Which replica holds each GPU", "Serve replicas and the GPUs they reported at start.",
            [target(f"max by (instance, gpu, uuid, application, deployment, replica) ({c.GPU_REPLICA.prometheus_name})", "", table=True)],
            unit="none", width=12,
        ),
        row("Replicas"),
        panel(
            "timeseries", "Healthy replicas per deployment", "Ray Serve's health gauge summed per deployment.",
            [target("sum by (application, deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")],
            unit="short", width=12,
        ),
        panel(
            "timeseries", "Autoscaling: target and desired replicas", "The controller's target and its latest decision.",
            [
                target("max by (deployment) (ray_serve_autoscaling_target_replicas)", "{{deployment}} target"),
                target("max by (deployment) (ray_serve_autoscaling_desired_replicas)", "{{deployment}} desired"),
            ],
            unit="short", width=12,
        ),
        panel(
            "timeseries", "Requests waiting for a replica", "Serve's router queue per deployment (before a replica takes them).",
            [target("sum by (deployment) (ray_serve_deployment_queued_queries)", "{{deployment}}")],
            unit="short", width=12,
        ),
        panel(
            "timeseries", "Requests executing per deployment", "In-flight requests on replicas.",
            [target("sum by (deployment) (ray_serve_replica_processing_queries)", "{{deployment}}")],
            unit="short", width=12,
        ),
    ]  # fmt: skip
    return dashboard(
        OVERVIEW_UID, "turbo-serve: overview", "Are the GPUs busy, are jobs flowing, how long do they take.",
        panels, [link("Per-stage latency", STAGES_UID)],
    )  # fmt: skip


def stages() -> dict:
    cache = c.TEXT_CACHE.prometheus_name
    hit = 'result="hit"'
    batch = "ray_serve_actual_batch_size"
    panels = [
        row("Stages"),
        panel(
            "timeseries", "Stage latency p50", "Median seconds per stage.",
            [target(quantile(0.5, c.STAGE, by="stage"), "{{stage}}")],
            unit="s", width=12,
        ),
        panel(
            "timeseries", "Stage latency p95", "95th percentile seconds per stage.",
            [target(quantile(0.95, c.STAGE, by="stage"), "{{stage}}")],
            unit="s", width=12,
        ),
        panel(
            "timeseries", "Mean time per stage", "Where a job's time goes: mean seconds per stage, stacked.",
            [target(mean(c.STAGE, "stage"), "{{stage}}")],
            unit="s", width=12, stack=True,
        ),
        panel(
            "timeseries", "Stage latency by resolution", "Mean seconds per stage and resolution class.",
            [target(mean(c.STAGE, "stage, resolution"), "{{stage}} {{resolution}}")],
            unit="s", width=12,
        ),
        row("DiT steps"),
        panel(
            "timeseries", "DiT step latency", "Seconds per denoising step, by attention backend.",
            [
                target(quantile(q, c.DIT_STEP, by="attention_type"), f"p{round(q * 100)} {{{{attention_type}}}}")
                for q in (0.5, 0.95, 0.99)
            ],
            unit="s", width=12,
        ),
        panel(
            "timeseries", "DiT steps per second", "Denoising steps completed per second, all replicas.",
            [target(f"sum by (model) ({rate(c.DIT_STEP.prometheus_name + '_count', MODEL)})", "{{model}}")],
            unit="suffix: steps/s", width=12,
        ),
        row("Batching and caching"),
        panel(
            "timeseries", "Batch size (Serve @serve.batch)", "Mean size of the batches Serve formed, per deployment.",
            [
                target(
                    f"sum by (deployment) ({rate(batch + '_sum')}) / sum by (deployment) ({rate(batch + '_count')})",
                    "{{deployment}} mean",
                ),
                target(
                    f"histogram_quantile(0.95, sum by (le, deployment) ({rate(batch + '_bucket')}))",
                    "{{deployment}} p95",
                ),
            ],
            unit="short", width=12,
        ),
        panel(
            "timeseries", "Text-encoder cache lookups", "Prompt-embedding cache lookups per second, by result.",
            [target(f"sum by (result) ({rate(cache)})", "{{result}}")],
            unit="ops", width=6, stack=True,
        ),
        panel(
            "stat", "Text-encoder cache hit ratio", "Share of lookups served from the cache over the rate interval.",
            [target(f"sum({rate(cache, hit)}) / sum({rate(cache)})", "hit ratio")],
            unit="percentunit", width=6, max_value=1, steps=thresholds((0.2, "yellow"), (0.5, "green"), base="blue"),
        ),
    ]  # fmt: skip
    return dashboard(
        STAGES_UID, "turbo-serve: stages", "Latency per pipeline stage and per DiT step, batching and caching.",
        panels, [link("Overview", OVERVIEW_UID)],
    )  # fmt: skip


DASHBOARDS = {"overview.json": overview, "stages.json": stages}


def render(build) -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed files")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = HERE / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/build.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
