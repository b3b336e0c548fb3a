"""The vectorised resize against Pillow's own: the same bytes, for every shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import photo
from worker.ofa.resample import _rgbx_view, resize_bicubic


def pillow(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


SHAPES = [
    (1024, 768, 480),  # a landscape photo: horizontal pass first
    (768, 1024, 480),  # portrait: still horizontal first
    (300, 2000, 480),  # height shrinks over twice the width's change: vertical first
    (2000, 300, 96),
    (32, 24, 128),  # a thumbnail, enlarged
    (451, 300, 128),
    (480, 480, 480),  # no resize at all
    (480, 700, 480),  # vertical pass only
    (700, 480, 480),  # horizontal pass only
    (481, 479, 480),
    (1, 1, 128),
    (17, 1, 5),
    (5, 7, 480),
]


@pytest.mark.parametrize("width,height,size", SHAPES)
def test_photo_and_noise_resize_to_pillows_bytes(width: int, height: int, size: int):
    for img in (photo("chelsea").convert("RGB").resize((width, height)), noise(width, height, 7)):
        ours = resize_bicubic(img, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        assert ours.flags.c_contiguous
        np.testing.assert_array_equal(ours, pillow(img, size))


def test_random_shapes_resize_to_pillows_bytes():
    rng = np.random.default_rng(2026)
    for i in range(40):
        width, height = (int(v) for v in rng.integers(1, 1200, 2))
        size = int(rng.integers(1, 520))
        img = noise(width, height, i)
        np.testing.assert_array_equal(resize_bicubic(img, size), pillow(img, size))


def test_the_pixels_are_read_in_place_and_large_images_fall_back_to_pillow():
    img = photo("coffee").convert("RGB")
    view = _rgbx_view(img)
    assert view is not None
    np.testing.assert_array_equal(view[0][:, :, :3], np.asarray(img))
    # Pillow keeps an image over its block size (16 MB) in several blocks: no view,
    # and the resize is Pillow's own.
    big = photo("coffee").convert("RGB").resize((2400, 1800))
    assert _rgbx_view(big) is None
    np.testing.assert_array_equal(resize_bicubic(big, 480), pillow(big, 480))


def test_other_modes_are_resized_by_pillow():
    gray = photo("camera").convert("L")
    out = resize_bicubic(gray, 64)
    np.testing.assert_array_equal(out, pillow(gray, 64))
