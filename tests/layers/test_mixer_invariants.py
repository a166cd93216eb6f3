"""The mixer contract, checked for every entry of MIXERS (a mixer added later is covered at once):
split sequences, token-by-token stepping, causality, gradients, dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_rms

from gateloop.layers import MIXERS

D = 16
# Small constructor options per mixer (a list: several configurations). Mixers not named here are
# built with their defaults at d_model = D. chunk_size=8 puts chunk boundaries inside T = 37.
TEST_OPTIONS = {
    "gateloop": [{"chunk_size": 8}, {"head_dim": 4, "chunk_size": 8, "decay": "head"}],
    "transformer": [{"head_dim": 8}],
    "hgrn": [{}, {"use_complex": False, "norm_order": "norm_then_gate"}],
    "hgrn2": [{"head_dim": 4, "chunk_size": 8}, {"head_dim": 8, "output_gate": True}],
    "lstm": [{}, {"variant": "CIFG"}, {"variant": "FGR", "hidden_size": 12}, {"variant": "NP", "hidden_size": 24}],
    "mingru": [{"chunk_size": 8}, {"expansion": 2.0, "use_g": False, "chunk_size": 8}],
    "minlstm": [{"chunk_size": 8}, {"expansion": 0.5, "use_g": False}],
    # block_size=8: tile boundaries inside T = 37. The Pro block, then the other gate kinds and plain FoX.
    "fox": [{"head_dim": 8, "block_size": 8}, {"head_dim": 4, "block_size": 8, "forget_gate": "bias"},
            {"head_dim": 8, "block_size": 8, "forget_gate": "fixed", "qk_norm": False, "output_norm": False},
            {"head_dim": 8, "block_size": 8, "forget_gate": "none", "shift": False, "output_gate": False}],
    # Miras: chunk_size=8 and 5 put chunk boundaries inside T = 37, so the state carries a partial chunk.
    "moneta": [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8}],
    "yaad": [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8},
             {"head_dim": 4, "expansion": 1.0, "gate_rank": 2, "chunk_size": 5, "output_gate": False}],
    "memora": [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8}],
}
CASES = [(name, opts) for name in MIXERS for opts in TEST_OPTIONS.get(name, [{}])]
IDS = [f"{name}-{i}" for name in MIXERS for i in range(len(TEST_OPTIONS.get(name, [{}])))]
SPLITS = [1, 8, 13, 36]  # T = 37: one token, a chunk boundary, inside a chunk, all but one


def make(name, opts, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mixer = MIXERS[name](D, layer_idx=0, n_layers=2, **opts).to(dtype)
    x = torch.randn(2, 37, D, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    return mixer, x


def tensors(state):
    """The tensors of a state, whatever its nesting (a tensor, a tuple of them, ...)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in tensors(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for s in state for t in tensors(s)]
    return []


def assert_states_close(actual, expected, what):
    a, e = tensors(actual), tensors(expected)
    assert len(a) == len(e), f"{what}: {len(a)} state tensors != {len(e)}"
    for i, (s, r) in enumerate(zip(a, e)):
        assert_close_rms(s, r, tol=TOL[torch.float64], what=f"{what}[{i}]")


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@torch.no_grad()
def test_split_equals_full(name, opts):
    mixer, x = make(name, opts)
    y, state = mixer(x)
    assert y.shape == x.shape
    for t in SPLITS:
        y1, s1 = mixer(x[:, :t])
        y2, s2 = mixer(x[:, t:], s1)
        assert_close_rms(torch.cat([y1, y2], dim=1), y, what=f"output, split at {t}")
        assert_states_close(s2, state, f"final state, split at {t}")


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@torch.no_grad()
def test_token_by_token_equals_full(name, opts):
    mixer, x = make(name, opts)
    y, state = mixer(x)
    s, ys = None, []
    for t in range(x.shape[1]):
        y_t, s = mixer(x[:, t:t + 1], s)
        ys.append(y_t)
    assert_close_rms(torch.cat(ys, dim=1), y, what="token by token")
    assert_states_close(s, state, "final state, token by token")


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@torch.no_grad()
def test_causal(name, opts):
    mixer, x = make(name, opts)
    y, _ = mixer(x)
    for t in [0, 7, 20]:
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 3
        y2, _ = mixer(x2)
        assert_close_rms(y2[:, :t + 1], y[:, :t + 1], what=f"past outputs after changing x[:, {t + 1}:]")
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:]), "the future inputs had no effect"


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_gradients_flow_and_survive_splitting(name, opts):
    """Every parameter gets a finite gradient, and splitting the sequence (the state carries the
    gradient between the two calls) gives the same parameter and input gradients."""
    mixer, x = make(name, opts)
    w = torch.randn_like(x)

    def grads(split):
        mixer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        if split is None:
            y, _ = mixer(xg)
        else:
            y1, s = mixer(xg[:, :split])
            y2, _ = mixer(xg[:, split:], s)
            y = torch.cat([y1, y2], dim=1)
        (y * w).sum().backward()
        return {n: p.grad for n, p in mixer.named_parameters()}, xg.grad

    full, x_grad = grads(None)
    for n, g in full.items():
        assert g is not None, f"no gradient reaches {n}"
        assert torch.isfinite(g).all(), f"non-finite gradient in {n}"
        assert g.abs().max() > 0, f"zero gradient in {n}"
    split, x_grad_split = grads(13)
    for n in full:
        assert_close_rms(split[n], full[n], what=f"grad {n}, split at 13")
    assert_close_rms(x_grad_split, x_grad, what="grad x, split at 13")


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@torch.no_grad()
def test_float32_and_bfloat16_autocast(name, opts):
    mixer, x = make(name, opts)
    y64, _ = mixer(x)
    mixer32, x32 = mixer.float(), x.float()
    y32, _ = mixer32(x32)
    assert y32.dtype == torch.float32
    assert_close_rms(y32, y64, tol=TOL[torch.float32], what="float32 vs float64")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, s16 = mixer32(x32)
        y16_next, _ = mixer32(x32[:, :3], s16)  # continuing from a state made under autocast
    assert torch.isfinite(y16.float()).all() and torch.isfinite(y16_next.float()).all()
    assert_close_rms(y16.float(), y32, tol=5e-2, what="bfloat16 autocast vs float32")
