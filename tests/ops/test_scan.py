"""The diagonal linear recurrence: the log-depth scan against the loop."""

import math

import pytest
import torch
from conftest import assert_close_rms
from torch.overrides import TorchFunctionMode

from gateloop.ops import linear_recurrence_loop, linear_recurrence_scan


def inputs(T, is_complex, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, T, 3, 4)
    mag = torch.rand(shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    if is_complex:
        mag = torch.polar(mag, torch.randn(shape, generator=g, dtype=torch.float64))
        x, h0 = torch.complex(x, torch.randn_like(x)), torch.complex(h0, torch.randn_like(h0))
    return [t.requires_grad_() for t in (mag, x, h0)]


@pytest.mark.parametrize("is_complex", [False, True])
@pytest.mark.parametrize("T", [1, 2, 7, 64, 65, 300])
def test_scan_matches_loop_with_gradients(T, is_complex):
    a, x, h0 = inputs(T, is_complex)
    h, h_ref = linear_recurrence_scan(a, x, h0), linear_recurrence_loop(a, x, h0)
    assert_close_rms(h, h_ref, torch.float64)
    w = torch.randn(h.shape, dtype=h.dtype)
    grads = torch.autograd.grad((h * w).real.sum(), (a, x, h0))
    grads_ref = torch.autograd.grad((h_ref * w).real.sum(), (a, x, h0))
    for g, g_ref, name in zip(grads, grads_ref, "a x h0".split()):
        assert_close_rms(g, g_ref, torch.float64, what=f"d/d{name}")


class CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [100, 1000, 10000])
def test_scan_takes_logarithmic_depth(T):
    """A real parallel scan: the number of tensor operations grows with log2(T), not with T."""
    a, x, _ = (t.detach() for t in inputs(T, True))
    with CountCalls() as counter:
        linear_recurrence_scan(a, x)
    steps = math.ceil(math.log2(T))
    assert counter.calls <= 16 * steps, f"{counter.calls} tensor operations for T={T}"
