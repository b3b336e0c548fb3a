"""Pixels judged from the header alone: the pixel cap refuses before any decode, and
``decoded_pixels`` says what a check would decode (the API's choice of checking on the
event loop or in a thread)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from shared.errors import ImageTooLargeError
from shared.images import check_image, decoded_pixels
from tests.helpers import encode_image, small_jpeg

# One colour, 4000 x 4000: a kilobyte or so, ~100 ms to decode in full.
TINY_BUT_VAST = {
    "WEBP": encode_image(Image.new("RGB", (4000, 4000)), "WEBP", lossless=True),
    "PNG": encode_image(Image.new("RGB", (4000, 4000)), "PNG", optimize=True),
}


@pytest.mark.parametrize("fmt", list(TINY_BUT_VAST))
def test_the_pixel_cap_is_checked_on_the_header_before_decoding(fmt):
    data = TINY_BUT_VAST[fmt]
    assert len(data) < 64 * 1024
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="4000x4000"):
        check_image(data, max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.05  # a full decode takes ~120 ms


def test_decoded_pixels_reads_the_header():
    assert decoded_pixels(TINY_BUT_VAST["WEBP"]) == 16_000_000
    assert decoded_pixels(TINY_BUT_VAST["PNG"]) == 16_000_000
    assert decoded_pixels(small_jpeg(size=48)) == 6 * 6  # a JPEG is checked at 1/8 scale
    big_jpeg = encode_image(Image.new("RGB", (801, 600)), quality=10)
    assert decoded_pixels(big_jpeg) == 101 * 75
    # No header to read: check_image refuses that at once, whatever it is.
    assert decoded_pixels(b"") == decoded_pixels(b"not an image") == 0
    assert decoded_pixels(b"\xff\xd8\xff" + b"\x00" * 20) == 0
