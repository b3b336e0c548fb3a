"""ModelScope's own OFA code, importable here for equivalence tests only.

ModelScope's OFA package imports fairseq (which does not install on Python 3.11+),
and its preprocessors import torchaudio and torchvision (no working CPU build here).
Nothing on the visual-entailment forward path uses them, so this module puts small
stand-ins in ``sys.modules`` before importing:

- fairseq: ``LayerNorm`` is ``torch.nn.LayerNorm`` (what fairseq's is on CPU); every
  other symbol the imports touch is a placeholder that raises if it is ever called.
- torchaudio: an empty module (only the speech preprocessors use it).
- torchvision: the real package's files, loaded without its ``__init__`` (which loads
  CUDA operators that fail on a CPU torch): ``torchvision.transforms`` is the genuine
  transform code ModelScope's preprocessor uses.

Never imported by the service.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch


def _placeholder(name: str) -> Any:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"test stand-in: fairseq {name} is not available")

    return type(name, (), {"__init__": fail, "__call__": fail})


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # type: ignore[attr-defined]
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = mod
    return mod


def _install_fairseq() -> None:
    if "fairseq" in sys.modules:
        return
    _module("fairseq", utils=None)
    _module("fairseq.data")
    _module("fairseq.data.data_utils", compute_mask_indices=_placeholder("compute_mask_indices"))
    _module("fairseq.models")
    _module("fairseq.models.wav2vec")
    _module(
        "fairseq.models.wav2vec.wav2vec2",
        TransformerSentenceEncoderLayer=_placeholder("TransformerSentenceEncoderLayer"),
    )
    _module(
        "fairseq.modules",
        LayerNorm=torch.nn.LayerNorm,
        SamePad=_placeholder("SamePad"),
        TransposeLast=_placeholder("TransposeLast"),
    )
    _module(
        "fairseq.modules.transformer_sentence_encoder",
        init_bert_params=_placeholder("init_bert_params"),
    )
    _module("fairseq.modules.fairseq_dropout", FairseqDropout=_placeholder("FairseqDropout"))
    _module("fairseq.modules.quant_noise", quant_noise=_placeholder("quant_noise"))
    _module("fairseq.incremental_decoding_utils", with_incremental_state=lambda cls: cls)
    sys.modules["fairseq"].utils = _module("fairseq.utils", index_put=_placeholder("index_put"))


def _package_without_init(name: str) -> None:
    """Make ``name``'s submodules importable without running its ``__init__``."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the test extra needs {name}'s files (pip install -e .[test])")
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
    pkg.__file__ = str(Path(pkg.__path__[0]) / "__init__.py")
    pkg.__spec__ = spec
    sys.modules[name] = pkg


def _install_torchvision() -> None:
    _package_without_init("torchvision")
    if "torchaudio" not in sys.modules:
        _module("torchaudio")
    # The OFA preprocessor package's __init__ imports every task's preprocessor
    # (speech, OCR, text-to-SQL: librosa, timm, ...); the visual-entailment one needs none.
    importlib.import_module("modelscope.preprocessors")
    _package_without_init("modelscope.preprocessors.ofa")


# transformers decides at import which optional packages exist: let it look at the
# real environment before any stand-in is in place.
import transformers  # noqa: E402, F401

_install_fairseq()
_install_torchvision()

from modelscope.models.multi_modal.ofa.configuration_ofa import (  # noqa: E402
    OFAConfig as RefConfig,
)
from modelscope.models.multi_modal.ofa.modeling_ofa import OFAModel as RefModel  # noqa: E402
from modelscope.models.multi_modal.ofa.modeling_ofa import _expand_mask as expand_mask  # noqa: E402
from modelscope.models.multi_modal.ofa.tokenization_ofa import OFATokenizer  # noqa: E402
from modelscope.preprocessors.ofa.visual_entailment import (  # noqa: E402
    OfaVisualEntailmentPreprocessor,
)
from modelscope.utils.config import Config  # noqa: E402


def load_reference_model(model_dir: Path) -> Any:
    """ModelScope's ``OFAModel`` with the checkpoint's weights (strict), in eval mode."""
    config = RefConfig.from_json_file(str(model_dir / "config.json"))
    model = RefModel(config)
    state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model.eval()


def reference_preprocessor(model_dir: Path) -> Any:
    """ModelScope's visual-entailment preprocessor for a checkpoint, inference mode."""
    cfg = Config.from_file(str(model_dir / "configuration.json"))
    return OfaVisualEntailmentPreprocessor(cfg, str(model_dir))


__all__ = [
    "OFATokenizer",
    "RefConfig",
    "RefModel",
    "expand_mask",
    "load_reference_model",
    "reference_preprocessor",
]
