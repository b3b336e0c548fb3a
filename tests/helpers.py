"""Test-only helpers: sample images and checkpoint variants."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

from worker.ofa.config import OFAConfig

# A second, different architecture: deeper backbone, other widths and buckets, shared
# attention bias, no NormFormer norms, scaled embeddings, ReLU.
OTHER = OFAConfig(
    d_model=48,
    encoder_layers=3,
    decoder_layers=1,
    encoder_attention_heads=6,
    decoder_attention_heads=3,
    encoder_ffn_dim=80,
    decoder_ffn_dim=40,
    resnet_type="resnet50",
    token_bucket_size=16,
    image_bucket_size=10,
    attn_scale_factor=1.0,
    normformer=False,
    share_attn_bias=True,
    scale_embedding=True,
    activation_function="relu",
)

MULTI_TOKEN_ANSWERS = {
    "yes": "entailment",
    "no": "contradiction",
    "it is not possible to tell": "neutral",
}


@cache
def photo(name: str) -> Image.Image:
    """A real photograph shipped with scikit-image."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(arr))


def encode_image(img: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    """Image -> file bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def small_jpeg(seed: int = 0, size: int = 48) -> bytes:
    """A small distinct JPEG (tests that need many different images)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(arr))
