"""Rotary position embedding (RoPE, Su et al. 2021) in the project layout [B, T, H, D].

Channel i is paired with channel i + D/2 ("rotate half", as in GPT-NeoX and Llama) and the pair is
rotated by the angle pos * base^(-2i/D). The dot product of a rotated query at position m and a
rotated key at position n then depends on m - n only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(offset: int, T: int, head_dim: int, *, base: float = 10000.0,
                 device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin of the angles for positions offset .. offset + T - 1: each [T, head_dim / 2].

    Angles are formed in float64 and only then cast: pos * freq in float32 loses about 1e-3 rad by
    position 1e4.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    pos = torch.arange(offset, offset + T, device=device, dtype=torch.float64)
    angles = pos[:, None] * inv_freq[None, :]  # [T, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: [B, T, H, D] by cos, sin: [T, D/2]. Computes in float32 at least; returns x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # [B, T, H, D/2] each
    cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]  # [T, 1, D/2]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
