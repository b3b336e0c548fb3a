"""Small randomly initialised checkpoints in the full ModelScope layout.

For tests and offline demos only: the weights are random, so are the verdicts. Every
file written says so. The layout and key names are those of a real checkpoint, so the
same loading code (and ModelScope's reference ``OFAModel``) reads them.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.ofa.checkpoint import IGNORED_KEYS, atomic_write_bytes, atomic_write_json
from worker.ofa.config import OFAConfig
from worker.ofa.model import OFAModel
from worker.ofa.preprocess import VOCAB_DIR

WARNING = (
    "RANDOM WEIGHTS: this checkpoint was written by `ofa-entail model tiny` for tests and "
    "offline demos. Its verdicts are meaningless."
)

TINY = OFAConfig(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    resnet_type="resnet18",
    token_bucket_size=32,
    image_bucket_size=16,
)

# The real OFA-Large shape (random weights), for benchmarks.
LARGE = OFAConfig()


def randomise(model: OFAModel, seed: int) -> None:
    """Fill every parameter and statistic with seeded random values that keep the
    network's activations in a sane range (so outputs differ between inputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            elif isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.uniform_(0.2, 0.6, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
                module.running_mean.normal_(0.0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 0.5, generator=gen)
        for name, param in model.named_parameters():
            if name.endswith("c_attn"):
                param.normal_(1.0, 0.1, generator=gen)


def reference_state_dict(model: OFAModel, seed: int) -> dict[str, torch.Tensor]:
    """Our state dict plus the tensors ModelScope's ``OFAModel`` also holds (image
    generation parts, derivable buffers), so a strict reference load succeeds too."""
    from worker.ofa.model import token_bucket_positions

    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed + 1)
    d, bs = cfg.d_model, cfg.image_bucket_size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_image_rel = (2 * bs - 1) ** 2 + 3
    state["decoder.embed_image_positions.weight"] = torch.randn(bs**2 + 1, d, generator=gen)
    for part in ("image_pos_ln", "code_layernorm_embedding"):
        state[f"decoder.{part}.weight"] = torch.ones(d)
        state[f"decoder.{part}.bias"] = torch.zeros(d)
    n_tables = 1 if cfg.share_attn_bias else cfg.decoder_layers
    for i in range(n_tables):
        state[f"decoder.image_rel_pos_table_list.{i}.weight"] = torch.randn(
            n_image_rel, cfg.decoder_attention_heads, generator=gen
        )
    image_rp = _full_image_bucket_table(bs)
    window = 128 // 8  # ModelScope's default code_image_size // 8
    ids = (torch.arange(window)[None, :] + torch.arange(window)[:, None] * bs + 1).flatten()
    state["encoder.image_rp_bucket"] = image_rp
    state["decoder.image_rp_bucket"] = image_rp.clone()
    state["encoder.token_rp_bucket"] = token_bucket_positions(cfg.token_bucket_size)
    state["decoder.token_rp_bucket"] = token_bucket_positions(cfg.token_bucket_size)
    state["decoder.image_position_idx"] = torch.cat(
        [torch.tensor([0]), ids, torch.full((768,), 1024)]
    )
    assert set(state) >= IGNORED_KEYS, IGNORED_KEYS - set(state)
    return state


def _full_image_bucket_table(bs: int) -> torch.Tensor:
    """The (bs*bs+1)^2 table ModelScope stores as a buffer (index 0 is a special slot)."""
    from worker.ofa.model import image_bucket_positions

    n_rel = (2 * bs - 1) ** 2 + 3
    table = torch.zeros(bs * bs + 1, bs * bs + 1, dtype=torch.long)
    table[1:, 1:] = image_bucket_positions(bs, bs, bs)
    table[0, :] = n_rel - 3
    table[:, 0] = n_rel - 2
    table[0, 0] = n_rel - 1
    return table


def configuration(
    patch_image_size: int, prompt_type: str, max_src_length: int, answer2label: str | None
) -> dict[str, Any]:
    """A ``configuration.json`` for a visual-entailment checkpoint."""
    model: dict[str, Any] = {
        "type": "ofa",
        "language": "en",
        "gen_type": "traverse",
        "patch_image_size": patch_image_size,
        "max_image_size": patch_image_size,
        "max_src_length": max_src_length,
        "prompt_type": prompt_type,
        "imagenet_default_mean_and_std": False,
        "seed": 7,
    }
    if answer2label:
        model["answer2label"] = answer2label
    return {
        "framework": "pytorch",
        "task": "visual-entailment",
        "warning": WARNING,
        "model": model,
        "pipeline": {"type": "visual-entailment"},
    }


def write_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    config: OFAConfig = TINY,
    patch_image_size: int = 128,
    prompt_type: str = "prev_output",
    max_src_length: int = 80,
    answer2label: dict[str, str] | None = None,
    weights_format: str = "bin",
) -> Path:
    """Write a random checkpoint to ``out_dir`` (created; existing files replaced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = OFAModel(replace(config))
    randomise(model, seed)
    state = reference_state_dict(model, seed)

    atomic_write_json(out / "config.json", {**config.to_dict(), "warning": WARNING})
    answer_file = "answer2label.json" if answer2label else None
    atomic_write_json(
        out / "configuration.json",
        configuration(patch_image_size, prompt_type, max_src_length, answer_file),
    )
    if answer2label:
        atomic_write_json(out / "answer2label.json", answer2label)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(VOCAB_DIR / name, out / f".{name}.tmp")
        (out / f".{name}.tmp").replace(out / name)
    if weights_format == "safetensors":
        from safetensors.torch import save

        # safetensors refuses tensors that share memory (the tied embeddings).
        blob = save({k: v.contiguous().clone() for k, v in state.items()}, {"warning": WARNING})
        atomic_write_bytes(out / "model.safetensors", blob)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(out / "pytorch_model.bin", buf.getvalue())
    (out / "README.md").write_text(f"# Random OFA checkpoint\n\n{WARNING}\n", encoding="utf-8")
    return out
