"""Wan VAE decode/encode and UMT5-XXL encode timings: ours against diffusers' AutoencoderKLWan.

GPU run (the numbers in bench/results/vae_decode_h200.json), from the repository root:
    python bench/vae_decode.py
CPU smoke run of every code path with the tiny config:
    python bench/vae_decode.py --smoke

Every variant runs in its own try/except (a failure is recorded and the run goes on); variants that
would not fit the remaining --budget-s are skipped and recorded as such. Timing: CUDA-synchronised
wall time per call, warm-up calls excluded; peak memory is torch.cuda.max_memory_allocated during
the timed calls. Weights are random (seeded); ours loads the diffusers model's weights, so the two
decode the same latents with the same weights and the report includes their difference.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import turbo_serve  # noqa: F401
except ImportError:  # a bare checkout (no pip install): import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turbo_serve.models.configs import UMT5Config, WanVAEConfig, get_preset
from turbo_serve.models.loading_vae_text import load_text_encoder, load_vae
from turbo_serve.models.tokenizer import ensure_tiny_tokenizer

DECODE_TARGET_S = 1.2
"""The later issue's goal for 480p 81-frame bf16 decode on an H200 (diffusers: 1.82 s)."""
PROMPT = (
    "A majestic eagle glides smoothly over a misty mountain valley at golden hour sunlight, the camera "
    "follows in a smooth tracking shot while the morning fog lifts over quiet rooftops of a distant "
    "village, pine trees sway in a gentle breeze, rays of light pierce the clouds, cinematic lighting, "
    "highly detailed feathers, shallow depth of field, vivid saturated colors, epic orchestral mood, "
    "photorealistic, four k resolution, slow motion, wide angle lens, dramatic shadows on the cliffs."
)


class Bench:
    def __init__(self, device: torch.device, budget_s: float, warmup: int, iters: int) -> None:
        self.device = device
        self.deadline = time.monotonic() + budget_s
        self.warmup, self.iters = warmup, iters
        self.results: list[dict] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(
        self,
        name: str,
        make: Callable[[], Callable[[], object]],
        *,
        cost_s: float = 0.0,
        warmup: int | None = None,
        iters: int | None = None,
        **info,
    ) -> dict:
        """Build the call with make() (not timed), warm it up, time it. cost_s: rough worst-case seconds
        the variant needs; it is skipped when the budget has less left."""
        record = {"name": name, **info}
        left = self.deadline - time.monotonic()
        if left < cost_s:
            record["skipped"] = f"time budget: {left:.0f} s left, needs about {cost_s:.0f} s"
        else:
            try:
                warmup = self.warmup if warmup is None else warmup
                record.update(self._measure(make, warmup, self.iters if iters is None else iters))
            except Exception as error:  # noqa: BLE001 - record and go on to the next variant
                record["error"] = f"{type(error).__name__}: {error}"[:500]
        self.results.append(record)
        print(_row(record), flush=True)
        _free()
        return record

    def _measure(self, make: Callable[[], Callable[[], object]], warmup: int, iters: int) -> dict:
        start = time.monotonic()
        call = make()
        for _ in range(warmup):
            call()
        self.sync()
        warmup_s = time.monotonic() - start
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        times = []
        out = None
        for _ in range(iters):
            out = None  # free the previous output first, so the peak is one call's
            self.sync()
            begin = time.perf_counter()
            out = call()
            self.sync()
            times.append(time.perf_counter() - begin)
        measured = {"s": sum(times) / len(times), "s_min": min(times), "setup_and_warmup_s": round(warmup_s, 2)}
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            measured.update(peak_gib=round(peak / 2**30, 3), peak_above_weights_gib=round((peak - base) / 2**30, 3))
        if isinstance(out, torch.Tensor):
            measured["output_shape"] = list(out.shape)
        return measured


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(record: dict) -> str:
    if "error" in record:
        status = f"ERROR {record['error'][:120]}"
    elif "skipped" in record:
        status = f"skipped ({record['skipped']})"
    elif "max_abs_diff" in record:
        status = f"max |diff| {record['max_abs_diff']:.4f}, mean {record['mean_abs_diff']:.5f}"
    else:
        memory = f"  peak {record['peak_gib']:.2f} GiB" if "peak_gib" in record else ""
        status = f"{record['s'] * 1000:9.1f} ms (min {record['s_min'] * 1000:.1f}){memory}"
    return f"{record['name']:<48} {status}"


def _set_cudnn_benchmark(enabled: bool) -> None:
    torch.backends.cudnn.benchmark = enabled


class DecodeCase:
    """One latent shape: a random diffusers AutoencoderKLWan and ours loaded with its weights."""

    def __init__(self, bench: Bench, vae_config: WanVAEConfig, latent_shape: tuple, label: str, dtype) -> None:
        from diffusers import AutoencoderKLWan

        self.bench, self.config, self.label, self.dtype = bench, vae_config, label, dtype
        device = bench.device
        torch.manual_seed(0)
        self.reference = AutoencoderKLWan(base_dim=vae_config.base_dim, z_dim=vae_config.z_dim).to(device, dtype).eval()
        self.z = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1)).to(device)
        shape = (1, vae_config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae_config.latents_mean, device=device).view(shape)
        std = torch.tensor(vae_config.latents_std, device=device).view(shape)
        self.z_raw = (self.z * std + mean).to(dtype)  # diffusers' decode takes un-normalised latents
        frames = 1 + (latent_shape[2] - 1) * vae_config.temporal_stride
        self.info = {"latent": list(latent_shape), "frames": frames, "dtype": str(dtype).removeprefix("torch.")}

    def diffusers(self):
        def call():
            with torch.inference_mode():
                return self.reference.decode(self.z_raw).sample

        return call

    def ours(self, channels_last: bool, compiled: bool = False):
        def make():
            vae = load_vae(self.reference.state_dict(), self.config, device=self.bench.device, dtype=self.dtype)
            if channels_last:
                vae.to_channels_last()
            if compiled:
                vae.decoder.compile(dynamic=False)
            return lambda: vae.decode(self.z)

        return make

    def run(self, variant: str, make, cost_s: float) -> dict:
        return self.bench.run(f"{self.label} {variant}", make, cost_s=cost_s, **self.info)


def decode_variants(case: DecodeCase, full: bool, per_call_s: float) -> None:
    """Ours (plain, channels_last, cudnn.benchmark) against diffusers' defaults on one latent shape."""
    bench = case.bench
    cost = (bench.warmup + bench.iters) * per_call_s
    gpu_full = full and bench.device.type == "cuda"  # cudnn.benchmark only changes cuDNN's algorithm choice
    _set_cudnn_benchmark(False)
    if full:
        case.run("diffusers AutoencoderKLWan (defaults)", case.diffusers, cost)
    case.run("ours", case.ours(False), cost)
    if gpu_full:
        case.run("ours channels_last", case.ours(True), cost)
    _set_cudnn_benchmark(True)
    if gpu_full:
        case.run("diffusers + cudnn.benchmark", case.diffusers, cost)
        case.run("ours + cudnn.benchmark", case.ours(False), cost)
    case.run("ours channels_last + cudnn.benchmark", case.ours(True), cost)
    if full:
        bench.results.append(_difference(case))
    _set_cudnn_benchmark(False)


def compiled_decode_variant(case: DecodeCase) -> None:
    """torch.compile of the decoder (3 graphs: first chunk, second chunk, steady state); last because
    its compile time is the least predictable part of the run."""
    _set_cudnn_benchmark(True)
    case.run("ours channels_last + cudnn.benchmark + torch.compile", case.ours(True, compiled=True), 240)
    _set_cudnn_benchmark(False)


def _difference(case: DecodeCase) -> dict:
    """How far our decode is from diffusers' on the same weights and latents (bf16 rounding only)."""
    record = {"name": f"{case.label} ours vs diffusers, same weights"}
    try:
        theirs = case.diffusers()().float()
        difference = (case.ours(True)()() - theirs).abs()
        record.update(max_abs_diff=difference.max().item(), mean_abs_diff=difference.mean().item())
    except Exception as error:  # noqa: BLE001
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    print(_row(record), flush=True)
    _free()
    return record


def encode_condition_variants(
    bench: Bench, vae_config: WanVAEConfig, size: tuple[int, int], frames: int, dtype: torch.dtype
) -> None:
    device = bench.device
    image = torch.rand((3, *size), generator=torch.Generator().manual_seed(2)).to(device) * 2 - 1
    info = {"image": [3, *size], "frames": frames, "dtype": str(dtype).removeprefix("torch.")}

    def ours(channels_last: bool):
        def make():
            vae = load_vae(None, vae_config, device=device, dtype=dtype)
            if channels_last:
                vae.to_channels_last()
            return lambda: vae.encode_condition(image, frames)

        return make

    calls = bench.warmup + bench.iters
    label = f"i2v encode_condition {size[0]}x{size[1]} + {frames - 1} gray"
    _set_cudnn_benchmark(False)
    bench.run(f"{label} ours", ours(False), cost_s=calls * 8, **info)
    _set_cudnn_benchmark(True)
    bench.run(f"{label} ours channels_last + cudnn.benchmark", ours(True), cost_s=calls * 8, **info)
    _set_cudnn_benchmark(False)


def umt5_variants(bench: Bench, config: UMT5Config, tokenizer_dir: Path, dtype) -> None:
    """Random weights, built directly on the device (UMT5-XXL is 11.4 GB in bf16)."""
    device = bench.device
    holder = {}

    def encoder():
        if "encoder" not in holder:
            holder["encoder"] = load_text_encoder(None, config, tokenizer=tokenizer_dir, device=device, dtype=dtype)
        return holder["encoder"]

    def ours(batch: int):
        def make():
            prompts = [PROMPT] * batch
            return lambda: encoder().encode(prompts)

        return make

    def wan_style_512(batch: int):
        """What Wan and diffusers run: every prompt padded to 512 tokens through the encoder."""

        def make():
            enc = encoder()
            tokens = enc.tokenizer([PROMPT] * batch, padding="max_length", max_length=512, return_tensors="pt")
            ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)

            def call():
                with torch.inference_mode():
                    return enc.model(input_ids=ids, attention_mask=mask).last_hidden_state

            return call

        return make

    calls = bench.warmup + bench.iters
    built = bench.run("umt5 build (random weights on the device)", lambda: encoder, cost_s=60, warmup=0, iters=1)
    if "s" not in built:
        return
    built["params_billion"] = round(sum(p.numel() for p in encoder().model.parameters()) / 1e9, 3)
    tokens = int(encoder().tokenize([PROMPT])[1].sum())
    for batch in (1, 4):
        info = {"prompts": batch, "prompt_tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
        bench.run(f"umt5 encode {batch} prompt(s), ours (longest-prompt padding)", ours(batch), cost_s=calls, **info)
        bench.run(f"umt5 encode {batch} prompt(s), Wan-style 512 tokens", wan_style_512(batch), cost_s=calls, **info)
    holder.clear()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: exercises every path in seconds")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/vae_decode_h200.json)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new variants after this")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--skip-umt5", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        vae_config, text_config = get_preset("tiny-t2v").vae, get_preset("tiny-t2v").text_encoder
        decode_shapes = [("smoke decode", (1, 16, 2, 4, 4), True, 1.0)]
        i2v = ((32, 48), 5)
        out = args.out or Path(tempfile.gettempdir()) / "vae_decode_smoke.json"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --smoke for the CPU run")
        device, dtype = torch.device("cuda"), torch.bfloat16
        vae_config, text_config = WanVAEConfig(), UMT5Config()
        # (label, latent shape, all variants?, rough seconds per call for the budget check)
        decode_shapes = [
            ("480p decode", (1, 16, 21, 60, 104), True, 6.0),
            ("720p decode", (1, 16, 21, 90, 160), False, 12.0),
        ]
        i2v = ((720, 1280), 81)
        out = args.out or Path(__file__).parent / "results" / "vae_decode_h200.json"

    bench = Bench(device, args.budget_s, args.warmup, args.iters)
    started = time.monotonic()
    for label, shape, full, per_call_s in decode_shapes:
        _guarded(bench, f"{label} setup", _decode_group, bench, vae_config, shape, label, dtype, full, per_call_s)
    _guarded(bench, "i2v setup", encode_condition_variants, bench, vae_config, *i2v, dtype)
    if not args.skip_umt5:
        with tempfile.TemporaryDirectory() as cache:
            tokenizer_dir = ensure_tiny_tokenizer(cache, text_config.vocab_size)
            _guarded(bench, "umt5 setup", umt5_variants, bench, text_config, tokenizer_dir, dtype)
    if device.type == "cuda" and not args.skip_compile:
        label, shape, _, _ = decode_shapes[0]
        _guarded(bench, "compile setup", _compile_group, bench, vae_config, shape, label, dtype)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "versions": _versions(),
        "smoke": args.smoke,
        "total_s": round(time.monotonic() - started, 1),
        "decode_target_s": DECODE_TARGET_S,
        "results": bench.results,
        "summary": _summary(bench.results),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'variant':<48} time")
    for record in bench.results:
        print(_row(record))
    for line in report["summary"]:
        print(line)
    print(f"wrote {out}")
    return report


def _decode_group(bench: Bench, vae_config, shape, label, dtype, full: bool, per_call_s: float) -> None:
    decode_variants(DecodeCase(bench, vae_config, shape, label, dtype), full, per_call_s)


def _compile_group(bench: Bench, vae_config, shape, label, dtype) -> None:
    compiled_decode_variant(DecodeCase(bench, vae_config, shape, label, dtype))


def _guarded(bench: Bench, name: str, run: Callable[..., None], *args) -> None:
    """Run a group of variants; an error outside them (e.g. diffusers missing) is recorded, not raised."""
    try:
        run(*args)
    except Exception as error:  # noqa: BLE001
        bench.results.append({"name": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(_row(bench.results[-1]), flush=True)
    _free()


def _versions() -> dict:
    versions = {}
    for name in ("diffusers", "transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _summary(results: list[dict]) -> list[str]:
    timed = {r["name"]: r["s"] for r in results if "s" in r}
    lines = []
    for label in ("480p decode", "720p decode", "smoke decode"):
        ours = {k: v for k, v in timed.items() if k.startswith(f"{label} ours")}
        if not ours:
            continue
        name, best = min(ours.items(), key=lambda item: item[1])
        line = f"{label}: best ours {best:.3f} s ({name.removeprefix(label).strip()})"
        reference = timed.get(f"{label} diffusers AutoencoderKLWan (defaults)")
        if reference:
            line += f", diffusers {reference:.3f} s, speed-up {reference / best:.2f}x"
        if label == "480p decode":
            line += f", target {DECODE_TARGET_S} s {'met' if best <= DECODE_TARGET_S else 'NOT met'}"
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
