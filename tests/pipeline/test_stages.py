import re

import av
import pytest
import torch
from PIL import Image

from turbo_serve.cli import main as cli_main
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import DenoiseStage, GenerationCancelled, Pipeline, PipelineConfig

SMALL = dict(width=128, height=96, num_frames=5, attention_type="original")


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return Pipeline(PipelineConfig(model="tiny-t2v", cache_dir=str(tmp_path_factory.mktemp("cache"))))


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    return Pipeline(PipelineConfig(model="tiny-i2v", cache_dir=str(tmp_path_factory.mktemp("cache"))))


def _frame_count(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_t2v_writes_an_mp4_with_every_frame_and_stage_timings(t2v, tmp_path):
    steps = []
    result = t2v.generate(GenerationSpec("a fox", model="tiny-t2v", **SMALL), None, tmp_path, on_step=lambda d, t: steps.append(d))
    assert re.fullmatch(r"t2v_0_tiny-t2v_\d{8}-\d{6}\.mp4", result.path.name)
    assert _frame_count(result.path) == 5
    assert steps == [1, 2, 3, 4]
    assert set(result.timings) == {"text_encode", "denoise", "decode"}


def test_seed_reproduces_latents_bit_for_bit(t2v):
    (text,) = t2v.text(["a fox"])
    spec = GenerationSpec("a fox", model="tiny-t2v", seed=11, **SMALL)
    first, again = t2v.denoise(spec, text), t2v.denoise(spec, text)
    other = t2v.denoise(GenerationSpec("a fox", model="tiny-t2v", seed=12, **SMALL), text)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (16, 2, 12, 16)


def test_prompts_change_the_result(t2v):
    a, b = t2v.text(["a fox", "a lighthouse at night"])
    spec = GenerationSpec("x", model="tiny-t2v", **SMALL)
    assert not torch.equal(t2v.denoise(spec, a), t2v.denoise(spec, b))


def test_teacher_sampler_runs_with_guidance(t2v, tmp_path):
    spec = GenerationSpec("a fox", model="tiny-t2v", sampler="unipc", num_steps=3, negative_prompt="blurry", **SMALL)
    result = t2v.generate(spec, None, tmp_path)
    assert _frame_count(result.path) == 5


def test_i2v_uses_both_experts_around_the_boundary(i2v, tmp_path):
    calls = []
    for index, expert in enumerate(i2v.denoise.experts):
        expert.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    image = Image.new("RGB", (160, 120), (200, 40, 40))
    result = i2v.generate(GenerationSpec("a red card", model="tiny-i2v", **SMALL), image, tmp_path)
    assert result.path.name.startswith("i2v_")
    assert calls == [0, 0, 1, 1]  # s = 0.995, 0.934 >= 0.9 -> high-noise; 0.853, 0.609 -> low-noise
    assert _frame_count(result.path) == 5


def test_i2v_requires_an_image_and_t2v_refuses_one(t2v, i2v, tmp_path):
    with pytest.raises(ValueError, match="image is required"):
        i2v.generate(GenerationSpec("x", model="tiny-i2v", **SMALL), None, tmp_path)
    with pytest.raises(ValueError, match="not accepted"):
        t2v.generate(GenerationSpec("x", **SMALL), Image.new("RGB", (8, 8)), tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_frames=8), "4n\\+1"),
        (dict(width=100), "multiple of 16"),
        (dict(num_steps=5), "num_steps"),
        (dict(attention_type="flash9"), "valid: "),
        (dict(sla_topk=0.0), "sla_topk"),
        (dict(quant_linear=True), "quant_linear"),
    ],
)
def test_bad_specs_fail_with_the_rule(t2v, change, message):
    (text,) = t2v.text(["x"])
    spec = GenerationSpec("x", model="tiny-t2v", **{**SMALL, **change})
    with pytest.raises(ValueError, match=message):
        t2v.denoise(spec, text)


def test_cancellation_between_steps(t2v):
    (text,) = t2v.text(["x"])
    with pytest.raises(GenerationCancelled):
        t2v.denoise(GenerationSpec("x", model="tiny-t2v", **SMALL), text, should_stop=lambda: True)


def test_a_two_expert_model_needs_two_checkpoints():
    with pytest.raises(ValueError, match="needs 2 DiT checkpoints"):
        DenoiseStage(PipelineConfig(model="tiny-i2v", dit_checkpoints=("only-one.pth",)))


def test_cli_generate_writes_a_named_mp4(tmp_path, capsys):
    code = cli_main(
        ["generate", "--prompt", "waves", "--size", "128x96", "--num-frames", "5", "--steps", "2", "--seed", "42",
         "--attention-type", "original", "--output-dir", str(tmp_path)]
    )
    assert code == 0
    (path,) = tmp_path.glob("*.mp4")
    assert re.fullmatch(r"t2v_42_tiny-t2v_\d{8}-\d{6}\.mp4", path.name)
    assert "wrote" in capsys.readouterr().out
