"""The autotuner's decision rules: fastest admitted candidate, the accuracy gate, the record.

The interpreter has no GPU timer, so these tests switch tuning on and give each candidate a known
time through triton.testing.do_bench; what is checked is pick_config's own logic.
"""

import pytest
import torch
import triton

from turbo_kernels import autotune


@pytest.fixture
def timed(monkeypatch):
    """Tuning on; do_bench returns the time the candidate's run() reports."""
    monkeypatch.setattr(autotune, "autotune_enabled", lambda: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn()["ms"])


def _run(times: dict, outputs: dict | None = None):
    def run(cfg):
        return {"ms": times[cfg], "out": (outputs or {}).get(cfg, torch.ones(4))}
    return run


def test_fastest_candidate_wins_and_is_cached(timed):
    key = ("unit-fastest", 1)
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert autotune.pick_config(key, ["a", "b", "c"], _run(times)) == "b"
    record = autotune.tuning_log()[key]
    assert record["chosen"] == "b" and record["timings_ms"] == {"a": 3.0, "b": 1.0, "c": 2.0}
    times["c"] = 0.1  # tuned once per process: a later call does not re-time
    assert autotune.pick_config(key, ["a", "b", "c"], _run(times)) == "b"
    assert autotune.last_config("unit-fastest") == "b"


def test_gate_rejects_a_faster_candidate_that_changes_the_output(timed):
    key = ("unit-gate", 1)
    ref = torch.ones(4)
    outputs = {"exact": ref, "close": ref + 1e-4, "off": torch.tensor([1.0, -1.0, 1.0, -1.0])}
    times = {"exact": 2.0, "close": 1.5, "off": 1.0}

    def accept(cfg, out, reference):
        cos = float(torch.nn.functional.cosine_similarity(out["out"], reference["out"], dim=0))
        return None if cos >= 0.999 else f"cosine {cos:.3f}"

    assert autotune.pick_config(key, list(times), _run(times, outputs), accept=accept) == "close"
    record = autotune.tuning_log()[key]
    assert list(record["rejected"]) == ["off"] and record["rejected"]["off"].startswith("cosine")
    assert "off" not in record["timings_ms"]


def test_failing_candidates_are_skipped_and_recorded(timed):
    def run(cfg):
        if cfg == "broken":
            raise RuntimeError("out of resources: shared memory")
        return {"ms": 1.0}

    assert autotune.pick_config(("unit-broken", 1), ["broken", "ok"], run) == "ok"
    assert "out of resources" in autotune.tuning_log()[("unit-broken", 1)]["rejected"]["broken"]
    with pytest.raises(RuntimeError, match="no candidate"):
        autotune.pick_config(("unit-none", 1), ["broken"] * 2, run)


def test_interpreter_takes_the_first_candidate_untimed():
    key = ("unit-interpreter", 1)
    assert autotune.pick_config(key, ["first", "second"], lambda cfg: 1 / 0) == "first"
    assert autotune.tuning_log()[key]["reason"].startswith("autotune off")


def test_close_to_reference_gates_per_config():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=gen)
    slightly = ref + 1e-3 * torch.randn(1000, generator=gen)  # cosine ~ 0.9999995
    noisy = ref + 0.03 * torch.randn(1000, generator=gen)  # cosine ~ 0.9995
    accept = autotune.close_to_reference(lambda cfg: 0.999 if cfg == "fp8" else autotune.EXACT_MIN_COSINE,
                                         lambda out: out[0])
    assert accept("exact", (slightly, None), (ref, None)) is None
    assert "cosine" in accept("exact", (noisy, None), (ref, None))
    assert accept("fp8", (noisy, None), (ref, None)) is None
    assert "cosine" in accept("fp8", (-ref, None), (ref, None))
