"""The load report: summary numbers and checks from the workload's job log and the /v1/status
samples, and one PNG of latency, throughput, queue depth and replicas over time.

Definitions (every rate is per submission unless it says otherwise):
- end to end: submit -> mp4 downloaded, client side (polling with backoff adds up to poll.max_s);
  server_e2e is the server's own queue_wait + run time of the job;
- jobs_per_min: completed jobs / (start -> last completion, at least the arrival window);
- goodput_jobs_per_min: completed jobs whose end to end met the SLO, over the same time;
- rejected_429_rate: submissions answered 429; failure_rate: submissions that neither completed,
  nor were rejected with 429, nor cancelled (failed jobs, errors, timeouts, jobs lost or unfinished).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

FINISHED = ("completed", "failed", "cancelled")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the writer was killed
            continue
    return rows


def percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def rank(q: float) -> float:  # nearest rank: a percentile that was actually observed
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}  # fmt: skip


def summarize(jobs: list[dict[str, Any]], samples: list[dict[str, Any]], *, slo_s: float,
              arrival_s: float, started_at: float) -> dict[str, Any]:  # fmt: skip
    """The summary JSON's numbers and checks."""
    outcomes = Counter(j.get("outcome", "unfinished") for j in jobs)
    submitted = len(jobs)
    accepted = [j for j in jobs if j.get("status_code") == 200]
    rejected = [j for j in jobs if j.get("status_code") == 429]
    completed = [j for j in jobs if j.get("outcome") == "completed"]
    submit_5xx = [j for j in jobs if (j.get("status_code") or 0) >= 500]
    poll_5xx = sum(n for j in jobs for code, n in (j.get("poll_errors") or {}).items() if int(code) >= 500)
    last = max((j["finished_at"] for j in completed), default=started_at)
    wall_s = max(last - started_at, arrival_s)  # a short run's few early completions are no rate
    wall_min = wall_s / 60.0
    within_slo = [j for j in completed if j["e2e_s"] <= slo_s]
    accepted_finished = sum(1 for j in accepted if j.get("outcome") in FINISHED or j.get("outcome") == "error")
    e2e = percentiles(j["e2e_s"] for j in completed)
    summary: dict[str, Any] = {
        "slo_s": slo_s,
        "arrival_s": arrival_s,
        "wall_s": wall_s,
        "submitted": submitted,
        "accepted": len(accepted),
        "completed": len(completed),
        "outcomes": dict(outcomes),
        "rejected_429": len(rejected),
        "rejected_429_rate": len(rejected) / submitted if submitted else 0.0,
        "failure_rate": (submitted - len(completed) - len(rejected) - outcomes["cancelled"]) / submitted if submitted else 0.0,
        "http_5xx": {"submit": len(submit_5xx), "poll": poll_5xx},
        "jobs_per_min": len(completed) / wall_min if completed else 0.0,
        "goodput_jobs_per_min": len(within_slo) / wall_min if completed else 0.0,
        "goodput_fraction_of_completed": len(within_slo) / len(completed) if completed else 0.0,
        "offered_jobs_per_min": submitted / (arrival_s / 60.0) if arrival_s > 0 else 0.0,
        "e2e_s": e2e,
        "server_e2e_s": percentiles(j["server_e2e_s"] for j in completed if "server_e2e_s" in j),
        "queue_wait_s": percentiles(j["queue_wait_s"] for j in completed if "queue_wait_s" in j),
        "by_kind": {
            kind: {
                "submitted": sum(1 for j in jobs if j["kind"] == kind),
                "completed": sum(1 for j in completed if j["kind"] == kind),
                "e2e_s": percentiles(j["e2e_s"] for j in completed if j["kind"] == kind),
            }
            for kind in sorted({j["kind"] for j in jobs})
        },
        "status": _status_summary(samples, started_at, arrival_s),
    }
    summary["checks"] = {
        "no_5xx": not submit_5xx and poll_5xx == 0,
        "every_429_has_retry_after": all(_positive_int(j.get("retry_after")) for j in rejected),
        "only_200_or_429_on_submit": all(j.get("status_code") in (200, 429) for j in jobs),
        "every_accepted_job_finished": accepted_finished == len(accepted),
        "every_accepted_job_completed": len(completed) == len(accepted),
        "accepted_p99_within_slo": e2e["p99"] is not None and e2e["p99"] <= slo_s,
    }
    return summary


def _positive_int(value: Any) -> bool:
    return isinstance(value, str) and value.isdigit() and int(value) >= 1


def _status_summary(samples: list[dict[str, Any]], started_at: float, arrival_s: float) -> dict[str, Any]:
    ok = [s for s in samples if "queue_depth" in s]
    during = [s for s in ok if s["t"] - started_at <= arrival_s]
    replicas: dict[str, int] = {}
    for sample in ok:
        for name, count in sample.get("replicas", {}).items():
            replicas[name] = max(replicas.get(name, 0), count)
    gpu = [s["gpu_util"] for s in during if s.get("gpu_util") is not None]
    return {
        "samples": len(samples),
        "failed_samples": len(samples) - len(ok),
        "max_queue_depth": max((s["queue_depth"] for s in ok), default=None),
        "mean_queue_depth": sum(s["queue_depth"] for s in during) / len(during) if during else None,
        "max_running": max((s["running"] for s in ok), default=None),
        "max_replicas": replicas,
        "gpu_util_mean_percent": sum(gpu) / len(gpu) if gpu else None,
    }


def plot(path: Path, jobs: list[dict[str, Any]], samples: list[dict[str, Any]], *, slo_s: float,
         started_at: float, phases: list[tuple[str, float, float]], title: str) -> None:  # fmt: skip
    """Four panels over time: latency, throughput, queue depth, replicas (and GPU use if sampled).
    `phases`: (label, start, end) arrival windows in seconds after `started_at`, shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True, constrained_layout=True)
    fig.suptitle(title)
    t = lambda when: when - started_at  # noqa: E731
    end = max([*(stop for _, _, stop in phases), *(t(j["finished_at"]) for j in jobs if "finished_at" in j)])

    latency = axes[0]
    for kind in sorted({j["kind"] for j in jobs}):
        done = [j for j in jobs if j["kind"] == kind and j.get("outcome") == "completed"]
        latency.scatter([t(j["finished_at"]) for j in done], [j["e2e_s"] for j in done], s=12, label=f"{kind} e2e")
        queued = [j for j in done if "queue_wait_s" in j]
        latency.scatter([t(j["finished_at"]) for j in queued], [j["queue_wait_s"] for j in queued], s=8, marker="x",
                        label=f"{kind} queue wait")  # fmt: skip
    failed = [j for j in jobs if j.get("outcome") not in ("completed", "rejected") and "finished_at" in j]
    if failed:
        latency.scatter([t(j["finished_at"]) for j in failed], [j["e2e_s"] for j in failed], s=25, marker="v",
                        color="black", label="not completed")  # fmt: skip
    latency.axhline(slo_s, color="red", linestyle="--", linewidth=1, label=f"SLO {slo_s:g} s")
    latency.set_ylabel("seconds")
    latency.legend(fontsize="small", loc="best")

    throughput = axes[1]
    width = max(5.0, end / 30)
    bins = [i * width for i in range(int(end / width) + 2)]
    series = {
        "submitted": [t(j["submitted_at"]) for j in jobs],
        "completed": [t(j["finished_at"]) for j in jobs if j.get("outcome") == "completed"],
        "rejected (429)": [t(j["submitted_at"]) for j in jobs if j.get("status_code") == 429],
    }
    for label, times in series.items():
        counts = [sum(1 for x in times if lo <= x < lo + width) * 60.0 / width for lo in bins[:-1]]
        throughput.step(bins[:-1], counts, where="post", label=label)
    throughput.set_ylabel("jobs / min")
    throughput.legend(fontsize="small", loc="best")

    ok = [s for s in samples if "queue_depth" in s]
    queue = axes[2]
    queue.step([t(s["t"]) for s in ok], [s["queue_depth"] for s in ok], where="post", label="queued")
    queue.step([t(s["t"]) for s in ok], [s["running"] for s in ok], where="post", label="running")
    queue.set_ylabel("jobs")
    queue.legend(fontsize="small", loc="best")

    replicas = axes[3]
    for name in sorted({n for s in ok for n in s.get("replicas", {})}):
        replicas.step([t(s["t"]) for s in ok], [s.get("replicas", {}).get(name, 0) for s in ok], where="post", label=name)
    most = max((n for s in ok for n in s.get("replicas", {}).values()), default=1)
    replicas.set_ylim(-0.3, most + 1)
    replicas.set_ylabel("running replicas")
    replicas.set_xlabel(f"seconds since {phases[0][0] if phases else 'the start'}")
    replicas.legend(fontsize="small", loc="best")
    gpu = [s for s in ok if s.get("gpu_util") is not None]
    if gpu:
        util = replicas.twinx()
        util.plot([t(s["t"]) for s in gpu], [s["gpu_util"] for s in gpu], color="gray", alpha=0.6, label="GPU util %")
        util.set_ylim(0, 100)
        util.set_ylabel("GPU util %")
    for axis in axes:
        for index, (label, start, stop) in enumerate(phases):
            axis.axvspan(start, stop, color=f"C{index}", alpha=0.06, linewidth=0)
            if axis is latency:
                axis.annotate(label, (start, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                              textcoords="offset points", fontsize="small", color="dimgray")  # fmt: skip
        axis.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
