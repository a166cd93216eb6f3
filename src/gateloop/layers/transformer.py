"""The Transformer baseline's mixer: causal softmax attention with RoPE and a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attention import apply_rope, rope_cos_sin
from .base import Mixer, register_mixer
from .short_conv import conv_inputs, make_short_conv, with_conv_state

KVCache = tuple[Tensor, Tensor]


@register_mixer("transformer")
class Attention(Mixer):
    """Multi-head causal softmax attention with rotary positions (docs/models/transformer.md).

    H = d_model / head_dim heads; scaled_dot_product_attention with the default 1/sqrt(head_dim).
    The state is the KV cache (k, v), each [B, H, S, head_dim], keys stored already rotated; its
    length S is the position of the next token, so a continuation chunk gets positions S .. S + T - 1.
    W_o is scaled by 1 / sqrt(2 n_layers) at init, as in GPT-2. Option short_conv: the width of a causal
    convolution on the inputs (layers/short_conv.py); 0 (default): none.

    forward(x: [B, T, d_model], state: KVCache or None) -> (y: [B, T, d_model], KVCache of length S + T).
    """

    test_options = [{"head_dim": 8}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, head_dim: int = 64,
                 rope_base: float = 10000.0, short_conv: int = 0):
        super().__init__()
        if head_dim < 2 or head_dim % 2 or d_model % head_dim:
            raise ValueError(f"head_dim ({head_dim}) must be even and divide d_model ({d_model})")
        if rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {rope_base}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.head_dim, self.n_heads, self.rope_base = head_dim, d_model // head_dim, rope_base
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def forward(self, x: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        S = 0 if state is None else state[0].shape[2]
        q, k, v = (W(x).view(B, T, H, Dh) for W in (self.W_q, self.W_k, self.W_v))  # [B, T, H, Dh]
        rope_dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rope_cos_sin(S, T, Dh, base=self.rope_base, device=x.device, dtype=rope_dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh] for SDPA and the cache
        if state is not None:
            k = torch.cat([state[0].to(k.dtype), k], dim=2)  # [B, H, S + T, Dh]
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
        if S == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            o = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole cache
        else:
            # is_causal aligns the mask to the top-left corner, wrong with a cache: query i (at
            # position S + i) may see keys 0 .. S + i.
            mask = torch.ones(T, S + T, dtype=torch.bool, device=x.device).tril(diagonal=S)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.W_o(o.transpose(1, 2).reshape(B, T, D))
        return y, with_conv_state(conv_cache, (k, v))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, rope_base={self.rope_base}"
