"""Every Wan VAE checkpoint format loads to the same tensors; bad checkpoints fail with named keys."""

import re

import pytest
import torch
from safetensors.torch import save_file

from turbo_serve.models.configs import WanVAEConfig, get_preset
from turbo_serve.models.checkpoint import CheckpointKeyError
from turbo_serve.models.loading_vae_text import load_vae, read_vae_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

TINY = get_preset("tiny-t2v").vae


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=TINY.base_dim, z_dim=TINY.z_dim)


@pytest.fixture(scope="module")
def reference_state(reference):
    return {k: v.clone() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def diffusers_folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "diffusers"
    reference.save_pretrained(folder)
    return folder


_LEAVES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}


def _wan_name(key: str) -> str:
    """diffusers -> Wan2.1_VAE.pth name, written from Wan's module tree (wan/modules/vae.py): the decoder
    keeps 3 residual blocks + 1 resample per stage in one flat `upsamples` list (4 per stage)."""
    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    part, _, rest = key.partition(".")
    rest = re.sub(r"^conv_in\.", "conv1.", rest)
    rest = re.sub(r"^norm_out\.", "head.0.", rest)
    rest = re.sub(r"^conv_out\.", "head.2.", rest)
    rest = re.sub(r"^mid_block\.resnets\.0\.", "middle.0.", rest)
    rest = re.sub(r"^mid_block\.attentions\.0\.", "middle.1.", rest)
    rest = re.sub(r"^mid_block\.resnets\.1\.", "middle.2.", rest)
    rest = re.sub(r"^down_blocks\.", "downsamples.", rest)
    rest = re.sub(r"^up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"upsamples.{4 * int(m[1]) + int(m[2])}.", rest)
    rest = re.sub(r"^up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"upsamples.{4 * int(m[1]) + 3}.", rest)
    rest = re.sub(r"\.(norm1|conv1|norm2|conv2)\.", lambda m: f".{_LEAVES[m[1]]}.", rest)
    rest = rest.replace(".conv_shortcut.", ".shortcut.")
    return f"{part}.{rest}"


@pytest.fixture(scope="module")
def wan_state(reference_state):
    state = {_wan_name(k): v for k, v in reference_state.items()}
    # diffusers' own single-file converter is the oracle that these are Wan's names.
    converted = convert_wan_vae_to_diffusers(state)
    assert converted.keys() == reference_state.keys()
    assert all(converted[k] is reference_state[k] for k in converted)
    return state


def _assert_same_weights(model, reference_state):
    loaded = model.state_dict()
    assert loaded.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(loaded[key], value), key


def test_diffusers_folder_loads_exact_tensors(diffusers_folder, reference_state):
    _assert_same_weights(load_vae(diffusers_folder, TINY), reference_state)


def test_wan_pth_loads_exact_tensors(wan_state, reference_state, tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_state, path)
    _assert_same_weights(load_vae(path, TINY), reference_state)


def test_wan_rename_covers_the_real_layout(wan_state):
    keys = set(wan_state)
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight"} <= keys
    assert {"decoder.upsamples.3.resample.1.weight", "decoder.upsamples.3.time_conv.weight"} <= keys
    assert "decoder.upsamples.4.shortcut.weight" in keys and "encoder.middle.1.to_qkv.weight" in keys


@pytest.mark.parametrize("naming", ["diffusers", "wan"])
def test_safetensors_state_dict_in_either_naming(naming, reference_state, wan_state, tmp_path):
    state = reference_state if naming == "diffusers" else wan_state
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    _assert_same_weights(load_vae(path, TINY), reference_state)


def test_load_casts_to_dtype(diffusers_folder):
    vae = load_vae(diffusers_folder, TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}


def test_key_errors_list_missing_and_unexpected_keys(reference_state):
    state = dict(reference_state)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as error:
        load_vae(state, TINY)
    message = str(error.value)
    assert "1 missing keys: decoder.conv_out.bias" in message
    assert "1 unexpected keys: decoder.extra.weight" in message


def test_key_errors_name_misshapen_tensors(reference_state):
    state = dict(reference_state)
    state["encoder.conv_in.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointKeyError, match="encoder.conv_in.weight"):
        load_vae(state, TINY)


def test_unknown_wan_key_is_reported_unexpected(wan_state):
    state = dict(wan_state)
    state["decoder.upsamples.15.residual.0.gamma"] = torch.ones(8, 1, 1, 1)
    with pytest.raises(CheckpointKeyError, match="decoder.upsamples.15.residual.0.gamma"):
        load_vae(state, TINY)


def test_folder_config_mismatch_names_the_field(diffusers_folder):
    with pytest.raises(ValueError, match="base_dim=8 \\(preset base_dim=16\\)"):
        load_vae(diffusers_folder, WanVAEConfig(base_dim=16))


def test_wan22_folder_is_rejected(tmp_path):
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, is_residual=True).save_pretrained(tmp_path / "wan22")
    with pytest.raises(ValueError, match="Wan2.2"):
        read_vae_state_dict(tmp_path / "wan22", TINY)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nope.pth", TINY)
    (tmp_path / "vae.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="not a weights file"):
        load_vae(tmp_path / "vae.onnx", TINY)


def test_random_weights_are_seeded():
    a, b, c = load_vae(None, TINY, seed=0), load_vae(None, TINY, seed=0), load_vae(None, TINY, seed=1)
    assert torch.equal(a.decoder.conv_in.weight, b.decoder.conv_in.weight)
    assert not torch.equal(a.decoder.conv_in.weight, c.decoder.conv_in.weight)
    assert torch.equal(a.decoder.norm_out.gamma, torch.ones_like(a.decoder.norm_out.gamma))
