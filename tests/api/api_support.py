"""Shared by the API tests (a module of its own: several conftest.py files coexist in one run)."""

from __future__ import annotations

import io

from PIL import Image

# Small and quick on the CPU: 128x128, 5 frames, 2 steps.
SMALL = {"size": "128x128", "num_frames": 5, "num_steps": 2}
SLOW = {**SMALL, "size": "256x256", "sampler": "euler", "guidance_scale": 1, "num_steps": 100}
"""100 cheap steps (about 10 ms each): long enough to act on a job mid-denoise."""


def png_bytes(width: int = 96, height: int = 64, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (180, 40, 40)).save(buffer, fmt)
    return buffer.getvalue()
