"""The fast paths' own pieces against plain loops: the blocked scan (both directions, with and without
an initial state) and the linear-recurrence Function's hand-written backward (outputs and every
gradient, initial state included). The GateLoop modes built on them are checked against
gateloop_recurrent in test_gateloop_ops.py."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rms

from gateloop.ops.scan import linear_recurrence, linear_recurrence_loop, scan_blocked

CPLX = torch.complex128


def transitions(T, *, complex_, broadcast, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = 0.5 + 0.5 * torch.rand(2, T, 3, 1 if broadcast else 4, generator=g, dtype=torch.float64)
    if not complex_:
        return mag
    return torch.polar(mag, 6 * torch.rand(mag.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("T", [1, 5, 48, 49, 64, 100, 1000, 4097])
@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["full-a", "broadcast-a"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
def test_linear_recurrence_matches_loop(T, complex_, broadcast, init):
    a = transitions(T, complex_=complex_, broadcast=broadcast).requires_grad_()
    dt = CPLX if complex_ else torch.float64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, generator=g, dtype=dt).requires_grad_() if init else None
    w = torch.randn(2, T, 3, 4, generator=g, dtype=dt)
    leaves = [t for t in (a, x, h0) if t is not None]
    h = linear_recurrence(a, x, h0)
    h_ref = linear_recurrence_loop(a, x.to(dt), h0)  # the loop casts to x's dtype: give it dt
    grads = torch.autograd.grad((h * w).real.sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref * w).real.sum(), leaves)
    assert_close_rms(h, h_ref, torch.float64, what="states")
    for name, gr, gr_ref in zip(["a", "x", "h0"], grads, grads_ref):
        assert_close_rms(gr, gr_ref, torch.float64, what=f"d/d{name}")


@pytest.mark.parametrize("T", [1, 3, 48, 49, 100, 1000])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
def test_reverse_scan_matches_flipped_loop(T, init):
    a = transitions(T, complex_=True, broadcast=True)
    x = torch.randn(2, T, 3, 4, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, dtype=CPLX) if init else None
    expected = linear_recurrence_loop(a.flip(1), x.flip(1).to(CPLX), h0).flip(1)
    assert_close_rms(scan_blocked(a, x, h0, reverse=True), expected, torch.float64)


def test_float32_blocked_scan_stays_accurate_on_long_sequences():
    T = 16384
    a = transitions(T, complex_=True, broadcast=False)
    x = torch.randn(2, T, 3, 4, dtype=torch.float64)
    expected = linear_recurrence_loop(a, x.to(CPLX))
    assert_close_rms(scan_blocked(a.to(torch.complex64), x.float()), expected, tol=1e-5)
