"""The scan, attention and chunk modes against the recurrent reference: outputs, final states, gradients."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import assert_close_rms, assert_probes_close, probe

from gateloop.ops import GATELOOP_MODES, gateloop_recurrent

FAST_MODES = ["scan", "attention", "chunk"]
# (complex?, one decay per head?)
CASES = {"complex-channel": (True, False), "complex-head": (True, True),
         "real-channel": (False, False), "real-head": (False, True)}


def make_leaves(T, *, B=2, H=2, K=4, V=3, case="complex-channel", init=True, seed=0):
    """Leaf tensors in float64: q, k, v, the real and imaginary parts of log_a and of the state."""
    is_complex, per_head = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rnd = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    leaves = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V)}
    Kd = 1 if per_head else K
    leaves["log_a_re"] = -torch.nn.functional.softplus(-(2 + 2 * rnd(B, T, H, Kd)))  # |a| mostly 0.5..1
    if is_complex:
        leaves["log_a_im"] = math.pi * (2 * torch.rand(B, T, H, Kd, generator=g, dtype=torch.float64) - 1)
    if init:
        leaves["S0_re"] = rnd(B, H, K, V)
        if is_complex:
            leaves["S0_im"] = rnd(B, H, K, V)
    return {name: x.requires_grad_() for name, x in leaves.items()}


def assemble(leaves, dtype):
    """The op's arguments, cast to dtype, built differentiably from the leaves."""
    cast = {name: x.to(dtype) for name, x in leaves.items()}
    log_a = cast["log_a_re"]
    if "log_a_im" in cast:
        log_a = torch.complex(log_a, cast["log_a_im"])
    S0 = cast.get("S0_re")
    if "S0_im" in cast:
        S0 = torch.complex(S0, cast["S0_im"])
    return (cast["q"], cast["k"], cast["v"], log_a), S0


def run(mode, leaves, dtype=torch.float64, **kw):
    """probe() of the op's output and final state (at T = 1 with no initial state, log_a is unused:
    its gradient is zero)."""
    args, S0 = assemble(leaves, dtype)
    return probe(GATELOOP_MODES[mode](*args, initial_state=S0, output_final_state=True, **kw), leaves)


@functools.lru_cache(maxsize=None)
def reference(T, case, init, **kw):
    leaves = make_leaves(T, case=case, init=init, **kw)
    return leaves, run("recurrent", leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 1000])
@pytest.mark.parametrize("mode", FAST_MODES)
def test_mode_matches_recurrent(mode, T, case, init, dtype):
    leaves, expected = reference(T, case, init)
    assert_probes_close(run(mode, leaves, dtype), expected, dtype, what=f"{mode} T={T} {case}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [dict(H=32, K=1, V=1), dict(H=1, K=128, V=128), dict(H=2, K=64, V=32)],
                         ids=["max-headed", "K=V=128", "K=64,V=32"])
@pytest.mark.parametrize("mode", FAST_MODES)
def test_head_shapes(mode, shape, dtype):
    leaves, expected = reference(65, "complex-channel", True, B=1, **shape)
    assert_probes_close(run(mode, leaves, dtype), expected, dtype, what=f"{mode} {shape}")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 100])
@pytest.mark.parametrize("case", ["complex-channel", "complex-head"])
def test_chunk_sizes(chunk_size, case):
    leaves, expected = reference(65, case, True)
    assert_probes_close(run("chunk", leaves, chunk_size=chunk_size), expected, torch.float64, what=f"C={chunk_size}")


def test_chunk_size_zero_is_an_error_not_the_default():
    leaves, _ = reference(65, "complex-head", True)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        run("chunk", leaves, chunk_size=0)


@pytest.mark.parametrize("split", [1, 30, 64, 99])
@pytest.mark.parametrize("mode", ["recurrent", *FAST_MODES])
def test_split_sequence_carries_state(mode, split):
    """Running [0, t) then [t, T) from the carried state equals one pass: outputs, final state and
    every gradient."""
    leaves = make_leaves(100, case="complex-channel", init=True)
    op = GATELOOP_MODES[mode]

    def two_pieces(q, k, v, log_a, S0):
        o1, S1 = op(q[:, :split], k[:, :split], v[:, :split], log_a[:, :split],
                    initial_state=S0, output_final_state=True)
        o2, S2 = op(q[:, split:], k[:, split:], v[:, split:], log_a[:, split:],
                    initial_state=S1, output_final_state=True)
        return torch.cat([o1, o2], dim=1), S2

    args, S0 = assemble(leaves, torch.float64)
    pieces = probe(two_pieces(*args, S0), leaves)
    args, S0 = assemble(leaves, torch.float64)  # anew: probe() frees the graph it differentiates
    whole = probe(op(*args, initial_state=S0, output_final_state=True), leaves)
    assert_probes_close(pieces, whole, torch.float64, what=f"split at {split}")


def stress_inputs(T, seed=0, B=1, H=2, K=4, V=4):
    """Half the channels near |a| = 1 (long memory), half down to |a| = 1e-3; phases up to +-pi."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, n, generator=g, dtype=torch.float64) for n in (K, K, V))
    u = torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
    near_one = torch.log1p(-10 ** (-4 + 3 * u))  # |a| in [0.9, 0.9999]
    down_to_small = math.log(1e-3) * u  # |a| in [1e-3, 1]
    log_mag = torch.where(torch.arange(K) < K // 2, near_one, down_to_small)
    phase = math.pi * (2 * torch.rand(B, T, H, K, generator=g, dtype=torch.float64) - 1)
    return q, k, v, torch.complex(log_mag, phase)


@pytest.mark.parametrize("mode,T", [("scan", 16384), ("chunk", 16384), ("attention", 2048)])
def test_float32_stays_accurate_on_long_sequences(mode, T):
    q, k, v, log_a = stress_inputs(T)
    S0 = torch.randn(1, 2, 4, 4, dtype=torch.complex128)
    o_ref, S_ref = gateloop_recurrent(q, k, v, log_a, initial_state=S0, output_final_state=True)
    o, S = GATELOOP_MODES[mode](q.float(), k.float(), v.float(), log_a.to(torch.complex64),
                                initial_state=S0.to(torch.complex64), output_final_state=True)
    assert_close_rms(o, o_ref, tol=1e-3, what=f"{mode} T={T} output")
    assert_close_rms(S, S_ref, tol=1e-3, what=f"{mode} T={T} final state")


def test_literal_quadratic_form_overflows_where_ours_does_not():
    """The paper's (Q * prod a)(K / prod a)^T form breaks down by T ~ 128 in float32; ours stays finite."""
    q, k, v, log_a = (x.float() if not x.is_complex() else x.to(torch.complex64) for x in stress_inputs(256))
    L = log_a.cumsum(1)
    literal = torch.einsum("bthk,bshk->bhts", q * torch.exp(L), k * torch.exp(-L)).real
    assert not torch.isfinite(literal).all()
    o, _ = GATELOOP_MODES["attention"](q, k, v, log_a)
    assert torch.isfinite(o).all()


def retention(q, k, v, gamma, theta):
    """RetNet's parallel retention, written from its paper: (Q Theta)(K conj(Theta))^T * D, D = gamma^(n-m).

    q, k: [B, T, H, K]; v: [B, T, H, V]; gamma: [H]; theta: [H, K] (angle per key channel).
    """
    T = q.shape[1]
    n = torch.arange(T, dtype=q.dtype)
    rot = torch.polar(torch.ones_like(theta)[None], n[:, None, None] * theta[None])  # e^{i n theta}: [T, H, K]
    Q, Kc = q * rot, k * rot.conj()
    dist = n[:, None] - n[None, :]
    D = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp(min=0), 0)  # [H, T, T]
    scores = torch.einsum("bnhk,bmhk->bhnm", Q, Kc).real * D
    return torch.einsum("bhnm,bmhv->bnhv", scores, v)


@pytest.mark.parametrize("mode", ["recurrent", *FAST_MODES])
def test_constant_transitions_are_retnet_retention(mode):
    B, T, H, K, V = 2, 50, 3, 8, 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, n, generator=g, dtype=torch.float64) for n in (K, K, V))
    gamma = 1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))  # RetNet's per-head decays
    theta = 10000 ** (-torch.linspace(0, 1, K, dtype=torch.float64)).expand(H, K)
    log_a = torch.complex(torch.log(gamma)[:, None].expand(H, K), theta).expand(B, T, H, K)
    o, _ = GATELOOP_MODES[mode](q, k, v, log_a)
    assert_close_rms(o, retention(q, k, v, gamma, theta), torch.float64)


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v, log_a = stress_inputs(70)
    o, S = GATELOOP_MODES["chunk"](q.bfloat16(), k.bfloat16(), v.bfloat16(), log_a.to(torch.complex64),
                                   output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.complex64
    o_ref, _ = gateloop_recurrent(q, k, v, log_a)
    assert_close_rms(o.double(), o_ref, tol=2e-2)  # bf16 inputs carry ~3 significant digits


@pytest.mark.parametrize("bad,message", [
    ("k", r"q and k must both be \[B, T, H, K\]"), ("v", r"v must be \[B, T, H, V\] = \[1, 10, 2, V\]"),
    ("log_a", r"log_a must be \[B, T, H, K\] or \[B, T, H, 1\]"),
    ("state", r"initial_state must be \[B, H, K, V\] = \[1, 2, 4, 4\]"), ("complex-q", "q, k and v must be real")])
def test_contract_violations_are_named(bad, message):
    q, k, v, log_a = stress_inputs(10)
    S0 = None
    if bad == "k":
        k = k[..., :2]
    elif bad == "v":
        v = v[:, :5]
    elif bad == "log_a":
        log_a = log_a[..., :2]
    elif bad == "state":
        S0 = torch.zeros(1, 2, 4, 5, dtype=torch.complex128)
    else:
        q = q.to(torch.complex128)
    for mode in GATELOOP_MODES.values():
        with pytest.raises(ValueError, match=message):
            mode(q, k, v, log_a, initial_state=S0)


@pytest.mark.parametrize("mode", list(GATELOOP_MODES))
def test_ops_accumulate_in_float32_under_bfloat16_autocast(mode):
    q, k, v, log_a = (x.float() if not x.is_complex() else x.to(torch.complex64) for x in stress_inputs(40))
    expected, S_ref = GATELOOP_MODES[mode](q, k, v, log_a, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = GATELOOP_MODES[mode](q, k, v, log_a, output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.complex64
    assert_close_rms(o, expected, torch.float32)
    assert_close_rms(S, S_ref, torch.float32)
