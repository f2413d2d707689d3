"""Ulysses sequence parallelism and CFG parallelism on gloo processes against the single-process model."""

from __future__ import annotations

import pytest
import torch

from parallel_support import (
    DIT_CASES,
    dit_outputs,
    guided_spec,
    parallel_rank,
    rcm_spec,
    stage_config,
    stage_inputs,
    tiny_dit,
)
from turbo_serve.parallel.distributed import ParallelConfig, check_sequence_parallel, head_divisors
from turbo_serve.parallel.local import run_ranks
from turbo_serve.pipeline.stages import DenoiseStage

LAYOUTS = {
    "sp2": ParallelConfig(sequence_parallel=2),
    "cfg2": ParallelConfig(cfg_parallel=True),
    "sp2-cfg2": ParallelConfig(sequence_parallel=2, cfg_parallel=True),  # both groups at once: 4 ranks
}
STOP_AFTER = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn per layout, shared by every test that reads it (process start-up dominates)."""
    done: dict[str, list[dict]] = {}

    def ranks_of(name: str) -> list[dict]:
        if name not in done:
            parallel, cache = LAYOUTS[name], str(tmp_path_factory.mktemp("cache"))
            done[name] = run_ranks(parallel_rank, parallel.world_size, parallel, cache, STOP_AFTER, timeout_s=240)
        return done[name]

    return ranks_of


@pytest.fixture(params=list(LAYOUTS))
def layout(request, runs):
    return runs(request.param)


@pytest.fixture
def sequence_ranks(runs):
    return runs("sp2")


@pytest.fixture(scope="module")
def reference_dit_outputs():
    return dit_outputs(tiny_dit())


@pytest.fixture(scope="module")
def reference_stage(tmp_path_factory):
    return DenoiseStage(stage_config(str(tmp_path_factory.mktemp("cache"))))


def test_parallel_denoiser_matches_single_process(layout, reference_stage):
    ranks = layout
    text, negative = stage_inputs()
    expected_rcm = reference_stage(rcm_spec(), text)
    expected_guided = reference_stage(guided_spec(), text, negative_text=negative)
    # Same float32 math in another order at most: equal to ~1e-7 (attending the one padded key
    # instead of cutting it off moves these latents by ~1e-5).
    for rank in ranks:
        torch.testing.assert_close(rank["rcm"], expected_rcm, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rank["guided"], expected_guided, atol=1e-6, rtol=1e-6)


def test_every_rank_stops_at_the_leaders_step(layout):
    ranks = layout
    assert [rank["cancelled"] for rank in ranks] == [f"cancelled before step {STOP_AFTER + 1} of 4"] * len(ranks)
    assert ranks[0]["steps"] == [1, 2, 3, 4, *range(1, STOP_AFTER + 1)]
    assert all(rank["steps"] == [] for rank in ranks[1:])  # progress is the leader's to report


@pytest.mark.parametrize("case", range(len(DIT_CASES)), ids=[f"{b}-{g}-B{n}" for b, g, n in DIT_CASES])
def test_sequence_parallel_dit_matches_single_process(sequence_ranks, reference_dit_outputs, case):
    for rank in sequence_ranks:
        # ~1e-7 here; attending the padded key would be off by ~1e-3.
        torch.testing.assert_close(rank["dit"][case], reference_dit_outputs[case], atol=1e-5, rtol=1e-5)


def test_each_layer_exchanges_qkv_once_and_the_output_once(sequence_ranks, reference_dit_outputs):
    # Two all-to-alls per layer (q/k/v stacked in, the output back), two layers, every case.
    assert [rank["all_to_alls"] for rank in sequence_ranks] == [2 * 2 * len(DIT_CASES)] * len(sequence_ranks)
    for rank in sequence_ranks:  # hooks removed: the single-process model again, bit for bit
        for got, expected in zip(rank["dit_after_remove"], reference_dit_outputs):
            torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_rank_layout_puts_cfg_branches_across_sequence_groups():
    both = ParallelConfig(sequence_parallel=4, cfg_parallel=True)
    assert both.world_size == 8
    assert [both.sequence_ranks(c) for c in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [both.cfg_ranks(i) for i in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    with pytest.raises(ValueError, match="sequence_parallel must be >= 1"):
        ParallelConfig(sequence_parallel=0)


def test_head_count_errors_list_the_valid_degrees():
    assert head_divisors(12) == [1, 2, 3, 4, 6, 12]
    assert head_divisors(40) == [1, 2, 4, 5, 8, 10, 20, 40]
    with pytest.raises(ValueError, match=r"sequence_parallel=5 must divide the model's num_heads=12.*valid: 1, 2, 3, 4, 6, 12"):
        check_sequence_parallel(5, 12)
    check_sequence_parallel(8, 40)
