"""Output geometry rules: TurboDiffusion's resolution table, adaptive I2V sizes, frame counts.

The API schemas and the offline CLI both validate through these functions, so a rule is written once.
"""

from __future__ import annotations

import math

# (width, height) per resolution and aspect ratio (W:H), as TurboDiffusion's inference scripts define them.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "4:3": (640, 480), "3:4": (480, 640), "1:1": (640, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (960, 720), "3:4": (720, 960), "1:1": (960, 960)},
}
ASPECT_RATIOS = tuple(RESOLUTIONS["480p"])
SIZE_MULTIPLE = 16
"""Width and height must be multiples of the VAE stride (8) times the DiT patch (2)."""
FPS = 16


def resolve_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(width, height) of a table entry; errors name the valid choices."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    if aspect_ratio not in RESOLUTIONS[resolution]:
        raise ValueError(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}, got {aspect_ratio!r}")
    return RESOLUTIONS[resolution][aspect_ratio]


def adaptive_size(resolution: str, aspect_ratio: str, image_width: int, image_height: int) -> tuple[int, int]:
    """Keep the table entry's area but follow the input image's aspect, in multiples of 16."""
    width, height = resolve_size(resolution, aspect_ratio)
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    area = width * height
    ratio = image_height / image_width
    h = max(SIZE_MULTIPLE, round(math.sqrt(area * ratio) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    w = max(SIZE_MULTIPLE, round(math.sqrt(area / ratio) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return w, h


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")


def check_num_frames(num_frames: int) -> None:
    """Wan's VAE compresses time 4x causally: pixel frames must be 4n+1."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4n+1 (1, 5, 9, ..., 81), got {num_frames}")


def latent_frames(num_frames: int) -> int:
    check_num_frames(num_frames)
    return (num_frames - 1) // 4 + 1
