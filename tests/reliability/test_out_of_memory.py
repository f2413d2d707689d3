"""Device memory: the Denoiser estimate against the H200 measurements, requests refused up front when
they cannot fit, and a real out-of-memory error inside a stage (torch.OutOfMemoryError raised where
the allocation would fail: CPUs have no allocator limit) failing only its job, with advice, on a
replica that freed the memory and goes on serving."""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
import torch

from turbo_serve.pipeline.memory import GIB, estimate_denoise_memory

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"size": "64x64", "num_frames": 1, "num_steps": 1, "attention_type": "original"}
LARGE = {"size": "128x128", "num_frames": 5, "num_steps": 1, "attention_type": "original"}


def wait_finished(client, video_id, timeout_s=120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (video := client.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, video
        time.sleep(0.05)
    return video


@pytest.mark.parametrize("name, preset", [("1.3b", "wan2.1-t2v-1.3b"), ("14b", "wan2.1-t2v-14b")])
def test_estimate_matches_the_h200_dit_measurements(name, preset):
    measured = json.loads((ROOT / "bench" / "results" / "dit_step_h200.json").read_text())["models"][name]
    _, frames, latent_h, latent_w = measured["latent"]
    estimate = estimate_denoise_memory(preset, latent_w * 8, latent_h * 8, 4 * (frames - 1) + 1)
    assert estimate.tokens == measured["tokens"]
    ours = measured["variants"]["ours"]
    assert estimate.weights_bytes == pytest.approx(ours["params_b"] * 1e9 * 2, rel=0.01)  # bf16
    assert estimate.total_bytes / GIB == pytest.approx(ours["peak_gib"], rel=0.05)


def test_estimate_scales_with_tokens_guidance_and_quantisation():
    base = estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 81)
    assert estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 161).activation_bytes == pytest.approx(
        2 * base.activation_bytes, rel=0.05)  # fmt: skip
    assert estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 81, guided=True).activation_bytes == 2 * base.activation_bytes
    quantised = estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 81, quant_linear=True)
    assert 0.45 < quantised.weights_bytes / base.weights_bytes < 0.55
    assert estimate_denoise_memory("wan2.2-i2v-a14b", 1280, 720, 81).weights_bytes == pytest.approx(2 * base.weights_bytes, rel=0.01)


def test_estimate_per_rank_of_a_parallel_denoiser():
    """Each rank keeps the whole DiT; sequence parallelism splits the tokens, CFG parallelism the batch."""
    base = estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 81, guided=True)
    split = estimate_denoise_memory("wan2.1-t2v-14b", 1280, 720, 81, guided=True, sequence_parallel=4, cfg_parallel=True)
    assert split.weights_bytes == base.weights_bytes
    assert split.activation_bytes == pytest.approx(base.activation_bytes / 8, rel=0.01)


def test_requests_that_cannot_fit_are_refused_up_front(make_api):
    small = estimate_denoise_memory("tiny-t2v", 64, 64, 1, dtype="float32").total_bytes
    large = estimate_denoise_memory("tiny-t2v", 512, 512, 81, dtype="float32").total_bytes
    budget_gib = (small + large) / 2 / GIB
    with make_api(run_jobs=False, denoiser_memory_gib=budget_gib) as (client, context):
        refused = client.post("/v1/videos", json={"prompt": "too big", "size": "512x512", "num_frames": 81})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["param"] == "size" and "GiB" in error["message"] and f"{budget_gib:.1f} GiB on this server" in error["message"]
        assert "lower the resolution (size) or num_frames" in error["message"] and "quant_linear" in error["message"]
        guided = client.post("/v1/videos", json={"prompt": "too big", "size": "512x512", "num_frames": 81,
                                                 "sampler": "euler", "guidance_scale": 5, "num_steps": 4})  # fmt: skip
        assert "classifier-free guidance" in guided.json()["error"]["message"]
        assert client.post("/v1/videos", json={"prompt": "fits", **SMALL}).status_code == 200
        assert context.store.counts()["queued"] == 1
        card = client.get("/v1/models").json()["data"][0]
        assert card["limits"]["denoiser_memory_gib"] == pytest.approx(budget_gib)


class OutOfMemoryAbove:
    """Wraps a module's forward: above `max_elements` input elements it allocates a block (as a real
    forward would before the allocation that fails) and raises torch.OutOfMemoryError."""

    def __init__(self, monkeypatch, cls, method: str, max_elements: int):
        self.allocations: list[weakref.ref] = []
        self.calls = 0
        original = getattr(cls, method)

        def guarded(module, x, *args, **kwargs):
            self.calls += 1
            if x.numel() > max_elements:
                block = torch.empty(16 * 2**20, dtype=torch.uint8)
                self.allocations.append(weakref.ref(block))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 139.80 GiB of which 1.2 GiB is free.")  # fmt: skip
            return original(module, x, *args, **kwargs)

        monkeypatch.setattr(cls, method, guarded)

    def all_freed(self) -> bool:
        gc.collect()
        return bool(self.allocations) and all(ref() is None for ref in self.allocations)


@pytest.mark.parametrize("stage", ["denoise", "decode"])
def test_out_of_memory_in_a_stage_fails_the_job_with_advice_and_serving_goes_on(make_api, monkeypatch, stage):
    from turbo_serve.models.wan_dit import WanDiT
    from turbo_serve.models.wan_vae import WanVAE

    small_latent = 16 * 1 * 8 * 8
    target = (WanDiT, "forward") if stage == "denoise" else (WanVAE, "iter_decode")
    oom = OutOfMemoryAbove(monkeypatch, *target, max_elements=small_latent)
    with make_api() as (client, _):
        failed = wait_finished(client, client.post("/v1/videos", json={"prompt": "big", **LARGE}).json()["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory", failed
        message = failed["error"]["message"]
        assert message.startswith(stage) and "out of device memory" in message and "Tried to allocate 2.00 GiB" in message
        assert "Traceback" not in message
        if stage == "denoise":
            assert "lower the resolution (size) or num_frames" in message and "quant_linear" in message
            assert "128x128 with 5 frames" in message and "tokens" in message
        else:
            assert "decoding 128x128 frames: lower the resolution" in message
        assert oom.all_freed()  # the failed call's memory is no longer referenced
        done = wait_finished(client, client.post("/v1/videos", json={"prompt": "small", **SMALL}).json()["id"])
        assert done["status"] == "completed", done
    assert oom.calls >= 2


def test_sync_request_out_of_memory_is_422(make_api, monkeypatch):
    from turbo_serve.models.wan_dit import WanDiT

    OutOfMemoryAbove(monkeypatch, WanDiT, "forward", max_elements=16 * 8 * 8)
    with make_api() as (client, _):
        response = client.post("/v1/videos/sync", json={"prompt": "big", **LARGE})
        assert response.status_code == 422 and "out of device memory" in response.json()["error"]["message"]


def test_memory_is_released_before_the_error_is_raised(monkeypatch):
    """By the time OutOfMemory is built, the failed call's tensors are unreachable, the caller's
    release hook ran and, on CUDA, the allocator's cache went back to the driver."""
    from turbo_serve.pipeline import stages
    from turbo_serve.pipeline.memory import OutOfMemory

    emptied, released, seen = [], [], {}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def failing_call():
        activations = torch.empty(8 * 2**20, dtype=torch.uint8)
        seen["ref"] = weakref.ref(activations)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nsecond line")

    def describe(detail):
        gc.collect()
        seen["alive_at_raise"] = seen["ref"]() is not None
        return f"lower it [{detail}]"

    with pytest.raises(OutOfMemory, match=r"^lower it \[CUDA out of memory. Tried to allocate 1.00 GiB\]$") as info:
        stages.raise_out_of_memory_clean(failing_call, torch.device("cuda"), describe, release=lambda: released.append(True))
    assert seen["alive_at_raise"] is False and released == [True] and emptied == [True]
    assert info.value.__context__ is None  # nothing chains back to the failed frames
    with pytest.raises(ValueError):  # other errors pass through untouched
        stages.raise_out_of_memory_clean(lambda: int("x"), torch.device("cpu"), describe)
