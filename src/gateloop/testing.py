"""Checks of the mixer contract (layers/base.py), for the package's mixers and for yours.

    from gateloop.testing import check_mixer
    check_mixer(MyMixer, {"head_dim": 8})      # raises AssertionError naming the broken property

Each check builds the mixer at d_model = 16 in float64 on a batch of two random sequences of 37
tokens, and compares against the whole-sequence forward pass: the sequence split in two with the
state carried (at several points), fed token by token, changed in its future (causality), every
parameter's gradient (also through a carried state), and float32 / bfloat16 autocast against
float64. The package's own tests run exactly these on every registered mixer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .layers.base import state_tensors

# Relative RMS error allowed when a fast path is compared with its reference, by compute dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.complex128: 1e-10, torch.complex64: 1e-4}
D, T = 16, 37
SPLITS = (1, 8, 13, 36)  # one token, a chunk boundary (chunks of 8), inside a chunk, all but one


def rel_rms(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| (absolute RMS when expected is all zeros)."""
    actual, expected = actual.detach().to(torch.complex128), expected.detach().to(torch.complex128)
    err = (actual - expected).abs().pow(2).mean().sqrt()
    scale = expected.abs().pow(2).mean().sqrt()
    return (err / scale if scale > 0 else err).item()


def assert_close_rms(actual: Tensor, expected: Tensor, dtype=None, tol=None, what: str = "") -> None:
    """Assert relative RMS closeness, with the tolerance looked up from TOL by dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(torch.view_as_real(actual) if actual.is_complex() else actual).all(), f"{what}: non-finite"
    tol = tol if tol is not None else TOL[dtype or expected.dtype]
    err = rel_rms(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.0e}"


def assert_states_close(actual, expected, what: str) -> None:
    a, e = state_tensors(actual), state_tensors(expected)
    assert len(a) == len(e), f"{what}: {len(a)} state tensors != {len(e)}"
    for i, (s, r) in enumerate(zip(a, e)):
        assert_close_rms(s, r, tol=TOL[torch.float64], what=f"{what}[{i}]")


MixerFactory = Callable[..., nn.Module]


def build(mixer: MixerFactory, options: dict[str, Any], dtype=torch.float64, seed: int = 0):
    """(the mixer at d_model D, layer 0 of 2, in dtype; x: [2, T, D]), both seeded."""
    torch.manual_seed(seed)
    module = mixer(D, layer_idx=0, n_layers=2, **options).to(dtype)
    x = torch.randn(2, T, D, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    return module, x


@torch.no_grad()
def check_split_equals_full(mixer: MixerFactory, options: dict[str, Any]) -> None:
    module, x = build(mixer, options)
    y, state = module(x)
    assert y.shape == x.shape, f"output shape {tuple(y.shape)} != input shape {tuple(x.shape)}"
    for t in SPLITS:
        y1, s1 = module(x[:, :t])
        y2, s2 = module(x[:, t:], s1)
        assert_close_rms(torch.cat([y1, y2], dim=1), y, what=f"output, split at {t}")
        assert_states_close(s2, state, f"final state, split at {t}")


@torch.no_grad()
def check_token_by_token(mixer: MixerFactory, options: dict[str, Any]) -> None:
    module, x = build(mixer, options)
    y, state = module(x)
    s, ys = None, []
    for t in range(x.shape[1]):
        y_t, s = module(x[:, t:t + 1], s)
        ys.append(y_t)
    assert_close_rms(torch.cat(ys, dim=1), y, what="token by token")
    assert_states_close(s, state, "final state, token by token")


@torch.no_grad()
def check_causal(mixer: MixerFactory, options: dict[str, Any]) -> None:
    module, x = build(mixer, options)
    y, _ = module(x)
    for t in (0, 7, 20):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
        y2, _ = module(x2)
        assert_close_rms(y2[:, :t + 1], y[:, :t + 1], what=f"past outputs after changing x[:, {t + 1}:]")
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:]), "the future inputs had no effect"


def check_gradients(mixer: MixerFactory, options: dict[str, Any], split: int = 13) -> None:
    """Every parameter gets a finite, non-zero gradient, and splitting the sequence (the state
    carries the gradient between the two calls) gives the same parameter and input gradients."""
    module, x = build(mixer, options)
    w = torch.randn_like(x)

    def grads(at):
        module.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        if at is None:
            y, _ = module(xg)
        else:
            y1, s = module(xg[:, :at])
            y2, _ = module(xg[:, at:], s)
            y = torch.cat([y1, y2], dim=1)
        (y * w).sum().backward()
        return {n: p.grad for n, p in module.named_parameters()}, xg.grad

    full, x_grad = grads(None)
    for n, g in full.items():
        assert g is not None, f"no gradient reaches {n}"
        assert torch.isfinite(g).all(), f"non-finite gradient in {n}"
        assert g.abs().max() > 0, f"zero gradient in {n}"
    parts, x_grad_parts = grads(split)
    for n in full:
        assert_close_rms(parts[n], full[n], what=f"grad {n}, split at {split}")
    assert_close_rms(x_grad_parts, x_grad, what=f"grad x, split at {split}")


@torch.no_grad()
def check_dtypes(mixer: MixerFactory, options: dict[str, Any]) -> None:
    """float32 within TOL of float64; bfloat16 autocast finite (also continuing from its own state)
    and within 5% relative RMS of float32."""
    module, x = build(mixer, options)
    y64, _ = module(x)
    module32, x32 = module.float(), x.float()
    y32, _ = module32(x32)
    assert y32.dtype == torch.float32, f"float32 input gave {y32.dtype} output"
    assert_close_rms(y32, y64, tol=TOL[torch.float32], what="float32 vs float64")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = module32(x32)
        y16_next, _ = module32(x32[:, :3], s16)
    assert torch.isfinite(y16.float()).all() and torch.isfinite(y16_next.float()).all(), "bfloat16: non-finite"
    assert_close_rms(y16.float(), y32, tol=5e-2, what="bfloat16 autocast vs float32")


CHECKS = (check_split_equals_full, check_token_by_token, check_causal, check_gradients, check_dtypes)


def check_mixer(mixer: MixerFactory, options: dict[str, Any] | None = None) -> None:
    """Every check of the contract, in turn; AssertionError names the first that fails."""
    for check in CHECKS:
        try:
            check(mixer, options or {})
        except AssertionError as e:
            raise AssertionError(f"{check.__name__}: {e}") from None
