"""Finding, checking and loading ModelScope OFA checkpoints.

A checkpoint is a directory: ``config.json``, ``configuration.json``, weights
(``pytorch_model.bin`` or ``model.safetensors``), ``vocab.json``, ``merges.txt`` and
optionally the answer file named by ``configuration.json``'s ``model.answer2label``.
A model id is fetched with ``modelscope.snapshot_download``; failing that, the error
names the id and how to run from a local directory instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from shared.errors import CheckpointError, CheckpointMismatchError, ModelDownloadError
from worker.ofa.config import OFAConfig, TaskConfig, read_json
from worker.ofa.model import OFAModel
from worker.ofa.preprocess import N_BIN_TOKENS, N_CODE_TOKENS, TextEncoder

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
PREFLIGHT_TIMEOUT_S = 3.0

# Parts of ModelScope's OFAModel used only for image generation (code tokens) or
# derivable from the config; a checkpoint may hold them, visual entailment never reads them.
IGNORED_PREFIXES = (
    "decoder.embed_image_positions.",
    "decoder.image_pos_ln.",
    "decoder.code_layernorm_embedding.",
    "decoder.image_rel_pos_table_list.",
)
IGNORED_KEYS = {
    "encoder.image_rp_bucket",
    "encoder.token_rp_bucket",
    "decoder.image_rp_bucket",
    "decoder.token_rp_bucket",
    "decoder.image_position_idx",
}


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or (os.sep in ref and Path(ref).exists())


def resolve_model_dir(
    model: str | os.PathLike[str], revision: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local directory as is; otherwise a ModelScope id downloaded into ``cache_dir``.

    Raises ``ModelDownloadError`` (within seconds when the hub is unreachable) when the
    id cannot be fetched, and ``CheckpointError`` for a path that is not a directory.
    """
    ref = str(model)
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(ref) or path.exists():
        raise CheckpointError(ref, "no such checkpoint directory")
    return _download(ref, revision, cache_dir)


def hub_endpoint() -> str:
    """The ModelScope hub's base URL (``MODELSCOPE_DOMAIN`` and friends respected)."""
    try:
        from modelscope.hub.utils.utils import get_endpoint

        return str(get_endpoint())
    except Exception:  # older or newer modelscope layouts
        return "https://www.modelscope.cn"


def check_reachable(url: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to ``url``'s host opens within ``timeout``, else why not."""
    parsed = urlsplit(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"the model hub {host}:{port} cannot be reached ({exc})"


def _download(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """Fetch a snapshot; fail fast (seconds, not minutes of retries) when offline."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # pragma: no cover - modelscope is a worker dependency
        raise ModelDownloadError(model_id, revision, "the modelscope package is missing") from exc
    problem = check_reachable(hub_endpoint())
    if problem:
        raise ModelDownloadError(model_id, revision, problem)
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if revision:
        kwargs["revision"] = revision
    try:
        return Path(snapshot_download(model_id, **kwargs))
    except Exception as exc:
        raise ModelDownloadError(model_id, revision, f"{type(exc).__name__}: {exc}") from exc


def read_state_dict(model_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Load the weights file, whichever of the two names it has, onto the CPU."""
    for name in WEIGHT_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(str(path), f"weights could not be read ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(str(path), "expected a state dict (a mapping of tensors)")
        if state and all(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return state, path
    raise CheckpointError(str(model_dir), f"no weights file ({' or '.join(WEIGHT_FILES)})")


def load_weights(model: OFAModel, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` into ``model`` strictly: every tensor present, known and of its shape."""
    expected = model.state_dict()
    state = dict(state)
    source_key = "encoder.embed_tokens.weight"
    tied = {"decoder.embed_tokens.weight"}
    if model.cfg.share_decoder_input_output_embed:
        tied.add("decoder.output_projection.weight")
    for alias in tied:
        # The shared token table is saved under up to three names; one is enough.
        if alias not in state and source_key in state:
            state[alias] = state[source_key]
    for key, want in expected.items():
        if key not in state:
            raise CheckpointMismatchError(str(source), key, "missing")
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointMismatchError(
                str(source), key, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
    for key in state:
        if key in expected or key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        raise CheckpointMismatchError(
            str(source), key, "unexpected (is this an OFA checkpoint of another architecture?)"
        )
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


@dataclass
class Checkpoint:
    """Everything read from a checkpoint directory, the network still on the CPU."""

    path: Path
    config: OFAConfig
    task: TaskConfig
    text: TextEncoder
    answer2label: dict[str, Any] | None
    model: OFAModel
    warning: str | None = None  # e.g. "RANDOM WEIGHTS" on checkpoints `model tiny` wrote


def load_checkpoint(model_dir: Path) -> Checkpoint:
    """Read and check every file of a checkpoint directory; build the network in eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(str(model_dir), "no such checkpoint directory")
    raw_config = read_json(model_dir / "config.json")
    config = OFAConfig.from_dict(raw_config, str(model_dir / "config.json"))
    task = TaskConfig.from_dict(
        read_json(model_dir / "configuration.json"), str(model_dir / "configuration.json")
    )
    for name in ("vocab.json", "merges.txt"):
        if not (model_dir / name).is_file():
            raise CheckpointError(str(model_dir / name), "file is missing")
    try:
        text = TextEncoder(model_dir / "vocab.json", model_dir / "merges.txt", task)
    except Exception as exc:
        raise CheckpointError(str(model_dir / "vocab.json"), f"tokenizer failed ({exc})") from exc
    if text.vocab_size != config.vocab_size:
        raise CheckpointError(
            str(model_dir / "vocab.json"),
            f"holds {text.base_size} BPE tokens, {text.vocab_size} with the "
            f"{N_CODE_TOKENS} <code_i> and {N_BIN_TOKENS} <bin_i> tokens, but config.json "
            f"says vocab_size={config.vocab_size}",
        )
    answer2label = None
    if task.answer2label:
        answer_path = model_dir / task.answer2label
        answer2label = read_json(answer_path)
        if not answer2label:
            raise CheckpointError(str(answer_path), "no answers")

    state, weights_path = read_state_dict(model_dir)
    model = OFAModel(config)
    load_weights(model, state, weights_path)
    model.eval()
    logger.info("loaded %s (%s, d_model=%d)", model_dir, config.resnet_type, config.d_model)
    warning = raw_config.get("warning")
    if warning:
        logger.warning("%s: %s", model_dir, warning)
    return Checkpoint(model_dir, config, task, text, answer2label, model, warning)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """``atomic_write_bytes`` for a JSON document."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())
