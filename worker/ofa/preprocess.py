"""Turning an image and sentences into what the network reads, as ModelScope does.

Text: ``pre_caption`` normalisation, the visual-entailment prompt, byte-level BPE on
OFA's vocabulary, cut to ``max_src_length`` tokens, wrapped in bos/eos.
Image: EXIF orientation, RGB, bicubic resize to a square (uint8, on the CPU; Pillow's
arithmetic, vectorised: ``resample``); scaled to [0, 1] and normalised on the model's
device (``normalise``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import ByteLevelBPETokenizer

from shared.errors import BadInputError, BadTextError
from shared.images import open_image
from shared.text import pre_caption
from worker.ofa.config import HYPOTHESIS_PROMPT, PREMISE_PROMPT, TaskConfig
from worker.ofa.resample import decode_resize_jpeg, resize_bicubic

VOCAB_DIR = Path(__file__).parent / "vocab"
N_CODE_TOKENS = 8192
N_BIN_TOKENS = 1000
EXTRA_TOKENS = [f"<code_{i}>" for i in range(N_CODE_TOKENS)] + [
    f"<bin_{i}>" for i in range(N_BIN_TOKENS)
]
BOS, PAD, EOS, UNK = 0, 1, 2, 3

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TextEncoder",
    "decode_and_resize",
    "decode_and_resize_many",
    "norm_constants",
    "normalise",
    "open_image",
    "resized_pixels",
]


class TextEncoder:
    """OFA's English tokenizer and the visual-entailment prompts."""

    def __init__(self, vocab_json: Path, merges_txt: Path, task: TaskConfig) -> None:
        self.tokenizer = ByteLevelBPETokenizer.from_file(
            str(vocab_json), str(merges_txt), add_prefix_space=False
        )
        # ModelScope's preprocessor appends the image-code and bin tokens after the BPE
        # vocabulary; text that spells one of them maps to its id there too.
        self.base_size = self.tokenizer.get_vocab_size()
        self.tokenizer.add_tokens(EXTRA_TOKENS)
        self.task = task

    @property
    def vocab_size(self) -> int:
        """BPE tokens plus the appended code and bin tokens."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without special tokens."""
        return list(self.tokenizer.encode(text).ids)

    def prompt(self, hypothesis: str, premise: str | None = None) -> str:
        """The instruction the model reads, after ``pre_caption`` on each text."""
        n = self.task.max_src_length
        hyp = pre_caption(hypothesis, n)
        if premise is None:
            return (self.task.prompt or HYPOTHESIS_PROMPT).format(hyp)
        return (self.task.prompt or PREMISE_PROMPT).format(pre_caption(premise, n), hyp)

    def source_ids(self, hypothesis: str, premise: str | None = None) -> list[int]:
        """bos + prompt ids (cut to ``max_src_length``) + eos.

        Over-long text is truncated, never refused: the API limits text length before
        anything reaches the model.
        """
        return self._wrapped(self.encode(self._checked_prompt(hypothesis, premise)))

    def source_ids_many(
        self, texts: Sequence[tuple[str, str | None]]
    ) -> list[list[int] | BadInputError]:
        """``source_ids`` for each (hypothesis, premise), tokenised in one call (the
        tokenizer's batch encoding: about half the time a text, without the
        interpreter lock); an item's ``BadTextError`` in its place."""
        refused: list[BadInputError | None] = []
        prompts: list[str] = []
        for hypothesis, premise in texts:
            try:
                prompts.append(self._checked_prompt(hypothesis, premise))
                refused.append(None)
            except BadTextError as exc:
                refused.append(exc)
        encoded = iter(self.tokenizer.encode_batch(prompts) if prompts else [])
        return [exc if exc is not None else self._wrapped(next(encoded).ids) for exc in refused]

    def _checked_prompt(self, hypothesis: str, premise: str | None) -> str:
        if not hypothesis or not hypothesis.strip():
            raise BadTextError("text is empty")
        return self.prompt(hypothesis, premise)

    def _wrapped(self, ids: Sequence[int]) -> list[int]:
        return [BOS, *ids[: self.task.max_src_length], EOS]

    def decoder_prompt(self, source: list[int]) -> list[int]:
        """What the decoder is fed before the answer: bos, or the source without eos."""
        if self.task.prompt_type == "prev_output":
            return source[:-1]
        return [BOS]


def resized_pixels(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (R, R, 3) uint8, resized bicubically: the costly part of the
    preprocessing, and the compact form items travel in (a quarter of float32's bytes)
    until ``normalise`` runs on the model's device."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return resize_bicubic(rgb, size)  # Pillow's BICUBIC, the same bytes, faster


def decode_and_resize(data: bytes, max_pixels: int, size: int) -> np.ndarray:
    """Image bytes -> (R, R, 3) uint8 (top level: runs in preprocessing processes too):
    a plain JPEG straight through libjpeg-turbo, any other image through Pillow
    (``open_image``), the same bytes either way. Raises the same ``BadInputError``s as
    ``open_image``."""
    pixels = decode_resize_jpeg(data, max_pixels, size)
    if pixels is not None:
        return pixels
    return resized_pixels(open_image(data, max_pixels), size)


def decode_and_resize_many(
    blobs: Sequence[bytes], max_pixels: int, size: int
) -> list[np.ndarray | BadInputError]:
    """``decode_and_resize`` for each of ``blobs``, in one call (one round trip to a
    preprocessing process for a whole share of a chunk): pixels, or the item's
    ``BadInputError`` in its place."""
    out: list[np.ndarray | BadInputError] = []
    for blob in blobs:
        try:
            out.append(decode_and_resize(blob, max_pixels, size))
        except BadInputError as exc:
            out.append(exc)
    return out


def norm_constants(task: TaskConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's per-channel mean and std as (1, 3, 1, 1) float32 tensors on ``device``
    (made once: a small tensor copied to a GPU per batch would stall its stream)."""
    mean, std = task.mean_std
    shape = (1, 3, 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, R, R, 3) uint8 on any device -> (B, 3, R, R) float32 scaled to [0, 1] and
    normalised with ``norm_constants``, on the same device: as torchvision's
    ``ToTensor`` and ``Normalize`` in ModelScope's preprocessor (the same float32
    operations, so the same numbers)."""
    images = pixels.permute(0, 3, 1, 2).contiguous().float()
    return images.div_(255).sub_(mean).div_(std)
