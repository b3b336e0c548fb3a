"""Visual-entailment scoring: encode once, teacher-force every candidate answer.

As OFA's traverse evaluation does: each answer (" yes", " no", " maybe" unless the
checkpoint names others) followed by eos is scored under a trie constraint (at each
step only tokens that continue some answer are allowed) and its log-probabilities are
summed; a softmax over those sums gives the confidence. When every answer is a
single distinct token the eos step is certain (log-prob 0), so one decoder pass over
the prompt and a softmax over the answer tokens' logits at its last position give
exactly the same numbers; the general path handles multi-token answers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.errors import UnsupportedConfigError
from worker.ofa import resample
from worker.ofa.checkpoint import Checkpoint, load_checkpoint, resolve_model_dir
from worker.ofa.model import EncoderOutput
from worker.ofa.preprocess import (
    EOS,
    PAD,
    decode_and_resize,
    norm_constants,
    normalise,
    resized_pixels,
)

logger = logging.getLogger(__name__)

LABELS = ("entailment", "contradiction", "neutral")
DEFAULT_ANSWER2LABEL = {"yes": "entailment", "no": "contradiction", "maybe": "neutral"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Answers:
    """Candidate answers, their token ids and the label each stands for."""

    names: tuple[str, ...]
    labels: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, answer2label: dict[str, Any] | None, encode: Any, source: str) -> Answers:
        """From a checkpoint's answer file (answer -> label or label index) or yes/no/maybe."""
        mapping = answer2label or DEFAULT_ANSWER2LABEL
        names, labels, tokens = [], [], []
        for answer, value in mapping.items():
            label = value if value in LABELS else DEFAULT_ANSWER2LABEL.get(answer)
            if label is None:
                raise UnsupportedConfigError(
                    source, f"answer {answer!r}", value, "one of " + ", ".join(LABELS)
                )
            ids = tuple(encode(" " + answer))
            if not ids:
                raise UnsupportedConfigError(
                    source, f"answer {answer!r}", answer, "a non-empty answer"
                )
            names.append(answer)
            labels.append(label)
            tokens.append(ids)
        return cls(tuple(names), tuple(labels), tuple(tokens))

    @property
    def single_token(self) -> bool:
        """True when every answer is one token and no two share it."""
        firsts = [t[0] for t in self.tokens]
        return all(len(t) == 1 for t in self.tokens) and len(set(firsts)) == len(firsts)

    def allowed(self, prefix: Sequence[int]) -> set[int]:
        """Tokens that may follow ``prefix`` (answer tokens so far) in the answer trie."""
        n = len(prefix)
        out = set()
        for ids in self.tokens:
            full = (*ids, EOS)
            if n < len(full) and tuple(full[:n]) == tuple(prefix):
                out.add(full[n])
        return out

    @property
    def vocab(self) -> list[int]:
        """Every token the trie can allow, eos included, in a fixed order."""
        return sorted({t for ids in self.tokens for t in ids} | {EOS})


@dataclass
class Prepared:
    """One item after CPU-side preprocessing, ready to batch."""

    pixels: np.ndarray  # (R, R, 3) uint8: normalised on the model's device
    source: list[int]  # bos ... eos
    prompt: list[int]  # decoder prompt


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one item (the service wraps it in ``shared.models.Verdict``)."""

    label: str
    answer: str
    probabilities: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"label": self.label, "answer": self.answer, "probabilities": self.probabilities}


def pick_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pad(rows: Sequence[Sequence[int]], value: int = PAD) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Staging:
    """A reused host buffer that batches of uint8 images are stacked into on their way
    to the device: allocated once (grown to the largest batch seen), page-locked when
    the device is a GPU. Before a batch overwrites it, the previous batch's copy has
    finished (a CUDA event), so the copies themselves never block the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.RLock()
        self._buffer: torch.Tensor | None = None
        self._copied: Any = None  # torch.cuda.Event of the last copy

    def upload(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        with self.lock:
            n, shape = len(arrays), arrays[0].shape
            buf = self._buffer
            if buf is None or buf.shape[0] < n or tuple(buf.shape[1:]) != shape:
                buf = torch.empty(
                    (n, *shape), dtype=torch.uint8, pin_memory=self.device.type == "cuda"
                )
                self._buffer = buf
            elif self._copied is not None:
                self._copied.synchronize()
            host = buf[:n]
            np.stack(arrays, out=host.numpy())
            if self.device.type != "cuda":
                return host
            on_device = host.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            return on_device


class Entailer:
    """A loaded checkpoint on a device, scoring batches of (image, text) items."""

    def __init__(
        self,
        ckpt: Checkpoint,
        device: str = "auto",
        dtype: str = "auto",
        fuse_batchnorm: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.ckpt = ckpt
        self.task = ckpt.task
        self.text = ckpt.text
        self.device = pick_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, not {dtype!r}")
        if self.device.type == "cpu" and dtype == "float16":
            raise ValueError("on the CPU the runtime computes in float32 or bfloat16")
        self.dtype = DTYPES[dtype]
        self.max_pixels = max_pixels
        self.answers = Answers.build(
            ckpt.answer2label, self.text.encode, str(ckpt.path / "configuration.json")
        )
        model = ckpt.model
        if fuse_batchnorm:
            model.fuse_batchnorm()
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            # oneDNN convolutions are fastest on channels-last tensors.
            self.model.encoder.embed_images.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._answer_vocab = torch.tensor(self.answers.vocab, device=self.device)
        self._staging = Staging(self.device)
        self._norm = norm_constants(self.task, self.device)
        resample.warm_up()  # the resize kernels compiled before the first job

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str],
        revision: str | None = None,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> Entailer:
        """Resolve a directory or model id, load it, and move it to the device."""
        path = resolve_model_dir(model, revision, cache_dir)
        return cls(load_checkpoint(Path(path)), **kwargs)

    # -- preprocessing (CPU, thread-safe) --

    def prepare(
        self,
        image: bytes | Image.Image,
        text: str,
        premise: str | None = None,
        source: list[int] | None = None,
    ) -> Prepared:
        """Decode and resize the image, build the prompt ids (``source``: already built,
        by ``TextEncoder.source_ids_many``). Raises ``BadInputError``s."""
        if source is None:
            source = self.text.source_ids(text, premise)
        size = self.task.patch_image_size
        if isinstance(image, Image.Image):
            pixels = resized_pixels(image, size)
        else:
            pixels = decode_and_resize(image, self.max_pixels, size)
        return self.prepare_resized(pixels, text, premise, source)

    def prepare_resized(
        self,
        pixels: np.ndarray,
        text: str,
        premise: str | None = None,
        source: list[int] | None = None,
    ) -> Prepared:
        """``prepare`` for an image already decoded and resized elsewhere
        (``preprocess.decode_and_resize_many`` in a preprocessing process): identical."""
        if source is None:
            source = self.text.source_ids(text, premise)
        return Prepared(pixels, source, self.text.decoder_prompt(source))

    @property
    def image_size(self) -> int:
        """The side the model's images are resized to."""
        return self.task.patch_image_size

    # -- the network --

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def upload(self, batch: Sequence[Prepared]) -> torch.Tensor:
        """The batch's (B, R, R, 3) uint8 pixels on the device: stacked into a reused
        host buffer (page-locked on CUDA, so the copy runs asynchronously at full bus
        speed) and copied. On the CPU the result is that buffer: valid until the next
        call, so ``pixels`` holds the buffer's lock until it has normalised it."""
        return self._staging.upload([p.pixels for p in batch])

    def pixels(self, batch: Sequence[Prepared]) -> torch.Tensor:
        """The batch's images as the network reads them: (B, 3, R, R) float32 on the
        device, normalised there (a quarter of the bytes cross the bus)."""
        with self._staging.lock:
            images = normalise(self.upload(batch), *self._norm)
        if self.device.type == "cpu":
            # oneDNN convolutions are fastest on channels-last tensors.
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def encode(self, batch: Sequence[Prepared]) -> EncoderOutput:
        """Run the encoder over a batch (no grad, device dtype)."""
        tokens = _pad([p.source for p in batch]).to(self.device, non_blocking=True)
        images = self.pixels(batch)
        with torch.inference_mode(), self._autocast():
            return self.model.encoder(tokens, images)

    def answer_log_probs(self, batch: Sequence[Prepared]) -> torch.Tensor:
        """(B, A) summed log-probabilities of each answer + eos, float32 on the CPU.

        On the CPU items run one at a time: each already gives the matrix products
        ~P+L rows, so a bigger batch buys no efficiency, while padding a mixed batch
        makes every layer build a (B, H, S, S) attention mask (measured: batch 16 ran
        at 0.72x the per-item rate at the OFA-Large shape). Accelerators get the batch whole.
        """
        if not batch:
            return torch.empty(0, len(self.answers.names))
        if self.device.type == "cpu" and len(batch) > 1:
            return torch.cat([self._answer_log_probs(batch[i : i + 1]) for i in range(len(batch))])
        return self._answer_log_probs(batch)

    def _answer_log_probs(self, batch: Sequence[Prepared]) -> torch.Tensor:
        enc = self.encode(batch)
        with torch.inference_mode(), self._autocast():
            if self.answers.single_token:
                scores = self._score_single_token(batch, enc)
            else:
                scores = self._score_trie(batch, enc)
        return scores.float().cpu()

    def _project(self, hidden: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """Logits of the ``vocab`` tokens only: (M, D) -> (M, V'). Avoids the full vocabulary."""
        weight = self.model.decoder.output_projection.weight[vocab]
        return (hidden @ weight.t().to(hidden.dtype)).float()

    def _score_single_token(self, batch: Sequence[Prepared], enc: EncoderOutput) -> torch.Tensor:
        prompts = [p.prompt for p in batch]
        hidden = self.model.decoder(_pad(prompts).to(self.device), enc)  # (B, T, D)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        h = hidden[torch.arange(len(batch), device=self.device), last]  # (B, D)
        firsts = torch.tensor([t[0] for t in self.answers.tokens], device=self.device)
        return torch.log_softmax(self._project(h, firsts), dim=-1)  # (B, A)

    def _score_trie(self, batch: Sequence[Prepared], enc: EncoderOutput) -> torch.Tensor:
        answers = self.answers
        n_ans = len(answers.tokens)
        vocab = answers.vocab
        column = {tok: i for i, tok in enumerate(vocab)}
        rows, positions, targets, allowed = [], [], [], []
        seqs = []
        for i, item in enumerate(batch):
            for a, ids in enumerate(answers.tokens):
                r = i * n_ans + a
                seqs.append([*item.prompt, *ids])
                full = (*ids, EOS)
                for k in range(len(full)):
                    rows.append(r)
                    positions.append(len(item.prompt) - 1 + k)
                    targets.append(column[full[k]])
                    mask = [False] * len(vocab)
                    for tok in answers.allowed(ids[:k]):
                        mask[column[tok]] = True
                    allowed.append(mask)
        expanded = EncoderOutput(
            enc.hidden.repeat_interleave(n_ans, dim=0),
            enc.padding_mask.repeat_interleave(n_ans, dim=0),
            enc.position,
        )
        hidden = self.model.decoder(_pad(seqs).to(self.device), expanded)  # (B*A, T, D)
        dev = self.device
        h = hidden[torch.tensor(rows, device=dev), torch.tensor(positions, device=dev)]
        logits = self._project(h, torch.tensor(vocab, device=dev))  # (M, V')
        logits = logits.masked_fill(~torch.tensor(allowed, device=dev), float("-inf"))
        picked = torch.log_softmax(logits, dim=-1).gather(
            1, torch.tensor(targets, device=dev)[:, None]
        )[:, 0]
        total = torch.zeros(len(batch) * n_ans, device=dev)
        total.index_add_(0, torch.tensor(rows, device=dev), picked)
        return total.view(len(batch), n_ans)

    # -- verdicts --

    def predictions(self, scores: torch.Tensor) -> list[Prediction]:
        """Turn (B, A) answer scores into verdicts with a probability for every label."""
        probs = torch.softmax(scores.double(), dim=-1)
        out = []
        for row in probs:
            per_label = dict.fromkeys(LABELS, 0.0)
            for p, label in zip(row.tolist(), self.answers.labels, strict=True):
                per_label[label] += p
            best = int(row.argmax())
            out.append(Prediction(self.answers.labels[best], self.answers.names[best], per_label))
        return out

    def score(self, batch: Sequence[Prepared]) -> list[Prediction]:
        """Predictions for a batch of prepared items, each equal to scoring it alone."""
        return self.predictions(self.answer_log_probs(batch))

    def predict(
        self, image: bytes | Image.Image, text: str, premise: str | None = None
    ) -> Prediction:
        """One item, start to finish."""
        return self.score([self.prepare(image, text, premise)])[0]


__all__ = ["LABELS", "Answers", "Entailer", "Prediction", "Prepared"]
