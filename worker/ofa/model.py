"""OFA's encoder-decoder, as much of it as visual entailment needs, in plain torch.

Reads top to bottom: relative-position tables, the ResNet image backbone, attention,
encoder and decoder layers, the encoder, the decoder, and the model that ties them.
Module and parameter names follow ModelScope's ``OFAModel`` so its ``state_dict``
loads as is. Shapes: B batch, L text tokens, P image patches, S = P + L encoder
positions, T decoder positions, D d_model, H heads.

Numerics follow the reference: pre-norm layers with NormFormer's extra norms, a
learned per-head output scale (``c_attn``), absolute position bias built from
separate position embeddings (no position is added to the token stream), and
bucketed relative position bias for text and for image patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.ofa.config import RESNET_LAYERS, OFAConfig


def _masked(bias: Tensor, mask: Tensor) -> Tensor:
    """``bias`` with the masked positions at the most negative value of its own dtype
    (float32's would overflow a bfloat16 or float16 bias under autocast)."""
    return bias.masked_fill(mask, torch.finfo(bias.dtype).min)


# --- relative position buckets ------------------------------------------------------


def token_bucket_positions(bucket_size: int, max_position: int = 1024) -> Tensor:
    """Bucket index of every (query, key) text-position pair: (max_position, max_position).

    Distances under half the bucket size keep their own bucket; longer ones share
    log-spaced buckets. Indices are shifted to start at 0.
    """
    pos = torch.arange(max_position, dtype=torch.long)
    rel = pos[:, None] - pos[None, :]
    half = bucket_size // 2
    sign = torch.sign(rel)
    dist = torch.where((rel < half) & (rel > -half), half - 1, rel.abs())
    log_bucket = (
        torch.ceil(torch.log(dist / half) / math.log((max_position - 1) / half) * (half - 1)) + half
    )
    bucket = torch.where(dist.le(half), rel, log_bucket.int() * sign).long()
    return bucket + bucket_size - 1


def image_bucket_positions(height: int, width: int, bucket_size: int) -> Tensor:
    """Bucket index of every (query, key) pair of patches on a height x width grid: (P, P)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    d_row = rows[:, None] - rows[None, :] + bucket_size - 1
    d_col = cols[:, None] - cols[None, :] + bucket_size - 1
    return d_row * (2 * bucket_size - 1) + d_col


def image_position_ids(height: int, width: int, bucket_size: int) -> Tensor:
    """Absolute position id of each patch, row-major, 0 reserved: (P,)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return rows * bucket_size + cols + 1


# --- image backbone -----------------------------------------------------------------


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, strided 3x3, 1x1), stride on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """The first three stages of a ResNet: (B, 3, R, R) -> (B, 1024, R/16, R/16)."""

    def __init__(self, blocks: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, blocks[0], stride=1)
        self.layer2 = self._stage(256, 128, blocks[1], stride=2)
        self.layer3 = self._stage(512, 256, blocks[2], stride=2)

    @staticmethod
    def _stage(in_ch: int, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_ch, planes, stride)]
        layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


# --- attention ----------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with an additive bias and a learned per-head output scale."""

    def __init__(self, dim: int, heads: int, scale_factor: float) -> None:
        super().__init__()
        assert dim % heads == 0, (dim, heads)
        self.heads = heads
        self.head_dim = dim // heads
        self.scaling = float(self.head_dim * scale_factor) ** -0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.c_attn = nn.Parameter(torch.ones(heads))

    def _split(self, x: Tensor) -> Tensor:  # (B, N, D) -> (B, H, N, Dh)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor, bias: Tensor) -> Tensor:
        """x: (B, Tq, D) queries; memory: (B, Tk, D) keys/values; bias: broadcastable to
        (B, H, Tq, Tk), masked entries at a very negative value."""
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(memory))
        v = self._split(self.v_proj(memory))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), scale=self.scaling
        )
        out = out * self.c_attn.to(out.dtype)[:, None, None]  # (B, H, Tq, Dh)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[name]


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a NormFormer mid norm."""

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d, f = cfg.d_model, cfg.encoder_ffn_dim
        self.self_attn = Attention(d, cfg.encoder_attention_heads, cfg.attn_scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = nn.LayerNorm(d) if cfg.normformer else None
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.activation = _activation(cfg.activation_function)
        self.ffn_layer_norm = nn.LayerNorm(f) if cfg.normformer else None
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, bias)
        if self.self_attn_mid_layer_norm is not None:
            h = self.self_attn_mid_layer_norm(h)
        x = x + h
        h = self.activation(self.fc1(self.final_layer_norm(x)))
        if self.ffn_layer_norm is not None:
            h = self.ffn_layer_norm(h)
        return x + self.fc2(h)


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        d, f, heads = cfg.d_model, cfg.decoder_ffn_dim, cfg.decoder_attention_heads
        self.self_attn = Attention(d, heads, cfg.attn_scale_factor)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn_mid_layer_norm = nn.LayerNorm(d) if cfg.normformer else None
        self.cross_attn = Attention(d, heads, cfg.attn_scale_factor)
        self.cross_attn_layer_norm = nn.LayerNorm(d)
        self.cross_attn_mid_layer_norm = nn.LayerNorm(d) if cfg.normformer else None
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.activation = _activation(cfg.activation_function)
        self.ffn_layer_norm = nn.LayerNorm(f) if cfg.normformer else None
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, memory: Tensor, self_bias: Tensor, cross_bias: Tensor) -> Tensor:
        h = self.self_attn_layer_norm(x)
        h = self.self_attn(h, h, self_bias)
        if self.self_attn_mid_layer_norm is not None:
            h = self.self_attn_mid_layer_norm(h)
        x = x + h
        h = self.cross_attn(self.cross_attn_layer_norm(x), memory, cross_bias)
        if self.cross_attn_mid_layer_norm is not None:
            h = self.cross_attn_mid_layer_norm(h)
        x = x + h
        h = self.activation(self.fc1(self.final_layer_norm(x)))
        if self.ffn_layer_norm is not None:
            h = self.ffn_layer_norm(h)
        return x + self.fc2(h)


def _abs_position_bias(
    q_pos: Tensor,
    k_pos: Tensor,
    q_linear: nn.Linear,
    k_linear: nn.Linear,
    heads: int,
    scaling: float,
) -> Tensor:
    """Content-free attention bias from position embeddings: (1, Nq, D), (1, Nk, D) ->
    (1, H, Nq, Nk)."""
    q = q_linear(q_pos).unflatten(-1, (heads, -1)).transpose(1, 2) * scaling
    k = k_linear(k_pos).unflatten(-1, (heads, -1)).transpose(1, 2)
    return q @ k.transpose(2, 3)


# --- encoder ------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """What the decoder needs from the encoder."""

    hidden: Tensor  # (B, S, D)
    padding_mask: Tensor  # (B, S), True at padding
    position: Tensor  # (1, S, D), normalised position embeddings, same for every item


class Encoder(nn.Module):
    """Image patches then text tokens, one transformer stack over both."""

    token_rp_bucket: Tensor

    def __init__(self, cfg: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.encoder_attention_heads
        self.cfg = cfg
        self.heads = heads
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        self.type_embedding = nn.Embedding(2, d) if cfg.add_type_embedding else None
        self.embed_images = ResNet(RESNET_LAYERS[cfg.resnet_type])
        self.image_proj = nn.Linear(1024, d)
        self.layernorm_embedding = nn.LayerNorm(d) if cfg.layernorm_embedding else None
        self.patch_layernorm_embedding = nn.LayerNorm(d) if cfg.patch_layernorm_embedding else None
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, d)
        self.embed_image_positions = nn.Embedding(cfg.image_bucket_size**2 + 1, d)
        self.pos_ln = nn.LayerNorm(d)
        self.image_pos_ln = nn.LayerNorm(d)
        self.pos_scaling = float(d / heads * cfg.attn_scale_factor) ** -0.5
        self.pos_q_linear = nn.Linear(d, d)
        self.pos_k_linear = nn.Linear(d, d)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        n_tables = 1 if cfg.share_attn_bias else cfg.encoder_layers
        n_image_rel = (2 * cfg.image_bucket_size - 1) ** 2 + 3
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(n_tables)
        )
        self.image_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(n_image_rel, heads) for _ in range(n_tables)
        )
        self.register_buffer(
            "token_rp_bucket", token_bucket_positions(cfg.token_bucket_size), persistent=False
        )
        # (h, w, dtype) -> (text capacity, positions, per-layer biases); see position_biases.
        self._bias_cache: dict[tuple[int, int, torch.dtype], tuple[int, Tensor, list[Tensor]]] = {}

    def embed_image(self, images: Tensor) -> tuple[Tensor, int, int]:
        """(B, 3, R, R) pixels -> (B, P, D) patch embeddings and the patch grid size."""
        feats = self.embed_images(images)  # (B, 1024, h, w)
        h, w = feats.shape[-2:]
        if h > self.cfg.image_bucket_size or w > self.cfg.image_bucket_size:
            raise ValueError(
                f"a {h}x{w} patch grid exceeds image_bucket_size={self.cfg.image_bucket_size}"
            )
        x = self.image_proj(feats.flatten(2).transpose(1, 2)) * self.embed_scale
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[1]
        if self.patch_layernorm_embedding is not None:
            x = self.patch_layernorm_embedding(x)
        return x, h, w

    def embed_text(self, tokens: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, D)."""
        x = self.embed_tokens(tokens) * self.embed_scale
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[0]
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return x

    def position_biases(
        self, h: int, w: int, text_len: int, dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor]]:
        """Position embeddings (1, S, D) and each layer's attention bias (1, H, S, S).

        Neither depends on the item, only on the patch grid and the positions, and the
        entries for text positions 0..L-1 are the same whatever L is: so they are built
        once per grid for a text length of at least ``text_len`` and sliced per call.
        """
        key = (h, w, dtype)
        cached = self._bias_cache.get(key)
        if cached is None or cached[0] < text_len:
            cap = max(text_len, 2 * cached[0] if cached else 64)
            self._bias_cache[key] = (cap, *self._build_position_biases(h, w, cap, dtype))
            cached = self._bias_cache[key]
        _, position, biases = cached
        S = h * w + text_len
        return position[:, :S], [b[:, :, :S, :S] for b in biases]

    def _build_position_biases(
        self, h: int, w: int, L: int, dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor]]:
        device = self.embed_positions.weight.device
        P = h * w
        img_ids = image_position_ids(h, w, self.cfg.image_bucket_size).to(device)
        img_pos = self.image_pos_ln(self.embed_image_positions(img_ids))  # (P, D)
        txt_pos = self.pos_ln(self.embed_positions(torch.arange(L, device=device)))  # (L, D)
        position = torch.cat([img_pos, txt_pos], dim=0).unsqueeze(0)  # (1, S, D)
        abs_bias = _abs_position_bias(
            position, position, self.pos_q_linear, self.pos_k_linear, self.heads, self.pos_scaling
        )  # (1, H, S, S)
        token_rp = self.token_rp_bucket[:L, :L]
        image_rp = image_bucket_positions(h, w, self.cfg.image_bucket_size).to(device)
        biases = []
        for t in range(len(self.token_rel_pos_table_list)):
            bias = abs_bias.clone()
            bias[:, :, P:, P:] += self.token_rel_pos_table_list[t](token_rp).permute(2, 0, 1)
            bias[:, :, :P, :P] += self.image_rel_pos_table_list[t](image_rp).permute(2, 0, 1)
            biases.append(bias.to(dtype))
        if self.cfg.share_attn_bias:
            biases = biases * len(self.layers)
        return position, biases

    def forward(self, tokens: Tensor, images: Tensor) -> EncoderOutput:
        """tokens: (B, L) right-padded ids; images: (B, 3, R, R)."""
        B, L = tokens.shape
        img, h, w = self.embed_image(images)  # (B, P, D)
        P = h * w
        x = torch.cat([img, self.embed_text(tokens)], dim=1)  # (B, S, D)
        text_pad = tokens.eq(self.cfg.pad_token_id)
        padding_mask = torch.cat([text_pad.new_zeros(B, P), text_pad], dim=1)  # (B, S)
        has_pads = bool(text_pad.any())
        if has_pads:
            x = x * (~padding_mask).unsqueeze(-1).to(x.dtype)

        dev = tokens.device.type
        bias_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        position, layer_biases = self.position_biases(h, w, L, bias_dtype)
        pad_bias = None
        if has_pads:
            pad_bias = torch.zeros(B, 1, 1, P + L, device=tokens.device, dtype=bias_dtype)
            pad_bias = _masked(pad_bias, padding_mask[:, None, None, :])
        for layer, bias in zip(self.layers, layer_biases, strict=True):
            x = layer(x, bias if pad_bias is None else bias + pad_bias)
        return EncoderOutput(self.layer_norm(x), padding_mask, position)


# --- decoder ------------------------------------------------------------------------


class Decoder(nn.Module):
    """Causal text decoder; returns final hidden states, projected to logits on request."""

    token_rp_bucket: Tensor

    def __init__(self, cfg: OFAConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        d, heads = cfg.d_model, cfg.decoder_attention_heads
        self.cfg = cfg
        self.heads = heads
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layernorm_embedding = nn.LayerNorm(d) if cfg.layernorm_embedding else None
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, d)
        self.pos_ln = nn.LayerNorm(d)
        self.pos_scaling = float(d / heads * cfg.attn_scale_factor) ** -0.5
        self.self_pos_q_linear = nn.Linear(d, d)
        self.self_pos_k_linear = nn.Linear(d, d)
        self.cross_pos_q_linear = nn.Linear(d, d)
        self.cross_pos_k_linear = nn.Linear(d, d)
        self.layer_norm = nn.LayerNorm(d)
        self.output_projection = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.share_decoder_input_output_embed:
            self.output_projection.weight = embed_tokens.weight
        n_tables = 1 if cfg.share_attn_bias else cfg.decoder_layers
        self.token_rel_pos_table_list = nn.ModuleList(
            nn.Embedding(2 * cfg.token_bucket_size - 1, heads) for _ in range(n_tables)
        )
        self.register_buffer(
            "token_rp_bucket", token_bucket_positions(cfg.token_bucket_size), persistent=False
        )

    def forward(self, tokens: Tensor, enc: EncoderOutput) -> Tensor:
        """tokens: (N, T) right-padded decoder inputs; enc: batch N -> (N, T, D) hidden
        states after the final norm (project with ``output_projection`` where needed)."""
        T = tokens.shape[1]
        device = tokens.device
        tgt_pos = self.pos_ln(self.embed_positions(torch.arange(T, device=device)))[None]
        self_bias = _abs_position_bias(
            tgt_pos,
            tgt_pos,
            self.self_pos_q_linear,
            self.self_pos_k_linear,
            self.heads,
            self.pos_scaling,
        )  # (1, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        self_bias = _masked(self_bias, causal)
        pad = tokens.eq(self.cfg.pad_token_id)
        if bool(pad.any()):
            self_bias = _masked(self_bias, pad[:, None, None, :])  # (N, H, T, T)
        cross_bias = _abs_position_bias(
            tgt_pos,
            enc.position,
            self.cross_pos_q_linear,
            self.cross_pos_k_linear,
            self.heads,
            self.pos_scaling,
        )  # (1, H, T, S)
        if bool(enc.padding_mask.any()):
            cross_bias = _masked(cross_bias, enc.padding_mask[:, None, None, :])

        x = self.embed_tokens(tokens) * self.embed_scale
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        token_rp = self.token_rp_bucket[:T, :T]
        for idx, layer in enumerate(self.layers):
            t = 0 if self.cfg.share_attn_bias else idx
            rel = self.token_rel_pos_table_list[t](token_rp).permute(2, 0, 1)  # (H, T, T)
            x = layer(x, enc.hidden, self_bias + rel, cross_bias)
        return self.layer_norm(x)


# --- the model ----------------------------------------------------------------------


class OFAModel(nn.Module):
    """Encoder and decoder sharing one token embedding table."""

    def __init__(self, cfg: OFAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        shared = nn.Embedding(cfg.vocab_size, cfg.d_model, cfg.pad_token_id)
        self.encoder = Encoder(cfg, shared)
        self.decoder = Decoder(cfg, shared)

    @torch.no_grad()
    def fuse_batchnorm(self) -> None:
        """Fold every eval-mode BatchNorm of the backbone into the convolution before it.

        Saves a full pass over each feature map; the result differs from the unfused
        network by float rounding only.
        """
        for module in self.encoder.embed_images.modules():
            pairs: list[tuple[str, str]] = []
            if isinstance(module, (ResNet, Bottleneck)):
                pairs = [("conv1", "bn1")]
                if isinstance(module, Bottleneck):
                    pairs += [("conv2", "bn2"), ("conv3", "bn3")]
            if (
                isinstance(module, nn.Sequential)
                and len(module) == 2
                and isinstance(module[1], nn.BatchNorm2d)
            ):
                pairs = [("0", "1")]
            for conv_name, bn_name in pairs:
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                if not isinstance(bn, nn.BatchNorm2d):
                    continue
                assert bn.running_var is not None and bn.running_mean is not None
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused = nn.Conv2d(
                    conv.in_channels,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                    bias=True,
                ).to(conv.weight.device)
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                assert fused.bias is not None
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
                setattr(module, conv_name, fused)
                setattr(module, bn_name, nn.Identity())
