"""WanVAE against diffusers' AutoencoderKLWan, streaming behaviour, I2V condition and memory bounds."""

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from turbo_serve.models.configs import WanVAEConfig, get_preset
from turbo_serve.models.loading_vae_text import load_vae
from turbo_serve.models.wan_vae import WanVAE, first_frame_mask

diffusers = pytest.importorskip("diffusers")

TINY = get_preset("tiny-t2v").vae


def _stats(config: WanVAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, config.z_dim, 1, 1, 1)
    return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers AutoencoderKLWan with every parameter random (gains and biases too)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=TINY.base_dim, z_dim=TINY.z_dim).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def diffusers_folder(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "diffusers"
    reference.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(diffusers_folder):
    return load_vae(diffusers_folder, TINY)


@pytest.fixture(scope="module")
def clip():
    generator = torch.Generator().manual_seed(1)
    return torch.rand((1, 3, 13, 32, 32), generator=generator) * 2 - 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncdhw", "channels_last"])
def test_encode_and_decode_match_diffusers(reference, diffusers_folder, clip, channels_last):
    vae = load_vae(diffusers_folder, TINY)
    if channels_last:
        vae.to_channels_last()
    mean, std = _stats(TINY)
    with torch.no_grad():
        mu = reference.encode(clip).latent_dist.mode()
        expected_video = reference.decode(mu).sample
    latents = vae.encode(clip)
    assert latents.shape == (1, 16, 4, 4, 4)
    torch.testing.assert_close(latents, (mu - mean) / std, rtol=1e-5, atol=1e-5)
    video = vae.decode((mu - mean) / std)
    assert 0.01 < (video.abs() < 1).float().mean()  # not all clamped, so the comparison means something
    torch.testing.assert_close(video, expected_video, rtol=1e-5, atol=2e-5)


def test_batch_of_two_equals_one_at_a_time(ours, clip):
    pair = torch.cat([clip, clip.flip(-1)])
    latents = ours.encode(pair)
    torch.testing.assert_close(latents[1:], ours.encode(clip.flip(-1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(latents)[:1], ours.decode(latents[:1]), rtol=1e-5, atol=1e-5)


def test_21_latent_frames_decode_to_81_frames_within_range(ours):
    z = torch.randn((1, 16, 21, 2, 2), generator=torch.Generator().manual_seed(2)) * 3
    video = ours.decode(z)
    assert video.shape == (1, 3, 81, 16, 16)
    assert video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert video.abs().amax() == 1  # large latents do saturate: the clamp is active


def test_iter_decode_streams_1_then_4_frames_and_concatenates_to_decode(ours):
    z = torch.randn((1, 16, 4, 2, 2), generator=torch.Generator().manual_seed(3))
    chunks = list(ours.iter_decode(z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    torch.testing.assert_close(torch.cat(chunks, dim=2), ours.decode(z), rtol=0, atol=0)


def test_decode_is_causal(ours):
    """Pixel frames of latent frame t depend only on latent frames <= t (the feature cache's contract)."""
    z = torch.randn((1, 16, 3, 2, 2), generator=torch.Generator().manual_seed(4))
    changed = z.clone()
    changed[:, :, 2] += 1.0
    a, b = ours.decode(z), ours.decode(changed)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().amax() > 1e-3


def test_encode_condition_mask_and_latent(ours):
    image = torch.rand((3, 32, 48), generator=torch.Generator().manual_seed(5)) * 2 - 1
    condition = ours.encode_condition(image, num_frames=13)
    assert condition.shape == (20, 4, 4, 6)
    assert torch.equal(condition[:4, 0], torch.ones(4, 4, 6))
    assert torch.equal(condition[:4, 1:], torch.zeros(4, 3, 4, 6))
    clip = torch.cat([image[:, None], torch.zeros(3, 12, 32, 48)], dim=1)[None]
    torch.testing.assert_close(condition[4:], ours.encode(clip)[0], rtol=1e-5, atol=1e-5)


def test_first_frame_mask_matches_the_per_frame_construction():
    """Wan folds an 81-frame mask (frame 0 repeated 4x) into [4, 21]: only latent frame 0 is set."""
    mask = first_frame_mask(81, 3, 5)
    assert mask.shape == (4, 21, 3, 5)
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()


@pytest.mark.parametrize(
    ("call", "shape", "match"),
    [
        ("encode", (1, 3, 8, 32, 32), "4n\\+1"),
        ("encode", (1, 3, 9, 30, 32), "multiples of 8"),
        ("encode", (1, 4, 9, 32, 32), "\\[B, 3, F, H, W\\]"),
        ("decode", (1, 8, 3, 4, 4), "\\[B, 16, T>=1, h, w\\]"),
    ],
)
def test_bad_shapes_raise(ours, call, shape, match):
    with pytest.raises(ValueError, match=match):
        getattr(ours, call)(torch.zeros(shape))


def test_encode_condition_rejects_bad_frames(ours):
    with pytest.raises(ValueError, match="4n\\+1"):
        ours.encode_condition(torch.zeros(3, 32, 32), num_frames=10)


def test_bf16_decode_tracks_float32(ours):
    z = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(6))
    half = copy.deepcopy(ours).to(torch.bfloat16)
    error = (half.decode(z) - ours.decode(z)).abs()
    assert error.mean() < 0.02 and error.max() < 0.2


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while the mode is on and that are still referenced.

    A storage lives while any tensor viewing it lives; storages that existed before (weights,
    inputs) are excluded.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, tuple[int, weakref.WeakValueDictionary]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if not key or key in self.exclude:
                continue
            if key not in self.live or not self.live[key][1]:  # new, or a freed address reused
                self.live[key] = (storage.nbytes(), weakref.WeakValueDictionary())
            self.live[key][1][id(tensor)] = tensor
        self.live = {key: entry for key, entry in self.live.items() if entry[1]}
        self.peak = max(self.peak, sum(nbytes for nbytes, _ in self.live.values()))
        return out


def _peak_bytes(vae: WanVAE, run, *inputs: torch.Tensor) -> int:
    """Peak working set of run(*inputs), not counting the returned tensor."""
    existing = {t.untyped_storage().data_ptr() for t in (*vae.parameters(), *inputs)}
    with _LiveTensorBytes(existing) as tracker:
        out = run(*inputs)
    return tracker.peak - out.numel() * out.element_size()


@pytest.fixture(scope="module")
def narrow_vae():
    return load_vae(None, WanVAEConfig(base_dim=4, dim_mult=(1, 2, 2, 2)))


def test_decode_memory_grows_with_area_not_frames(narrow_vae):
    def peak(latent_frames: int, size: int) -> int:
        z = torch.randn((1, 16, latent_frames, size, size), generator=torch.Generator().manual_seed(7))
        return _peak_bytes(narrow_vae, narrow_vae.decode, z)

    short, long, wide = peak(3, 4), peak(7, 4), peak(3, 8)
    assert long < 1.02 * short  # 9 -> 25 frames: the working set stays the same
    assert 3.5 * short < wide < 4.5 * short  # 4x the pixels: 4x the working set


def test_i2v_encode_memory_does_not_grow_with_frames(narrow_vae):
    image = torch.zeros(3, 32, 32)
    short = _peak_bytes(narrow_vae, lambda i: narrow_vae.encode_condition(i, 9), image)
    long = _peak_bytes(narrow_vae, lambda i: narrow_vae.encode_condition(i, 25), image)
    assert long < 1.02 * short
