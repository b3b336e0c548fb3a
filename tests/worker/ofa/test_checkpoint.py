"""Bad checkpoints: each a named error that says what is wrong."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from shared.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ModelDownloadError,
    UnsupportedConfigError,
)
from tests.helpers import encode_image, photo
from worker.ofa.checkpoint import load_checkpoint, resolve_model_dir
from worker.ofa.entail import Entailer
from worker.ofa.tiny import write_tiny_checkpoint


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["config.json", "configuration.json", "vocab.json", "merges.txt"])
def test_missing_file_named(tiny_dir: Path, tmp_path: Path, name: str):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(ckpt)


def test_missing_weights(tiny_dir: Path, tmp_path: Path):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin or model\.safetensors"):
        load_checkpoint(ckpt)


def test_missing_and_misshapen_tensors_named(tiny_dir: Path, tmp_path: Path):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    del state["encoder.layers.1.fc2.weight"]
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.layers\.1\.fc2\.weight.*missing"):
        load_checkpoint(ckpt)
    state["encoder.layers.1.fc2.weight"] = torch.zeros(3, 3)
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=r"shape \(3, 3\)"):
        load_checkpoint(ckpt)
    state["encoder.layers.1.fc2.weight"] = torch.zeros(32, 64)
    state["encoder.vit.proj.weight"] = torch.zeros(1)
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_checkpoint(ckpt)


def test_wrong_vocab_size(tiny_dir: Path, tmp_path: Path):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 50265
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocab_size=50265"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "key,value", [("use_ofasys", True), ("resnet_type", "resnet9"), ("activation_function", "tanh")]
)
def test_unsupported_config(tiny_dir: Path, tmp_path: Path, key: str, value: object):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=key):
        load_checkpoint(ckpt)


def test_safetensors_and_prefixed_keys_load_the_same(tiny_dir: Path, tmp_path: Path):
    st = write_tiny_checkpoint(tmp_path / "st", seed=1, weights_format="safetensors")
    assert not (st / "pytorch_model.bin").exists()
    prefixed = copy_ckpt(tiny_dir, tmp_path / "prefixed")
    state = torch.load(prefixed / "pytorch_model.bin", weights_only=True)
    torch.save({f"model.{k}": v for k, v in state.items()}, prefixed / "pytorch_model.bin")
    item = (encode_image(photo("chelsea")), "a cat on a sofa")
    scores = []
    for path in (tiny_dir, st, prefixed):
        ent = Entailer(load_checkpoint(path), device="cpu")
        scores.append(ent.answer_log_probs([ent.prepare(*item)]))
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[0], scores[2])


def test_download_fails_fast_with_instructions(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(ModelDownloadError) as info:
        resolve_model_dir("iic/ofa_visual-entailment_snli-ve_large_en", "master", str(tmp_path))
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "iic/ofa_visual-entailment_snli-ve_large_en" in message
    assert "OFA_MODEL_DIR" in message and "ofa-entail model tiny" in message


def test_path_that_is_not_a_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_model_dir(str(tmp_path / "nope"))
