"""`turbo-serve serve`: start a local Ray, deploy the application, print its URL, run until Ctrl-C.

With no arguments it serves the tiny T2V model on the CPU with every embedded default, which is
what `make serve` runs on a fresh machine. Settings come from TURBO_SERVE_* variables and `--set
name=value` (values parsed as JSON when they parse, e.g. --set models='["tiny-t2v","tiny-i2v"]').
For a config file use Ray's own CLI: `serve run serve_config.yaml` / `serve deploy serve_config.yaml`.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from pydantic import ValidationError

APP_NAME = "turbo-serve"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--models", help="comma-separated presets, e.g. tiny-t2v,tiny-i2v (default tiny-t2v)")
    parser.add_argument("--device", help="cpu or cuda (default cpu)")
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of the local Ray (default: all cores)")
    parser.add_argument("--num-gpus", type=float, help="logical GPUs of the local Ray (default: detected)")
    parser.add_argument("--metrics-export-port", type=int, default=8080,
                        help="Ray's metrics port (Prometheus scrapes it; 0 = any free port; default 8080)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override one setting (repeatable)")  # fmt: skip


def settings_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for item in args.overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    if args.models:
        overrides["models"] = args.models
    if args.device:
        overrides["device"] = args.device
    return overrides


def run(args: argparse.Namespace) -> int:
    from turbo_serve.settings import Settings

    try:
        settings = Settings(**settings_overrides(args))
    except (ValidationError, ValueError) as error:
        print(f"turbo-serve serve: invalid settings:\n{error}")
        return 2

    import ray
    from ray import serve

    from turbo_serve.metrics.gpu_fleet import SD_FILE_NAME
    from turbo_serve.serving.app import build_app

    try:
        app = build_app(settings)
    except ValueError as error:
        print(f"turbo-serve serve: {error}")
        return 2
    # `serve run` cannot set the metrics port (ray-project/ray#44426), so the local Ray started here does.
    ray.init(num_cpus=args.num_cpus, num_gpus=args.num_gpus, _metrics_export_port=args.metrics_export_port or None)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print(f"\nturbo-serve is up: http://{host}:{args.port}/  (models: {', '.join(settings.models)}; "
              f"API under /v1; Ctrl-C stops it)", flush=True)  # fmt: skip
        print(f"metrics: Ray's on port {ray.nodes()[0]['MetricsExportPort']}, GPU exporters listed in "
              f"<Ray temp dir>/{SD_FILE_NAME} (see deploy/prometheus/prometheus.yml)", flush=True)  # fmt: skip
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
