"""The Transformer baseline's attention against a naive causal softmax attention with RoPE written
here independently (complex rotations, explicit loops), and RoPE's relative-position property."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close_rms

from gateloop.layers import Attention
from gateloop.ops.attention import apply_rope, rope_cos_sin


def naive_rope(x, positions, base):
    """x: [T, Dh] real; channel i pairs with i + Dh/2 as the complex number x_i + i x_{i+Dh/2},
    rotated by e^{i pos theta_i}, theta_i = base^(-2i/Dh)."""
    Dh = x.shape[-1]
    z = torch.complex(x[:, :Dh // 2], x[:, Dh // 2:])
    theta = torch.tensor([base ** (-2 * i / Dh) for i in range(Dh // 2)], dtype=torch.float64)
    z = z * torch.exp(1j * positions[:, None].double() * theta[None, :])
    return torch.cat([z.real, z.imag], dim=-1)


def naive_attention(layer, x, base):
    B, T, D = x.shape
    H, Dh = layer.n_heads, layer.head_dim
    q, k, v = (x @ W.weight.T for W in (layer.W_q, layer.W_k, layer.W_v))
    out = torch.zeros(B, T, D, dtype=x.dtype)
    pos = torch.arange(T)
    for b in range(B):
        for h in range(H):
            cols = slice(h * Dh, (h + 1) * Dh)
            qh, kh = naive_rope(q[b, :, cols], pos, base), naive_rope(k[b, :, cols], pos, base)
            for t in range(T):
                scores = torch.stack([qh[t] @ kh[s] for s in range(t + 1)]) / math.sqrt(Dh)
                p = torch.softmax(scores, dim=0)
                out[b, t, cols] = (p[:, None] * v[b, :t + 1, cols]).sum(0)
    return out @ layer.W_o.weight.T


@pytest.mark.parametrize("T", [1, 11])
def test_matches_naive_attention_with_rope(T):
    torch.manual_seed(0)
    layer = Attention(16, head_dim=8, rope_base=100.0).double()  # small base: rotations matter at T = 11
    x = torch.randn(2, T, 16, dtype=torch.float64)
    y, (k, v) = layer(x)
    assert k.shape == v.shape == (2, 2, T, 8)
    assert_close_rms(y, naive_attention(layer, x, 100.0), what="attention vs naive")


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64, generator=g).unbind(0)  # [B=1, T=1, H=1, Dh]

    def score(m, n):
        qm = apply_rope(q, *rope_cos_sin(m, 1, 16, dtype=torch.float64))
        kn = apply_rope(k, *rope_cos_sin(n, 1, 16, dtype=torch.float64))
        return (qm * kn).sum().item()

    for m, n in [(0, 0), (5, 2), (3, 9), (40, 13)]:
        ref = score(m - n, 0) if m >= n else score(0, n - m)
        for shift in [1, 17, 1000]:
            assert score(m + shift, n + shift) == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert score(5, 2) != pytest.approx(score(6, 2))  # and the relative position does matter
    # A rotation keeps the norm.
    rotated = apply_rope(q, *rope_cos_sin(123, 1, 16, dtype=torch.float64))
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-12)


def test_cache_gives_positions_after_its_length():
    """A continuation chunk after a cache of length S sees the same outputs as inside the full run."""
    torch.manual_seed(0)
    layer = Attention(16, head_dim=8).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y, _ = layer(x)
    _, cache = layer(x[:, :5])
    y_rest, cache = layer(x[:, 5:], cache)
    assert cache[0].shape[2] == 12
    assert_close_rms(y_rest, y[:, 5:], what="continuation with a cache")


@pytest.mark.parametrize("kwargs", [dict(head_dim=5), dict(head_dim=3), dict(head_dim=32), dict(rope_base=1.0)])
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        Attention(16, **kwargs)
