"""The two configuration files of a ModelScope OFA checkpoint, read strictly.

``config.json`` describes the network (what ``OFAConfig`` in ModelScope reads);
``configuration.json`` describes the task (prompt, image size, answer file).
Anything this runtime does not implement is refused with ``UnsupportedConfigError``
instead of being silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from shared.errors import CheckpointError, UnsupportedConfigError

RESNET_LAYERS: dict[str, tuple[int, int, int]] = {
    # OFA builds every variant from bottleneck blocks, resnet18 included.
    "resnet18": (2, 2, 2),
    "resnet34": (3, 4, 6),
    "resnet50": (3, 4, 6),
    "resnet101": (3, 4, 23),
    "resnet152": (3, 8, 36),
}
ACTIVATIONS = ("gelu", "relu", "silu")

HYPOTHESIS_PROMPT = ' does the image describe " {} "?'
PREMISE_PROMPT = ' can image and text1 " {} " imply text2 " {} "?'


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, turning a missing or broken file into ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(str(path), "file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(str(path), f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(str(path), "expected a JSON object")
    return data


@dataclass(frozen=True)
class OFAConfig:
    """Architecture of an OFA encoder-decoder with a ResNet image backbone."""

    vocab_size: int = 59457
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    resnet_type: str = "resnet152"
    token_bucket_size: int = 256
    image_bucket_size: int = 42
    attn_scale_factor: float = 2.0
    normformer: bool = True
    layernorm_embedding: bool = True
    patch_layernorm_embedding: bool = True
    code_layernorm_embedding: bool = True
    add_type_embedding: bool = True
    share_decoder_input_output_embed: bool = True
    share_attn_bias: bool = False
    scale_embedding: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2

    # Keys whose only supported value is fixed; anything else is refused.
    _FIXED: ClassVar[dict[str, bool]] = {
        "use_ofasys": False,
        "entangle_position_embedding": False,
        "use_image_feature": True,
        "encoder_normalize_before": True,
        "decoder_normalize_before": True,
        "use_gamma_feature": False,
        "interpolate_position": False,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> OFAConfig:
        """Build from a ``config.json`` mapping; unknown keys are ignored, bad values refused."""
        for key, wanted in cls._FIXED.items():
            if key in data and bool(data[key]) != wanted:
                raise UnsupportedConfigError(source, key, data[key], repr(wanted))
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in names})
        if cfg.resnet_type not in RESNET_LAYERS:
            raise UnsupportedConfigError(
                source, "resnet_type", cfg.resnet_type, " / ".join(RESNET_LAYERS)
            )
        if cfg.activation_function not in ACTIVATIONS:
            raise UnsupportedConfigError(
                source, "activation_function", cfg.activation_function, " / ".join(ACTIVATIONS)
            )
        for heads_key in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(cfg, heads_key)
            if heads <= 0 or cfg.d_model % heads:
                raise UnsupportedConfigError(
                    source, heads_key, heads, f"a divisor of d_model={cfg.d_model}"
                )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` mapping ModelScope's ``OFAConfig`` reads back identically."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(self._FIXED)
        out.update(model_type="ofa", architectures=["OFAModel"], resnet_model_path=None)
        return out


@dataclass(frozen=True)
class TaskConfig:
    """The visual-entailment part of ``configuration.json``."""

    patch_image_size: int = 480
    max_src_length: int = 256
    prompt_type: str = "none"
    imagenet_default_mean_and_std: bool = False
    prompt: str | None = None
    answer2label: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "configuration.json") -> TaskConfig:
        """Read the ``model`` section, with ModelScope's defaults where keys are absent."""
        task = data.get("task")
        if task is not None and task not in ("visual-entailment", "visual_entailment"):
            raise UnsupportedConfigError(source, "task", task, "'visual-entailment'")
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise CheckpointError(source, "'model' must be an object")
        if model.get("language", "en") != "en":
            raise UnsupportedConfigError(source, "model.language", model.get("language"), "'en'")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in model.items() if k in names})
        if cfg.prompt_type not in ("none", "prev_output"):
            raise UnsupportedConfigError(
                source, "model.prompt_type", cfg.prompt_type, "'none' or 'prev_output'"
            )
        if cfg.patch_image_size <= 0 or cfg.patch_image_size % 16:
            raise UnsupportedConfigError(
                source, "model.patch_image_size", cfg.patch_image_size, "a multiple of 16"
            )
        if cfg.max_src_length <= 0:
            raise UnsupportedConfigError(
                source, "model.max_src_length", cfg.max_src_length, "a positive integer"
            )
        return cfg

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel normalisation constants."""
        if self.imagenet_default_mean_and_std:
            return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
