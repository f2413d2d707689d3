"""H.264 mp4 output through PyAV (libx264, yuv420p, 16 fps by default).

`Mp4Writer` encodes on a background thread, so a decoder that streams frames (the VAE decodes one
latent frame at a time) never waits for the encoder: mp4 encoding stays off the GPU's critical path.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import torch

CRF = 18
"""Visually lossless for generated video; the x264 default (23) shows banding on smooth gradients."""
PRESET = "veryfast"


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """VAE output [3, F, H, W] in [-1, 1] -> uint8 frames [F, H, W, 3] (on the same device)."""
    return ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


class Mp4Writer:
    """Streaming mp4 writer: `write` queues frames and returns; `close` waits for the file."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 16) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._size = (height, width)
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=32)
        self._error: BaseException | None = None
        self._container = av.open(str(self.path), mode="w")
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(CRF), "preset": PRESET}
        self._thread = threading.Thread(target=self._encode_loop, name="mp4-encoder", daemon=True)
        self._thread.start()

    def _encode_loop(self) -> None:
        try:
            while (frames := self._queue.get()) is not None:
                for frame in frames:
                    for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        self._container.mux(packet)
            for packet in self._stream.encode():
                self._container.mux(packet)
        except BaseException as error:  # surfaced by close(); keep draining so write() never blocks
            self._error = error
            while self._queue.get() is not None:
                pass
        finally:
            self._container.close()

    def write(self, frames: torch.Tensor | np.ndarray) -> None:
        """Queue uint8 frames shaped [n, H, W, 3]."""
        array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (*self._size, 3):
            raise ValueError(f"expected uint8 frames [n, {self._size[0]}, {self._size[1]}, 3], got {array.dtype} {array.shape}")
        self._queue.put(np.ascontiguousarray(array))

    def close(self) -> Path:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"mp4 encoding failed for {self.path}") from self._error
        return self.path

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_mp4(frames: torch.Tensor | Iterable[torch.Tensor], path: str | Path, fps: int = 16) -> Path:
    """Write uint8 frames [F, H, W, 3] (or an iterable of [n, H, W, 3] chunks) as an H.264 mp4."""
    chunks = iter([frames] if isinstance(frames, torch.Tensor) else frames)
    first = next(chunks)
    with Mp4Writer(path, width=first.shape[2], height=first.shape[1], fps=fps) as writer:
        writer.write(first)
        for chunk in chunks:
            writer.write(chunk)
    return Path(path)
