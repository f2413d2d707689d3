"""The load profile: what requests a load test sends (a weighted mix of T2V/I2V bodies), how fast
(an arrival rate in jobs per minute, shaped over time) and how the simulated clients behave (poll
backoff, timeouts). One small YAML file; deploy/loadtest/profiles/ holds examples."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

SHAPES = ("soak", "step", "burst")
ARRIVALS = ("poisson", "uniform")


@dataclass(frozen=True)
class RequestKind:
    """One entry of the mix: a request body (the API's fields) sent with probability weight/total."""

    name: str
    body: dict[str, Any]
    weight: float = 1.0
    image: tuple[int, int] | None = None
    """I2V: width and height of a generated input image sent as the multipart input_reference."""


@dataclass(frozen=True)
class Poll:
    initial_s: float = 0.25
    factor: float = 1.5
    max_s: float = 2.0


@dataclass(frozen=True)
class Shape:
    """Arrival rate over the test, as multiples of the base rate:
    soak: 1 throughout; step: each of `levels` for an equal share of the duration; burst: `base`,
    except the last `burst_s` of every `period_s`, which run at `peak`."""

    kind: str = "soak"
    levels: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    base: float = 0.5
    peak: float = 3.0
    period_s: float = 30.0
    burst_s: float = 6.0

    def multiplier(self, elapsed_s: float, duration_s: float) -> float:
        if elapsed_s < 0 or elapsed_s >= duration_s:
            return 0.0
        if self.kind == "soak":
            return 1.0
        if self.kind == "step":
            return self.levels[min(len(self.levels) - 1, int(elapsed_s / duration_s * len(self.levels)))]
        in_period = elapsed_s % self.period_s
        return self.peak if in_period >= self.period_s - self.burst_s else self.base


@dataclass(frozen=True)
class LoadProfile:
    name: str
    requests: tuple[RequestKind, ...]
    rate_per_min: float
    """Base arrival rate, jobs per minute; the shape scales it."""
    slo_s: float
    """End-to-end latency a completed job must meet to count towards goodput."""
    shape: Shape = field(default_factory=Shape)
    shapes: dict[str, Shape] = field(default_factory=dict)
    """Every shape the file defines, by kind (`--shape` picks one)."""
    user_interval_s: float = 5.0
    """Mean time between two submissions of one simulated user; users = rate x interval / 60."""
    arrivals: str = "poisson"
    prompts: tuple[str, ...] = ("a red fox running through fresh snow at dawn, cinematic",)
    poll: Poll = field(default_factory=Poll)
    job_timeout_s: float = 600.0
    """A client gives up on a job (and reports it as timed out) after this long."""
    drain_s: float = 300.0
    """After the last arrival, how long to wait for the jobs still running."""

    def with_shape(self, kind: str) -> "LoadProfile":
        if kind not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {kind!r}")
        return replace(self, shape=self.shapes.get(kind, Shape(kind=kind)))

    def rate_at(self, elapsed_s: float, duration_s: float, rate_per_min: float | None = None) -> float:
        """Jobs per minute `elapsed_s` into an arrival window of `duration_s`."""
        return (rate_per_min or self.rate_per_min) * self.shape.multiplier(elapsed_s, duration_s)

    def users_for(self, rate_per_min: float) -> int:
        return math.ceil(rate_per_min * self.user_interval_s / 60.0 - 1e-9) if rate_per_min > 0 else 0

    def pick(self, rng: random.Random) -> RequestKind:
        return rng.choices(self.requests, weights=[r.weight for r in self.requests])[0]


def load_profile(path: str | Path) -> LoadProfile:
    """Parse and check a profile file; errors name the file, the key and the rule."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read the load profile: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a load profile is a mapping, got {type(data).__name__}")
    return parse_profile(data, source=str(path))


def parse_profile(data: dict[str, Any], *, source: str = "profile") -> LoadProfile:
    known = {"name", "requests", "rate_per_min", "slo_s", "shape", "shapes", "user_interval_s", "arrivals",
             "prompts", "poll", "job_timeout_s", "drain_s"}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; valid: {', '.join(sorted(known))}")

    def positive(key: str, default: float | None = None) -> float:
        value = data.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{source}: {key} must be a positive number, got {value!r}")
        return float(value)

    entries = data.get("requests")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: requests must be a non-empty list of {{name, body, weight, image}}")
    requests = tuple(_request_kind(entry, f"{source}: requests[{i}]") for i, entry in enumerate(entries))
    if len({r.name for r in requests}) != len(requests):
        raise ValueError(f"{source}: request names must be unique, got {[r.name for r in requests]}")

    shapes = {kind: _shape(kind, spec, source) for kind, spec in (data.get("shapes") or {}).items()}
    chosen = data.get("shape", "soak")
    if chosen not in SHAPES:
        raise ValueError(f"{source}: shape must be one of {', '.join(SHAPES)}, got {chosen!r}")
    arrivals = data.get("arrivals", "poisson")
    if arrivals not in ARRIVALS:
        raise ValueError(f"{source}: arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")
    prompts = data.get("prompts", list(LoadProfile.prompts))
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{source}: prompts must be a non-empty list of non-empty strings")
    poll = data.get("poll") or {}
    if not isinstance(poll, dict) or set(poll) - {"initial_s", "factor", "max_s"}:
        raise ValueError(f"{source}: poll takes initial_s, factor and max_s")
    return LoadProfile(
        name=str(data.get("name", Path(source).stem)),
        requests=requests,
        rate_per_min=positive("rate_per_min"),
        slo_s=positive("slo_s"),
        shape=shapes.get(chosen, Shape(kind=chosen)),
        shapes=shapes,
        user_interval_s=positive("user_interval_s", 5.0),
        arrivals=arrivals,
        prompts=tuple(prompts),
        poll=Poll(**{k: float(v) for k, v in poll.items()}),
        job_timeout_s=positive("job_timeout_s", 600.0),
        drain_s=positive("drain_s", 300.0),
    )


def _request_kind(entry: Any, where: str) -> RequestKind:
    if not isinstance(entry, dict) or set(entry) - {"name", "body", "weight", "image"} or "name" not in entry:
        raise ValueError(f"{where}: must be a mapping with name, body and optional weight, image")
    body = entry.get("body", {})
    if not isinstance(body, dict) or "prompt" in body or "input_reference" in body:
        raise ValueError(f"{where}: body must be a mapping of API fields (the prompt and image are added per request)")
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    image = entry.get("image")
    if image is not None:
        if not isinstance(image, dict) or set(image) != {"width", "height"} or not all(
            isinstance(image[k], int) and image[k] > 0 for k in image
        ):
            raise ValueError(f"{where}: image must be {{width: int, height: int}}, got {image!r}")
        image = (image["width"], image["height"])
    return RequestKind(name=str(entry["name"]), body=dict(body), weight=float(weight), image=image)


def _shape(kind: str, spec: Any, source: str) -> Shape:
    if kind not in SHAPES:
        raise ValueError(f"{source}: shapes.{kind}: shape must be one of {', '.join(SHAPES)}")
    spec = dict(spec or {})
    allowed = {"soak": set(), "step": {"levels"}, "burst": {"base", "peak", "period_s", "burst_s"}}[kind]
    if set(spec) - allowed:
        raise ValueError(f"{source}: shapes.{kind} takes {sorted(allowed) or 'no settings'}, got {sorted(spec)}")
    if "levels" in spec:
        levels = spec["levels"]
        if not isinstance(levels, list) or not levels or not all(isinstance(v, (int, float)) and v >= 0 for v in levels):
            raise ValueError(f"{source}: shapes.step.levels must be a non-empty list of rates (multiples of rate_per_min)")
        spec["levels"] = tuple(float(v) for v in levels)
    shape = Shape(kind=kind, **spec)
    if kind == "burst" and not 0 < shape.burst_s <= shape.period_s:
        raise ValueError(f"{source}: shapes.burst needs 0 < burst_s <= period_s, got {shape.burst_s}, {shape.period_s}")
    return shape
