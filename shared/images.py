"""Image bytes checked and decoded safely: by the API (validation), the scan coordinator
(manifest rows) and the worker (model input).

The pixel cap is checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing; the full decode catches truncated files.

Most uploads are plain JPEGs. For those, Pillow's own parsing of the file in Python
costs more than decoding a small image (~60 us of ~75 us for a 32 px thumbnail), so
``plain_jpeg`` picks out the JPEGs that libjpeg-turbo can decode directly (through
simplejpeg, without the interpreter lock) to exactly the pixels Pillow gives, and
everything else, including anything odd, takes Pillow's path, which has the last word
on what is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from typing import NamedTuple

import simplejpeg
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


_SOI = b"\xff\xd8\xff"
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # as Pillow reads it
_ORIENTATION = 0x0112


class PlainJpeg(NamedTuple):
    """What ``plain_jpeg`` found: the stored size, and the EXIF orientation (1-8) that
    ``open_image`` applies after decoding (1: none)."""

    height: int
    width: int
    orientation: int = 1


def plain_jpeg(data: bytes, max_pixels: int, oriented: bool = True) -> PlainJpeg | None:
    """A JPEG that libjpeg-turbo decodes directly to exactly the pixels ``open_image``
    decodes before its EXIF transpose (``tests/worker/ofa/test_resample.py`` holds them
    equal): colour (YCbCr) or grey, within the pixel limits; with ``oriented``, its
    orientation found as Pillow finds it. None for anything else: then Pillow decides
    (``open_image``, ``check_image``)."""
    if not data.startswith(_SOI):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)  # Pillow's bomb warning
    if colorspace not in ("YCbCr", "Gray") or not 0 < width * height <= limit:
        return None
    orientation = 1
    if oriented:
        found = _orientation(data)
        if not isinstance(found, int):
            return None  # unreadable, or a value Pillow may choke on: Pillow decides
        orientation = found if 2 <= found <= 8 else 1  # Pillow turns only for 2-8
    return PlainJpeg(height, width, orientation)


def _orientation(data: bytes) -> object:
    """The EXIF orientation ``ImageOps.exif_transpose`` would apply (1: none), read from
    the same segments Pillow reads (the APP1 segments before the first scan: Exif ones
    joined, the last XMP one); None when the markers do not parse cleanly."""
    exif: bytes | None = None
    xmp: bytes | None = None
    i, n = 2, len(data)
    while True:
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0xDA:  # the first scan: no metadata past it counts
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker == 0xE1:
            segment = data[i + 4 : i + 2 + length]
            if segment.startswith(_EXIF):
                exif = segment if exif is None else exif + segment[6:]
            elif segment.startswith(_XMP):
                xmp = segment.split(b"\x00", 1)[1]
        i += 2 + length
    orientation: object = None
    if exif is not None:
        try:
            tags = Image.Exif()
            tags.load(exif)
            orientation = tags.get(_ORIENTATION)
        except Exception:  # whatever Pillow makes of it, it decides
            return None
    if orientation is None and xmp is not None:
        match = _XMP_ORIENTATION.search(xmp)
        orientation = int(match[2]) if match else None
    return 1 if orientation is None else orientation


def check_image(data: bytes, max_pixels: int, formats: frozenset[str] = ACCEPTED_FORMATS) -> None:
    """Raise the ``BadInputError`` that ``open_image`` would, without keeping pixels: the
    API's and the scan coordinator's check. JPEGs decode at 1/8 scale (about half the
    cost of a full decode, measured on 1024x768 photos); truncation still fails. A plain
    JPEG that libjpeg-turbo decodes without a single warning is accepted without
    Pillow (which would accept it too); anything else is Pillow's to judge."""
    if "JPEG" in formats and (jpeg := plain_jpeg(data, max_pixels, oriented=False)):
        height, width, _ = jpeg
        try:
            simplejpeg.decode_jpeg(
                data, "GRAY", min_height=math.ceil(height / 8), min_width=math.ceil(width / 8)
            )  # strict: a warning (a truncated or corrupt stream) raises
            return
        except ValueError:
            pass
    _decoded(data, max_pixels, formats, scale=8)


def decoded_pixels(data: bytes) -> int:
    """The pixels ``check_image`` would decode (what its time grows with), read from the
    header alone: width x height, a JPEG's at the 1/8 scale it is checked at. 0 when no
    header can be read: ``check_image`` refuses that at the header, at once."""
    if data.startswith(_SOI):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return math.ceil(height / 8) * math.ceil(width / 8)
        except ValueError:
            pass  # Pillow's to read
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                fmt = img.format
    except Exception:  # any of Pillow's many refusals: check_image gives the real one
        return 0
    if fmt in ("JPEG", "MPO"):
        return math.ceil(height / 8) * math.ceil(width / 8)
    return width * height


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
