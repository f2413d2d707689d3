import pytest

from turbo_serve.models.configs import PRESETS, get_preset


def test_presets_have_the_released_shapes():
    small = get_preset("wan2.1-t2v-1.3b").dit
    assert (small.dim, small.num_heads, small.head_dim, small.num_layers) == (1536, 12, 128, 30)
    big = get_preset("wan2.2-i2v-a14b")
    assert (big.dit.in_dim, big.num_experts, big.default_sigma_max) == (36, 2, 200.0)


def test_tiny_presets_keep_kernel_friendly_heads():
    for preset in PRESETS.values():
        if preset.tiny:
            assert preset.dit.head_dim in (64, 128)
            assert preset.dit.text_dim == preset.text_encoder.d_model


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="wan2.1-t2v-1.3b"):
        get_preset("wan3")
