"""Test harness: a real Prometheus (Debian's binary) on a loopback port, and the dashboards' queries.

The Prometheus config is the committed deploy/prometheus/prometheus.yml with only its file_sd paths
and intervals replaced, so the tests exercise the file operators deploy.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = ROOT / "dashboards"

# Values a Grafana user gets by default: $__rate_interval and $__range span the whole (short) test,
# so every sample sent during it is inside the window; the model variable's default is All (.*).
GRAFANA_DEFAULTS = {
    "$__rate_interval": "5m",
    "$__interval": "5s",
    "$__range": "5m",
    "${datasource}": "prometheus",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(*, ray_sd: str, gpu_sd: str, scrape_interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml with the test's file_sd paths and a short scrape interval."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval, scrape_timeout=scrape_interval)
    files = {"ray": ray_sd, "turbo_gpu": gpu_sd}
    for job in config["scrape_configs"]:
        job["file_sd_configs"] = [{"files": [files[job["job_name"]]], "refresh_interval": scrape_interval}]
    return config


class PrometheusServer:
    """Starts `prometheus` with a config dict in `workdir`; stop() (or the with block) ends it."""

    def __init__(self, config: dict, workdir: Path) -> None:
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus binary not found; `make system-deps` installs Debian's package")
        self.workdir = Path(workdir)
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> PrometheusServer:
        self.log = open(self.workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s: {self.log_text()}")

    def log_text(self) -> str:
        return (self.workdir / "prometheus.log").read_text()[-2000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the list of series (vector) it returned."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise ValueError(f"{expr}: expected a vector, got {data['resultType']}")
        return data["result"]

    def active_targets(self, job: str) -> list[dict]:
        return [t for t in self.api("targets", state="active")["activeTargets"] if t["labels"]["job"] == job]

    def series_names(self) -> set[str]:
        return set(self.api("label/__name__/values"))


def wait_for(predicate, timeout_s: float, interval_s: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met after {timeout_s}s")
        time.sleep(interval_s)


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str
    """As committed, with Grafana variables."""

    @property
    def label(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}"


def load_dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def iter_panels(dashboard: dict) -> Iterator[dict]:
    for item in dashboard["panels"]:
        if item["type"] == "row":
            yield from item["panels"]
        else:
            yield item


def panel_queries() -> list[PanelQuery]:
    return [
        PanelQuery(name, item["title"], t["refId"], t["expr"])
        for name, dashboard in load_dashboards().items()
        for item in iter_panels(dashboard)
        for t in item.get("targets", [])
    ]


def variable_defaults(dashboard: dict) -> dict[str, str]:
    """$name -> the value Grafana substitutes for the variable's default (All = allValue)."""
    values = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            current = var["current"]["value"]
            all_selected = current == ["$__all"] or current == "$__all"
            values["$" + var["name"]] = var["allValue"] if all_selected else "|".join(current)
    return values


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted({**GRAFANA_DEFAULTS, **variables}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    if "$" in expr:
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr


def evaluable_queries() -> list[tuple[PanelQuery, str]]:
    """Every panel query with Grafana's variables replaced by their defaults."""
    defaults = {name: variable_defaults(d) for name, d in load_dashboards().items()}
    return [(q, substitute(q.expr, defaults[q.dashboard])) for q in panel_queries()]


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects. Strings, label matchers, ranges and grouping
    clauses are removed first, then every identifier not followed by "(" is a series name."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not following.startswith("("):
            names.add(match.group())
    return names


def has_finite_value(series: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in series)
