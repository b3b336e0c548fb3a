"""Image bytes checked and decoded safely: by the API (validation), the scan coordinator
(manifest rows) and the worker (model input).

The pixel cap is checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing; the full decode catches truncated files.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps

from shared.errors import BadImageError, ImageTooLargeError, UnsupportedImageError

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


def _decoded(data: bytes, max_pixels: int, formats: frozenset[str], scale: int = 1):
    """The image decoded in full (``scale`` 1), or, for JPEG, at 1/``scale`` of its size
    through the decoder's DCT scaling: every byte of the stream is still read, so a
    truncated file fails the same way, at a fraction of the cost. Raises a
    ``BadInputError`` for anything we do not accept."""
    if not data:
        raise BadImageError("image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in formats:
                raise UnsupportedImageError(
                    f"{img.format} images are not accepted; use one of "
                    + ", ".join(sorted(formats))
                )
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"image is {width}x{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            if scale > 1 and img.format == "JPEG":
                img.draft(img.mode, (max(1, width // scale), max(1, height // scale)))
            img.load()
            return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageError("the file is not an image format we can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image could not be decoded ({exc})") from exc


def check_image(data: bytes, max_pixels: int, formats: frozenset[str] = ACCEPTED_FORMATS) -> None:
    """Raise the ``BadInputError`` that ``open_image`` would, without keeping pixels: the
    API's and the scan coordinator's check. JPEGs decode at 1/8 scale (about half the
    cost of a full decode, measured on 1024x768 photos); truncation still fails."""
    _decoded(data, max_pixels, formats, scale=8)


def open_image(data: bytes, max_pixels: int, formats: frozenset[str] = ACCEPTED_FORMATS):
    """Decode to an upright (EXIF orientation applied) RGB image, or raise a ``BadInputError``."""
    img = _decoded(data, max_pixels, formats)
    try:
        ImageOps.exif_transpose(img, in_place=True)  # no copy when already upright
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image could not be decoded ({exc})") from exc
    return img if img.mode == "RGB" else img.convert("RGB")


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
