"""bfloat16 (what a GPU worker runs by default) through the same code as float32:
padded batches of mixed text lengths included, whose attention masks must fit the
low-precision dtype, and probabilities close to float32's."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import photo
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer

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
