"""Validation of uploaded I2V images: PNG or JPEG, bounded in bytes and pixels, fully decodable.

The pixel count is checked from the header before any pixel is decoded, so a decompression bomb
(a small file that expands to gigapixels) is refused without allocating it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from turbo_serve.api.schemas import FieldError

FORMATS = {"PNG": "png", "JPEG": "jpg"}
FIELD = "input_reference"


@dataclass(frozen=True)
class UploadedImage:
    data: bytes
    extension: str
    width: int
    height: int


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> UploadedImage:
    """The image if acceptable, else FieldError on input_reference saying which rule failed."""
    if not data:
        raise FieldError([(FIELD, "the image is empty")])
    if len(data) > max_bytes:
        raise FieldError([(FIELD, f"the image is {len(data)} bytes; the limit is {max_bytes}")])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise FieldError([(FIELD, f"must be a PNG or JPEG image, got {image.format}")])
            width, height = image.size
            if width * height > max_pixels:
                raise FieldError([(FIELD, f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")])
            image.load()
    except FieldError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise FieldError([(FIELD, "must be a PNG or JPEG image (the data is not a readable image)")]) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise FieldError([(FIELD, f"the image is truncated or corrupt: {error}")]) from None
    return UploadedImage(data=data, extension=FORMATS[image.format], width=width, height=height)


def decode_image_reference(reference: object) -> bytes:
    """OpenAI's image reference object {'image_url': 'data:image/...;base64,...'}: only data URLs
    (the server never fetches URLs a request names)."""
    if not isinstance(reference, dict) or set(reference) - {"image_url", "file_id"}:
        raise FieldError([(FIELD, "must be an uploaded file or {'image_url': 'data:image/png;base64,...'}")])
    if "file_id" in reference:
        raise FieldError([(f"{FIELD}.file_id", "file ids are not supported; upload the image or send a data URL")])
    url = reference.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise FieldError([(f"{FIELD}.image_url", "only data URLs (data:image/png;base64,...) are accepted")])
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise FieldError([(f"{FIELD}.image_url", "the data URL is not valid base64")]) from None
