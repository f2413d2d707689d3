"""Does the GPU exporter agree with nvidia-smi? Both are sampled at the same moments under load.

    python bench/gpu_metrics.py                 # on a GPU host: jobs + matmul phases, about 2-3 min
    python bench/gpu_metrics.py --smoke --out /tmp/x   # CPU host: tiny jobs, asserts the no-GPU path, plots

Runs the exporter standalone (no Ray), loads one GPU with several pipeline jobs (in-process Pipeline,
random weights) and then matmul bursts of different intensity and memory size, and every --interval
seconds scrapes the exporter's /metrics and runs `nvidia-smi --query-gpu=...` side by side. Writes
bench/results/gpu_metrics_h200.json (both series, agreement per field) and gpu_metrics_h200.png
(utilization and memory from both sources over time). Each phase runs in its own try/except: a phase
that fails is recorded and the run goes on; total time is bounded by the phase lengths and --jobs-budget-s.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from source_checkout import importable_from_checkout  # noqa: E402

importable_from_checkout()  # the jobs phase's DiT imports it; a bare checkout does not provide it

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from turbo_serve.metrics import catalog  # noqa: E402
from turbo_serve.metrics.gpu_exporter import GpuExporter  # noqa: E402

SMI_FIELDS = ("index", "uuid", "utilization.gpu", "memory.used", "memory.total", "temperature.gpu", "power.draw", "clocks.sm")
MIB = 1024 * 1024

# field -> (exporter series, exporter value -> nvidia-smi unit, smi column, tolerance(smi value, total MiB))
FIELDS = {
    "utilization_percent": (catalog.GPU_UTILIZATION.prometheus_name, 1.0, "utilization.gpu", lambda v, t: 10.0),
    "memory_used_mib": (catalog.GPU_MEMORY_USED.prometheus_name, 1 / MIB, "memory.used", lambda v, t: 64.0),
    "memory_total_mib": (catalog.GPU_MEMORY_TOTAL.prometheus_name, 1 / MIB, "memory.total", lambda v, t: 1.0),
    "temperature_celsius": (catalog.GPU_TEMPERATURE.prometheus_name, 1.0, "temperature.gpu", lambda v, t: 2.0),
    "power_watts": (catalog.GPU_POWER.prometheus_name, 1.0, "power.draw", lambda v, t: max(30.0, 0.1 * v)),
    "sm_clock_mhz": (catalog.GPU_SM_CLOCK.prometheus_name, 1e-6, "clocks.sm", lambda v, t: max(30.0, 0.05 * v)),
}  # fmt: skip
AGREE_FRACTION = 0.9
"""A field agrees when at least this share of paired samples is within its tolerance. The two reads
are up to ~0.1 s apart, and utilization and power are windowed by the driver, so samples taken while
load or memory changes can differ; steady-state memory should match to nvidia-smi's MiB rounding."""


@dataclass
class Recorder:
    """Samples exporter and nvidia-smi together on a background thread."""

    exporter_url: str
    interval_s: float
    samples: list[dict] = field(default_factory=list)
    phase: str = "start"
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self.smi = shutil.which("nvidia-smi")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            exporter = self._pool.submit(self._timed, self._scrape)
            smi = self._pool.submit(self._timed, self._nvidia_smi) if self.smi else None
            sample = {"phase": self.phase}
            for key, future in (("exporter", exporter), ("nvidia_smi", smi)):
                if future is None:
                    continue
                try:
                    t, value = future.result()
                    sample[key], sample[f"t_{key}"] = value, round(t - self.t0, 3)
                except Exception as exc:  # one failed read must not end the series
                    self.errors.append(f"{key} at {started - self.t0:.1f}s: {exc!r}")
            sample["t"] = round(started - self.t0, 3)
            self.samples.append(sample)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    @staticmethod
    def _timed(fn):
        start = time.monotonic()
        value = fn()
        return (start + time.monotonic()) / 2, value

    def _scrape(self) -> dict:
        body = urllib.request.urlopen(self.exporter_url, timeout=5).read().decode()
        gpus: dict[str, dict] = {}
        status = {}
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if "uuid" in s.labels and s.name in catalog.GPU_HARDWARE_SERIES:
                    gpus.setdefault(s.labels["uuid"], {"index": int(s.labels["gpu"])})[s.name] = s.value
                elif s.name in (catalog.GPU_PRESENT.prometheus_name, catalog.GPU_COUNT.prometheus_name):
                    status[s.name] = s.value
        return {"gpus": gpus, **status}

    def _nvidia_smi(self) -> dict:
        out = subprocess.run(
            [self.smi, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        gpus = {}
        for line in out.strip().splitlines():
            values = dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
            gpus[values["uuid"]] = {k: _number(v) for k, v in values.items() if k != "uuid"}
        return {"gpus": gpus}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


# Load ------------------------------------------------------------------------------------------------


def matmul_phases(smoke: bool) -> list[tuple[str, float, float, float]]:
    """(name, seconds, duty cycle, GiB to hold): distinct utilization and memory levels."""
    if smoke:
        return [("idle", 1.0, 0.0, 0.0), ("cpu matmul", 1.5, 1.0, 0.0), ("cpu 30% duty", 1.0, 0.3, 0.0)]
    return [
        ("idle", 6.0, 0.0, 0.0),
        ("matmul 100%, 16 GiB", 12.0, 1.0, 16.0),
        ("idle, 16 GiB held", 6.0, 0.0, 16.0),
        ("matmul 50% duty, 48 GiB", 12.0, 0.5, 48.0),
        ("matmul 20% duty, 8 GiB", 10.0, 0.2, 8.0),
        ("freed, idle", 6.0, 0.0, 0.0),
    ]


def run_matmul_phase(torch, device: str, seconds: float, duty: float, hold_gib: float, size: int) -> dict:
    held = torch.empty(int(hold_gib * 1024**3), dtype=torch.uint8, device=device) if hold_gib else None
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    period, launched, end = 0.1, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        busy_until = time.monotonic() + period * duty
        while duty > 0 and time.monotonic() < busy_until:
            for _ in range(4):
                a @ b
            launched += 4
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
        time.sleep(max(0.0, min(period * (1 - duty), end - time.monotonic())))
    del held, a, b
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"matmuls": launched, "size": size}


class PhaseLog:
    """Named time spans of the run (shaded in the plot). A phase that raises is recorded with its
    error and the run goes on with the next one."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.phases: list[dict] = []
        self.errors: list[str] = []

    @contextmanager
    def __call__(self, label: str) -> Iterator[dict]:
        self.recorder.phase = label
        entry = {"name": label, "t_start": round(time.monotonic() - self.recorder.t0, 2)}
        try:
            yield entry
        except Exception as exc:
            entry["error"] = repr(exc)
            self.errors.append(f"{label}: {exc!r}\n{traceback.format_exc(limit=5)}")
        entry["t_end"] = round(time.monotonic() - self.recorder.t0, 2)
        self.phases.append(entry)


def run_jobs(args, device: str, phase: PhaseLog) -> None:
    """Several pipeline jobs in this process (random weights); no new job starts after --jobs-budget-s."""
    import torch

    from turbo_serve.pipeline.spec import GenerationSpec

    deadline = time.monotonic() + args.jobs_budget_s
    pipeline = None
    with tempfile.TemporaryDirectory() as work:
        with phase(f"load {args.model}"):
            from turbo_serve.pipeline.stages import Pipeline, PipelineConfig

            dtype = "float32" if device == "cpu" else "bfloat16"
            from turbo_serve.models.tokenizer import ensure_tiny_tokenizer

            # Random weights: the real UMT5 reads token ids of the tiny tokenizer (no download).
            tokenizer = str(ensure_tiny_tokenizer(Path(work) / "tokenizer"))
            pipeline = Pipeline(PipelineConfig(model=args.model, device=device, dtype=dtype, cache_dir=work, tokenizer=tokenizer))
        for i in range(args.jobs if pipeline is not None else 0):
            if time.monotonic() > deadline:
                break
            spec = GenerationSpec(
                prompt=f"a red fox running through snow, shot {i}", model=args.model, width=args.width,
                height=args.height, num_frames=args.num_frames, num_steps=args.num_steps, seed=i,
                attention_type=args.attention_type,
            )  # fmt: skip
            with phase(f"job {i + 1}") as entry:
                entry["timings"] = pipeline.generate(spec, None, work).timings
    del pipeline
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# Agreement -------------------------------------------------------------------------------------------


def agreement(samples: list[dict]) -> dict:
    """Per field: paired exporter/nvidia-smi readings of each GPU at the same sample."""
    report = {}
    for name, (series, scale, column, tolerance) in FIELDS.items():
        pairs = []
        for s in samples:
            exp, smi = s.get("exporter", {}).get("gpus", {}), s.get("nvidia_smi", {}).get("gpus", {})
            for uuid in exp.keys() & smi.keys():
                e, n = exp[uuid].get(series), smi[uuid].get(column)
                total = smi[uuid].get("memory.total") or 0.0
                if e is not None and n is not None:
                    pairs.append((e * scale, n, tolerance(n, total)))
        if not pairs:
            report[name] = {"n": 0}
            continue
        diffs = [abs(e - n) for e, n, _ in pairs]
        within = sum(d <= tol for d, (_, _, tol) in zip(diffs, pairs)) / len(pairs)
        report[name] = {
            "n": len(pairs),
            "mean_abs_diff": round(statistics.fmean(diffs), 3),
            "median_abs_diff": round(statistics.median(diffs), 3),
            "max_abs_diff": round(max(diffs), 3),
            "mean_signed_diff": round(statistics.fmean(e - n for e, n, _ in pairs), 3),
            "pearson_r": _pearson([p[0] for p in pairs], [p[1] for p in pairs]),
            "within_tolerance": round(within, 3),
            "agree": within >= AGREE_FRACTION,
        }
    return report


def _pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return None
    return round(statistics.correlation(x, y), 4)


# Plot ------------------------------------------------------------------------------------------------


def series(samples: list[dict], source: str, uuid: str, key: str, scale: float) -> tuple[list, list]:
    """(times, values) of one GPU's field from one source ("exporter" or "nvidia_smi")."""
    points = [
        (s[f"t_{source}"], s[source]["gpus"][uuid][key] * scale)
        for s in samples
        if s.get(source, {}).get("gpus", {}).get(uuid, {}).get(key) is not None
    ]
    return ([p[0] for p in points], [p[1] for p in points])


def plot(samples: list[dict], phases: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    views = (
        (axes[0], "utilization (%)", catalog.GPU_UTILIZATION.prometheus_name, 1.0, "utilization.gpu", 1.0),
        (axes[1], "memory used (GiB)", catalog.GPU_MEMORY_USED.prometheus_name, 1 / 1024**3, "memory.used", 1 / 1024),
    )
    uuids = sorted({u for s in samples for u in s.get("exporter", {}).get("gpus", {})})
    for ax, ylabel, series_name, exporter_scale, smi_column, smi_scale in views:
        for i, uuid in enumerate(uuids):
            ax.plot(*series(samples, "exporter", uuid, series_name, exporter_scale), "-", color=f"C{i}",
                    linewidth=1.2, label=f"exporter {uuid[:12]}")  # fmt: skip
            ax.plot(*series(samples, "nvidia_smi", uuid, smi_column, smi_scale), "o", color=f"C{i}",
                    markersize=3, markerfacecolor="none", label=f"nvidia-smi {uuid[:12]}")  # fmt: skip
        for k, phase in enumerate(phases):
            ax.axvspan(phase["t_start"], phase["t_end"], color="0.88" if k % 2 else "0.96", zorder=0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if uuids:
            ax.legend(fontsize=7, loc="upper right")
    axes[0].set_ylim(0, 105)
    for phase in phases:
        axes[0].text(phase["t_start"], 106, phase["name"], fontsize=7, rotation=20, va="bottom")
    axes[1].set_xlabel("seconds since start")
    if not uuids:
        axes[0].text(0.5, 0.5, "no GPU: the exporter reports turbo_gpu_present 0", transform=axes[0].transAxes,
                     ha="center")  # fmt: skip
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU host: assert the no-GPU path, tiny CPU load")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default=None, help="output stem (default gpu_metrics_h200, or _smoke)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between paired samples")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device to load")
    parser.add_argument("--load", choices=("both", "jobs", "matmul"), default="both")
    parser.add_argument("--jobs", type=int, default=6, help="pipeline jobs (a 1.3B 480p job is ~4 s on an H200)")
    parser.add_argument("--jobs-budget-s", type=float, default=150.0, help="model load + jobs stop starting after this")
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--attention-type", default="original", help="registered backend for the jobs")
    parser.add_argument("--matmul-size", type=int, default=8192)
    args = parser.parse_args(argv)
    name = args.name or ("gpu_metrics_smoke" if args.smoke else "gpu_metrics_h200")
    if args.smoke:  # two tiny jobs on the CPU: the jobs phase runs here too, just small
        args.model, args.width, args.height, args.num_frames, args.num_steps, args.jobs = "tiny-t2v", 128, 96, 5, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    if args.smoke:
        torch.set_num_threads(1)  # shared CI box
    device = "cpu" if args.smoke else f"cuda:{args.gpu}"
    with GpuExporter(host="127.0.0.1", port=0) as exporter:
        recorder = Recorder(exporter.url, args.interval)
        meta = {
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "driver_version": exporter.nvml.driver_version,
            "nvml_version": exporter.nvml.nvml_version,
            "nvml_error": exporter.nvml.error,
            "gpus": [{"index": r.index, "uuid": r.uuid, "name": r.name} for r in exporter.nvml.read()],
            "nvidia_smi": recorder.smi is not None,
            "interval_s": args.interval,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        phase = PhaseLog(recorder)
        recorder.start()
        if args.load in ("both", "jobs"):
            run_jobs(args, device, phase)
        if args.load in ("both", "matmul"):
            size = 256 if args.smoke else args.matmul_size
            for label, seconds, duty, gib in matmul_phases(args.smoke):
                with phase(label) as entry:
                    entry.update(run_matmul_phase(torch, device, seconds, duty, gib, size))
        recorder.stop()
    errors = phase.errors + recorder.errors
    phases = phase.phases

    samples = recorder.samples
    report = agreement(samples)
    result = {"meta": meta, "phases": phases, "agreement": report, "errors": errors, "samples": samples}
    json_path, png_path = args.out / f"{name}.json", args.out / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    gpu_names = ", ".join(sorted({g["name"] for g in meta["gpus"]})) or "no GPU"
    try:
        plot(samples, phases, png_path, f"turbo_gpu exporter vs nvidia-smi ({gpu_names}, every {args.interval}s)")
    except Exception as exc:
        errors.append(f"plot: {exc!r}")

    print(f"\n{len(samples)} paired samples, {len(phases)} phases, {len(errors)} errors -> {json_path}, {png_path}")
    print(f"{'field':<22}{'n':>6}{'median |d|':>12}{'max |d|':>10}{'r':>8}{'within tol':>12}  agree")
    for field_name, stats in report.items():
        if stats["n"]:
            r = stats["pearson_r"]
            print(
                f"{field_name:<22}{stats['n']:>6}{stats['median_abs_diff']:>12}{stats['max_abs_diff']:>10}"
                f"{'-' if r is None else r:>8}{stats['within_tolerance']:>12}  {stats['agree']}"
            )
        else:
            print(f"{field_name:<22}{0:>6}  (no paired samples)")
    for error in errors:
        print("error:", error.splitlines()[0])

    if args.smoke:
        present = [s["exporter"].get(catalog.GPU_PRESENT.prometheus_name) for s in samples if "exporter" in s]
        assert present and all(p == 0 for p in present), f"expected turbo_gpu_present 0 throughout, got {present}"
        assert all(not s["exporter"]["gpus"] for s in samples if "exporter" in s), "GPU series without a GPU"
        assert png_path.stat().st_size > 0
        print("smoke: no-GPU path OK (turbo_gpu_present 0, no GPU series, plot written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
