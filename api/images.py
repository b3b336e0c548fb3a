"""Checking image bytes before anything is stored: size, format, pixels, integrity.

Only a cache miss pays for this (a cache hit answers from the hash alone). The full
decode catches truncated files here, at submit time, instead of in a worker.
"""

from __future__ import annotations

import base64
import binascii

from shared.errors import BadImageError, ImageTooLargeError
from shared.images import open_image


def decode_base64(data: str, max_bytes: int) -> bytes:
    """Strict base64 (a ``data:`` URL prefix allowed), refusing oversized payloads early."""
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    if len(data) > (max_bytes * 4) // 3 + 8:
        raise ImageTooLargeError(f"image is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImageError(f"image_base64 is not valid base64 ({exc})") from exc
    check_size(raw, max_bytes)
    return raw


def check_size(data: bytes, max_bytes: int) -> None:
    """Refuse empty or oversized uploads."""
    if not data:
        raise BadImageError("image is empty")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"image is {len(data)} bytes; the limit is {max_bytes}")


def validate_image(data: bytes, max_pixels: int) -> None:
    """Decode fully (the pixel cap checked first); raises a ``BadInputError``."""
    open_image(data, max_pixels)
