"""The entailer: images travel as uint8 into one reused host buffer and are normalised
on the device, to the same float32 numbers the reference's ToTensor + Normalize give;
bfloat16 (what a GPU worker runs by default) goes through the same code as float32 (padded
batches of mixed text lengths included, whose attention masks must fit the low-precision
dtype) with probabilities close to float32's; bad inputs are named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shared.errors import BadImageError, BadTextError, ImageTooLargeError, UnsupportedImageError
from tests.helpers import encode_image, photo
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer


def test_batches_reuse_one_buffer_and_normalise_exactly(tiny_dir: Path):
    ent = Entailer(load_checkpoint(tiny_dir), device="cpu")
    items = [ent.prepare(photo(n), "a thing") for n in ("coffee", "rocket", "camera")]
    assert items[0].pixels.dtype == np.uint8 and items[0].pixels.shape[2] == 3

    first = ent.upload(items[:3])
    where = first.data_ptr()
    assert torch.equal(first, torch.from_numpy(np.stack([i.pixels for i in items])))
    again = ent.upload(items[1:3])  # smaller: the same buffer
    assert again.data_ptr() == where
    assert torch.equal(again, torch.from_numpy(np.stack([i.pixels for i in items[1:3]])))
    bigger = ent.upload(items * 2)  # larger: grown once, then reused
    assert bigger.shape[0] == 6
    assert ent.upload(items).data_ptr() == bigger.data_ptr()

    images = ent.pixels(items)
    mean, std = (np.asarray(v, dtype=np.float32) for v in ent.task.mean_std)
    for got, item in zip(images, items, strict=True):
        scaled = item.pixels.astype(np.float32) / np.float32(255)
        expected = ((scaled - mean) / std).transpose(2, 0, 1)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_scores_do_not_depend_on_what_the_buffer_held(tiny_dir: Path):
    ent = Entailer(load_checkpoint(tiny_dir), device="cpu")
    a = ent.prepare(photo("coffee"), "a cup of coffee")
    b = ent.prepare(photo("rocket"), "a rocket")
    alone = ent.answer_log_probs([a])
    ent.answer_log_probs([b, b, b])  # fills the buffer with other pixels
    assert torch.equal(ent.answer_log_probs([a]), alone)


CASES = [
    ("coffee", "a cup", None),
    ("rocket", "a rocket stands on the launch pad before take off", "it is daytime"),
    ("camera", "a man is holding an old camera in his hands", None),
]


def probabilities(ent: Entailer, items) -> torch.Tensor:
    return torch.softmax(ent._answer_log_probs(items).double(), dim=-1)


def test_bfloat16_padded_batch_agrees_with_float32(tiny_dir: Path, multi_dir: Path):
    for ckpt in (tiny_dir, multi_dir):  # one-token answers, and the answer trie
        full = Entailer(load_checkpoint(ckpt), device="cpu", dtype="float32")
        low = Entailer(load_checkpoint(ckpt), device="cpu", dtype="bfloat16")
        items = [full.prepare(photo(n), t, p) for n, t, p in CASES]
        assert len({len(i.source) for i in items}) > 1  # the batch is padded
        p32, p16 = probabilities(full, items), probabilities(low, items)
        assert (p32 - p16).abs().max().item() < 0.02
        assert torch.equal(p32.argmax(-1), p16.argmax(-1))


@pytest.fixture(scope="module")
def entailer(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu", max_pixels=1_000_000)


def test_unreadable_image(entailer: Entailer):
    good = encode_image(photo("coffee"))
    with pytest.raises(BadImageError, match="could not be decoded"):
        entailer.prepare(good[: len(good) // 3], "a cup")  # truncated JPEG
    with pytest.raises(UnsupportedImageError):
        entailer.prepare(b"%PDF-1.4 definitely not an image", "a cup")
    with pytest.raises(BadImageError, match="empty"):
        entailer.prepare(b"", "a cup")


def test_decompression_bomb_refused_before_decoding(entailer: Entailer):
    from PIL import Image

    big = encode_image(Image.new("L", (2000, 1000)), "PNG")  # 2 MP > 1 MP limit
    with pytest.raises(ImageTooLargeError, match="2000x1000"):
        entailer.prepare(big, "a blank page")


def test_empty_text(entailer: Entailer):
    data = encode_image(photo("coffee"))
    for text in ("", "   ", "\n"):
        with pytest.raises(BadTextError):
            entailer.prepare(data, text)
