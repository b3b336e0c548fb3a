"""Images travel as uint8 into one reused host buffer and are normalised on the device,
to the same float32 numbers the reference's ToTensor + Normalize give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers import photo
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
