"""HGRN's elementwise recurrence: the scan against the reference loop (outputs, final states, every
gradient including the initial state's), carried states across a split, dtypes and the contract."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import assert_close_rms, assert_probes_close, probe

from gateloop.ops.hgrn import HGRN_MODES, hgrn_blocked, hgrn_recurrent, hgrn_scan

# (x complex?, log_f complex?): the real HGRN (fla), the paper's complex one, and the mixed cases.
CASES = {"real": (False, False), "complex": (True, True), "real-x": (False, True), "real-f": (True, False)}


def make_leaves(T, *, case="complex", init=True, B=2, D=5, seed=0):
    """Leaf tensors in float64: the real and imaginary parts of x, log_f and the initial state."""
    x_complex, f_complex = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rnd = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    leaves = {"x_re": rnd(B, T, D), "log_f_re": torch.nn.functional.logsigmoid(2 + 2 * rnd(B, T, D))}
    if x_complex:
        leaves["x_im"] = rnd(B, T, D)
    if f_complex:
        leaves["log_f_im"] = math.pi * (2 * torch.rand(B, T, D, generator=g, dtype=torch.float64) - 1)
    if init:
        leaves["h0_re"] = rnd(B, D)
        if x_complex or f_complex:
            leaves["h0_im"] = rnd(B, D)
    return {name: t.requires_grad_() for name, t in leaves.items()}


def assemble(leaves, dtype):
    """(x, log_f, h0) cast to dtype, built differentiably from the leaves."""
    c = {name: t.to(dtype) for name, t in leaves.items()}

    def part(name):
        re, im = c.get(f"{name}_re"), c.get(f"{name}_im")
        return re if im is None else torch.complex(re, im)

    return part("x"), part("log_f"), part("h0")


def run(op, leaves, dtype=torch.float64):
    """probe() of the op's output and final state (at T = 1 with no initial state, log_f is unused:
    its gradient is zero)."""
    x, log_f, h0 = assemble(leaves, dtype)
    return probe(op(x, log_f, initial_state=h0, output_final_state=True), leaves)


@functools.lru_cache(maxsize=None)
def reference(T, case, init):
    leaves = make_leaves(T, case=case, init=init)
    return leaves, run(hgrn_recurrent, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 7, 64, 65, 1000])
@pytest.mark.parametrize("op", [hgrn_scan, hgrn_blocked], ids=["scan", "blocked"])
def test_parallel_forms_match_recurrent(op, T, case, init, dtype):
    leaves, expected = reference(T, case, init)
    assert_probes_close(run(op, leaves, dtype), expected, dtype, what=f"{op.__name__} T={T} {case}")


def test_recurrent_is_the_recurrence():
    """The reference itself, against the formula written out for one step."""
    x, log_f, h0 = assemble(make_leaves(2, case="complex"), torch.float64)
    h, h_T = hgrn_recurrent(x, log_f, initial_state=h0, output_final_state=True)
    h1 = torch.exp(log_f[:, 0]) * h0 + x[:, 0]
    assert_close_rms(h[:, 0], h1, torch.float64)
    assert_close_rms(h_T, torch.exp(log_f[:, 1]) * h1 + x[:, 1], torch.float64)


@pytest.mark.parametrize("split", [1, 30, 64, 99])
@pytest.mark.parametrize("case", ["real", "complex"])
@pytest.mark.parametrize("mode", list(HGRN_MODES))
def test_split_sequence_carries_state(mode, case, split):
    """[0, t) then [t, T) from the carried state equals one pass: outputs, state, all gradients."""
    leaves = make_leaves(100, case=case)
    op = HGRN_MODES[mode]

    def two_pieces(x, log_f, initial_state, output_final_state):
        h1, s1 = op(x[:, :split], log_f[:, :split], initial_state=initial_state, output_final_state=True)
        h2, s2 = op(x[:, split:], log_f[:, split:], initial_state=s1, output_final_state=True)
        return torch.cat([h1, h2], dim=1), s2

    assert_probes_close(run(two_pieces, leaves), run(hgrn_recurrent, leaves), torch.float64,
                        what=f"{mode} split at {split}")


def test_float32_stays_accurate_on_long_sequences():
    """Forget gates up to 1 - 1e-4 over 16384 steps: the float32 scan tracks the float64 loop."""
    g = torch.Generator().manual_seed(0)
    T, D = 16384, 4
    u = torch.rand(1, T, D, generator=g, dtype=torch.float64)
    log_f = torch.complex(torch.log1p(-10 ** (-4 + 3 * u)), math.pi * (2 * u - 1))
    x = torch.randn(1, T, D, generator=g, dtype=torch.complex128)
    h0 = torch.randn(1, D, dtype=torch.complex128, generator=g)
    h_ref, s_ref = hgrn_recurrent(x, log_f, initial_state=h0, output_final_state=True)
    h, s = hgrn_scan(x.to(torch.complex64), log_f.to(torch.complex64), initial_state=h0.to(torch.complex64),
                     output_final_state=True)
    assert_close_rms(h, h_ref, tol=1e-3, what="output")
    assert_close_rms(s, s_ref, tol=1e-3, what="final state")


@pytest.mark.parametrize("mode", list(HGRN_MODES))
def test_dtypes(mode):
    """bfloat16 inputs accumulate in float32 and come back as bfloat16; complex states are complex64."""
    x, log_f, _ = assemble(make_leaves(9, case="real", init=False), torch.bfloat16)
    h, s = HGRN_MODES[mode](x, log_f, output_final_state=True)
    assert h.dtype == torch.bfloat16 and s.dtype == torch.float32
    h_ref, _ = hgrn_recurrent(x.double(), log_f.double())
    assert_close_rms(h.double(), h_ref, tol=2e-2)
    h, s = HGRN_MODES[mode](x, torch.complex(log_f.float(), log_f.float()), output_final_state=True)
    assert h.dtype == s.dtype == torch.complex64
    assert HGRN_MODES[mode](x, log_f)[1] is None


@pytest.mark.parametrize("bad", ["x", "log_f", "state", "empty"])
@pytest.mark.parametrize("mode", list(HGRN_MODES))
def test_contract_violations_are_named(mode, bad):
    x, log_f, h0 = assemble(make_leaves(6, case="real"), torch.float64)
    if bad == "x":
        x, log_f = x[0], log_f[0]
    elif bad == "log_f":
        log_f = log_f[..., :2]
    elif bad == "state":
        h0 = h0[:, :2]
    else:
        x, log_f = x[:, :0], log_f[:, :0]
    with pytest.raises(ValueError):
        HGRN_MODES[mode](x, log_f, initial_state=h0)
