"""Decoding image bytes safely; used by the API (validation) and the worker (model input).

The pixel cap is checked on the header, before any pixel is decoded, so a
decompression bomb costs nothing; the full decode catches truncated files.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from shared.errors import BadImageError, ImageTooLargeError, UnsupportedImageError

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


def open_image(data: bytes, max_pixels: int, formats: frozenset[str] = ACCEPTED_FORMATS):
    """Decode to an upright (EXIF orientation applied) RGB image, or raise a ``BadInputError``."""
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
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedImageError("the file is not an image format we can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"image could not be decoded ({exc})") from exc
