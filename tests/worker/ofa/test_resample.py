"""The vectorised resize against Pillow's own, and plain JPEGs decoded by libjpeg-turbo
directly against Pillow's decode: the same bytes, for every shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.errors import BadImageError, ImageTooLargeError
from shared.images import open_image, plain_jpeg
from tests.helpers import encode_image, photo
from worker.ofa.preprocess import decode_and_resize
from worker.ofa.resample import _rgbx_view, decode_resize_jpeg, resize_bicubic


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


# -- plain JPEGs decoded by libjpeg-turbo directly (decode_resize_jpeg) --------------------

MAX_PIXELS = 40_000_000


def pillows_path(data: bytes, size: int) -> np.ndarray:
    """What the worker made of image bytes before the direct JPEG path: Pillow's decode,
    EXIF transpose and RGB, then the resize."""
    return resize_bicubic(open_image(data, MAX_PIXELS), size)


JPEG_VARIANTS = [  # (mode, width, height, options)
    ("RGB", 1024, 768, {"quality": 90}),  # 4:2:0
    ("RGB", 640, 480, {"quality": 95, "subsampling": 0}),  # 4:4:4
    ("RGB", 333, 257, {"quality": 75, "subsampling": 1}),  # 4:2:2, odd sizes
    ("RGB", 451, 300, {"quality": 85, "progressive": True}),
    ("RGB", 300, 451, {"quality": 50, "restart_marker_blocks": 3}),
    ("RGB", 32, 32, {"quality": 75}),  # a scan's thumbnail
    ("RGB", 1, 1, {"quality": 90}),
    ("L", 33, 17, {"quality": 80}),  # grey: replicated to RGB, as Pillow's convert does
    ("L", 500, 400, {"quality": 90, "progressive": True}),
]


@pytest.mark.parametrize("mode,width,height,options", JPEG_VARIANTS)
def test_plain_jpegs_decode_to_the_same_bytes_as_pillows_path(
    mode: str, width: int, height: int, options: dict
):
    for img in (photo("chelsea").resize((width, height)), noise(width, height, 3)):
        data = encode_image(img.convert(mode), **options)
        assert plain_jpeg(data, MAX_PIXELS) == (height, width, 1)
        for size in (128, 480):
            ours = decode_resize_jpeg(data, MAX_PIXELS, size)
            assert ours is not None  # the direct path was taken
            np.testing.assert_array_equal(ours, pillows_path(data, size))
            np.testing.assert_array_equal(decode_and_resize(data, MAX_PIXELS, size), ours)


def with_exif_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(img, exif=exif.tobytes(), quality=90)


def with_xmp_orientation(img: Image.Image, orientation: int) -> bytes:
    xmp = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
    return encode_image(img, xmp=xmp.encode(), quality=90)


@pytest.mark.parametrize("orientation", range(1, 10))
def test_turned_jpegs_are_decoded_directly_and_turned_as_pillow_turns_them(orientation: int):
    """EXIF (or XMP) orientations 2-8 are Pillow's transposes after the decode; 1, and a
    value Pillow does not know (9), leave the pixels as stored."""
    img = photo("chelsea").resize((300, 200))  # not square: a wrong turn shows
    for data in (with_exif_orientation(img, orientation), with_xmp_orientation(img, orientation)):
        found = plain_jpeg(data, MAX_PIXELS)
        assert found is not None
        assert found.orientation == (orientation if orientation <= 8 else 1)
        direct = decode_resize_jpeg(data, MAX_PIXELS, 128)
        assert direct is not None  # the direct path was taken
        np.testing.assert_array_equal(direct, pillows_path(data, 128))
    turned = with_exif_orientation(img, 6)
    assert not np.array_equal(pillows_path(turned, 128), pillow(img, 128))


def test_other_images_and_damaged_jpegs_take_pillows_path():
    img = photo("chelsea").resize((200, 150))
    jpeg = encode_image(img, quality=90)
    cmyk = encode_image(img.convert("CMYK"), quality=90)
    png = encode_image(img, "PNG")
    cut = jpeg[: len(jpeg) - 300]
    assert plain_jpeg(png, MAX_PIXELS) is None
    assert plain_jpeg(cmyk, MAX_PIXELS) is None
    assert plain_jpeg(jpeg, 200 * 150 - 1) is None  # over the pixel limit: Pillow refuses
    assert decode_resize_jpeg(cut, MAX_PIXELS, 64) is None  # libjpeg-turbo warns
    for data in (cmyk, png):
        np.testing.assert_array_equal(
            decode_and_resize(data, MAX_PIXELS, 64), pillows_path(data, 64)
        )
    with pytest.raises(BadImageError):
        decode_and_resize(cut, MAX_PIXELS, 64)
    with pytest.raises(ImageTooLargeError):
        decode_and_resize(jpeg, 200 * 150 - 1, 64)
