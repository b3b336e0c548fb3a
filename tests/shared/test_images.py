"""The image check the API and the coordinator run (``check_image``) refuses exactly
what the worker's decode (``open_image``) refuses, and accepts what it accepts."""

from __future__ import annotations

import pytest
from PIL import Image

from shared.errors import BadInputError
from shared.images import check_image, open_image
from tests.helpers import encode_image, photo

MAX_PIXELS = 1_000_000
JPEG = encode_image(photo("coffee").resize((640, 480)), quality=90)
PNG = encode_image(photo("coffee").resize((320, 240)), "PNG")

BAD = {
    "empty": b"",
    "not an image": b"%PDF-1.4 definitely not an image",
    "JPEG cut to a third": JPEG[: len(JPEG) // 3],
    "JPEG cut just before its end": JPEG[:-200],
    "PNG cut in half": PNG[: len(PNG) // 2],
    "too many pixels": encode_image(Image.new("L", (2000, 1000)), "PNG"),
    "a format we do not take": encode_image(photo("coffee").resize((32, 32)), "ICO"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_check_refuses_what_decoding_refuses(name: str):
    data = BAD[name]
    with pytest.raises(BadInputError) as decoding:
        open_image(data, MAX_PIXELS)
    with pytest.raises(BadInputError) as checking:
        check_image(data, MAX_PIXELS)
    assert type(checking.value) is type(decoding.value)
    assert checking.value.title == decoding.value.title


@pytest.mark.parametrize(
    "data",
    [JPEG, PNG, encode_image(photo("coffee").convert("L").resize((33, 17)), quality=80)],
    ids=["jpeg", "png", "grey odd-sized jpeg"],
)
def test_check_accepts_what_decoding_accepts(data: bytes):
    check_image(data, MAX_PIXELS)
    img = open_image(data, MAX_PIXELS)
    assert img.mode == "RGB"


def damaged(data: bytes, at: int) -> bytes:
    """``data`` with a run of its entropy-coded bytes overwritten."""
    return data[:at] + bytes(64) + data[at + 64 :]


@pytest.mark.parametrize("at", [0.3, 0.6, 0.95])
def test_check_agrees_with_decoding_on_damaged_jpegs(at: float):
    """libjpeg-turbo only warns about a damaged stream, and Pillow may still decode it:
    the check's direct JPEG path steps aside on any warning and lets Pillow judge."""
    data = damaged(JPEG, int(len(JPEG) * at))
    try:
        open_image(data, MAX_PIXELS)
    except BadInputError as exc:
        with pytest.raises(type(exc)):
            check_image(data, MAX_PIXELS)
    else:
        check_image(data, MAX_PIXELS)
