import av
import numpy as np
import pytest
import torch

from turbo_serve.pipeline.video import Mp4Writer, to_uint8_frames, write_mp4


def _gradient_frames(count, height=48, width=64):
    t = torch.linspace(0, 1, count)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    rgb = torch.stack([t + 0 * y * x, y + 0 * t * x, x + 0 * t * y], dim=-1)
    return (rgb * 255).to(torch.uint8)


def test_mp4_is_h264_with_every_frame_at_16_fps(tmp_path):
    frames = _gradient_frames(9)
    path = write_mp4([frames[:1], frames[1:5], frames[5:]], tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264"
        assert stream.average_rate == 16
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    # Lossy, but close: smooth gradients survive CRF 18.
    assert np.abs(np.stack(decoded).astype(int) - frames.numpy().astype(int)).mean() < 4


def test_writer_rejects_frames_of_the_wrong_shape(tmp_path):
    writer = Mp4Writer(tmp_path / "x.mp4", width=64, height=48)
    with pytest.raises(ValueError, match="uint8 frames"):
        writer.write(torch.zeros(1, 32, 64, 3, dtype=torch.uint8))
    writer.write(torch.zeros(1, 48, 64, 3, dtype=torch.uint8))
    assert writer.close().stat().st_size > 0


def test_uint8_conversion_maps_the_vae_range_and_layout():
    video = torch.tensor([-1.5, -1.0, 0.0, 1.0]).view(1, 4, 1, 1).expand(3, 4, 1, 1)
    frames = to_uint8_frames(video)
    assert frames.shape == (4, 1, 1, 3)
    assert frames[:, 0, 0, 0].tolist() == [0, 0, 128, 255]
