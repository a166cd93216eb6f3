"""The few blocks shared by every mixer and model: RMSNorm, GatedMLP (SwiGLU / GeGLU), MLP (GELU).

All take and return [..., D]. Norms compute in float32 (float64 for float64 inputs) and cast back,
so they behave the same under bfloat16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim. x: [..., d] -> [..., d]."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(_compute_dtype(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(h.dtype)).to(x.dtype)


def _hidden_size(d_model: int, expansion: float) -> int:
    """expansion * d_model rounded up to a multiple of 8 (friendlier matrix shapes)."""
    if expansion <= 0:
        raise ValueError(f"expansion must be positive, got {expansion}")
    return 8 * math.ceil(expansion * d_model / 8)


class GatedMLP(nn.Module):
    """W_down( act(W_gate x) (.) W_up x ), act = silu ("swiglu") or gelu ("geglu"). [..., D] -> [..., D].

    The default expansion 8/3 keeps the parameter count of a 4x GELU MLP (three matrices, not two).
    """

    ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}

    def __init__(self, d_model: int, *, expansion: float = 8 / 3, activation: str = "swiglu"):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(self.ACTIVATIONS)}, got {activation!r}")
        hidden = _hidden_size(d_model, expansion)
        self.act = self.ACTIVATIONS[activation]
        self.W_gate = nn.Linear(d_model, hidden, bias=False)
        self.W_up = nn.Linear(d_model, hidden, bias=False)
        self.W_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_down(self.act(self.W_gate(x)) * self.W_up(x))


class MLP(nn.Module):
    """The classic Transformer FFN (and the GateLoop paper's): W_2 gelu(W_1 x + b_1) + b_2."""

    def __init__(self, d_model: int, *, expansion: float = 4.0):
        super().__init__()
        hidden = _hidden_size(d_model, expansion)
        self.W_1 = nn.Linear(d_model, hidden)
        self.W_2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.W_2(F.gelu(self.W_1(x)))


def gated_output(y: Tensor, x: Tensor, norm: nn.Module | None, W_g: nn.Linear | None, W_o: nn.Linear,
                 gate=F.silu) -> Tensor:
    """W_o( norm(y) (.) gate(W_g x) ): the output head GateLoop, HGRN2, FoX and the Miras mixers share.
    y: [B, T, n, m], normalised over its last dim (per head, or over all channels with n = 1); x:
    [B, T, d_model], the layer's input. A norm or W_g that is None is left out."""
    if norm is not None:
        y = norm(y)
    y = y.reshape(*x.shape[:2], -1)
    if W_g is not None:
        y = y * gate(W_g(x))
    return W_o(y)
