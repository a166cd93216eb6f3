"""The fused C++ scan kernels (ops/gateloop_fused.py) against gateloop_recurrent and against the PyTorch path
they replace (_GateLoopScan): outputs, final states and every gradient, max-headed and with [K, V]
states, one decay per key channel or per head; long float32 sequences; work split across threads;
the switch and the fallback when they cannot be built."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import assert_close_rms

from gateloop.ops import gateloop_fused as fused
from gateloop.ops import gateloop_recurrent, gateloop_scan
from gateloop.ops.gateloop import _GateLoopScan

needs_kernel = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


def inputs(B, T, H, *, complex_, init, K=1, V=1, Kd=1, dtype=torch.float64, seed=0):
    """q, k [B, T, H, K], v [B, T, H, V], log_a [B, T, H, Kd] (decays in [e^-0.5, 1], phases in
    +-pi) and S0 [B, H, K, V] or None."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    log_a = -0.5 * torch.rand(B, T, H, Kd, generator=g, dtype=dtype)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if init else None
    if complex_:
        log_a = torch.complex(log_a, math.pi * (2 * torch.rand(B, T, H, Kd, generator=g, dtype=dtype) - 1))
        S0 = None if S0 is None else torch.complex(S0, torch.randn(B, H, K, V, generator=g, dtype=dtype))
    return [q, k, v, log_a], S0


SHAPES = {"max-headed": dict(K=1, V=1, Kd=1), "decay-per-channel": dict(K=5, V=3, Kd=5),
          "decay-per-head": dict(K=4, V=6, Kd=1), "K=1,V=4": dict(K=1, V=4, Kd=1),
          # the backward sums eight rows of the state at once, and V in lanes of 8: a group and a tail
          "K=9,V=17": dict(K=9, V=17, Kd=9)}


def outputs_and_grads(fn, args, S0):
    """(o, S_T, gradients of q, k, v, log_a[, S0]) for a fixed random functional of o and S_T."""
    leaves = [x.detach().clone().requires_grad_() for x in args]
    S0 = None if S0 is None else S0.detach().clone().requires_grad_()
    o, S_T = fn(*leaves, S0)
    g = torch.Generator().manual_seed(1)
    S_real = torch.view_as_real(S_T) if S_T.is_complex() else S_T
    w_o, w_S = (torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) for x in (o, S_real))
    loss = (o * w_o).sum() + (S_real * w_S).sum()
    grads = torch.autograd.grad(loss, leaves + ([S0] if S0 is not None else []), materialize_grads=True,
                                allow_unused=True)
    return [o.detach(), S_T.detach(), *grads]


def cast(x, dtype):
    """x in dtype, or in its complex counterpart for a complex x; None stays None."""
    if x is None or not x.is_complex():
        return None if x is None else x.to(dtype)
    return x.to(torch.complex64 if dtype == torch.float32 else torch.complex128)


def recurrent(q, k, v, log_a, S0):
    return gateloop_recurrent(q, k, v, log_a, initial_state=S0, output_final_state=True)


def fused_scan(q, k, v, log_a, S0):
    return fused.FusedScan.apply(True, q, k, v, log_a, S0)


@needs_kernel
def test_the_kernel_builds_here():
    assert fused.fused_scan_available(torch.zeros(1)), "the fused kernel did not build on this machine"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("complex_", [True, False], ids=["complex", "real"])
@pytest.mark.parametrize("T", [1, 7, 16, 65, 1000])  # the backward's blocks of 16: one partial, whole, and a tail
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_matches_recurrent(shape, T, complex_, init, dtype):
    args, S0 = inputs(2, T, 3 if shape != "max-headed" else 6, complex_=complex_, init=init, **SHAPES[shape])
    expected = outputs_and_grads(recurrent, args, S0)
    actual = outputs_and_grads(fused_scan, [cast(x, dtype) for x in args], cast(S0, dtype))
    names = ["o", "S_T", "dq", "dk", "dv", "dlog_a", "dS0"]
    assert len(actual) == len(expected) == 6 + init
    for name, a, e in zip(names, actual, expected):
        assert_close_rms(a, e, dtype, what=f"T={T} {name}")


@needs_kernel
@pytest.mark.parametrize("complex_", [True, False], ids=["complex", "real"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_equals_the_pytorch_path_on_a_long_sequence(shape, complex_):
    args, S0 = inputs(2, 4097, 4, complex_=complex_, init=True, **SHAPES[shape])
    actual = outputs_and_grads(fused_scan, args, S0)
    expected = outputs_and_grads(_GateLoopScan.apply, args, S0)
    for j, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_rms(a, e, torch.float64, what=f"output, state or gradient {j}")


@needs_kernel
@pytest.mark.parametrize("K", [1, 4])
def test_float32_stays_accurate_at_16384_steps(K):
    """The stress case of docs/models/gateloop.md's numerics: decays down to 1e-3 and phases up to +-pi per step, in float32."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 1, 16384, 8 // K
    q, k, v = (torch.randn(B, T, H, K, generator=g, dtype=torch.float64) for _ in range(3))
    near_one, down_to_small = (scale * torch.rand(B, T, H, K, generator=g, dtype=torch.float64)
                               for scale in (-1e-3, math.log(1e-3)))
    log_mag = torch.where(torch.arange(K) < K // 2 if K > 1 else torch.arange(H)[:, None] < H // 2,
                          near_one, down_to_small)
    log_a = torch.complex(log_mag, math.pi * (2 * torch.rand(B, T, H, K, generator=g, dtype=torch.float64) - 1))
    o_ref, S_ref = gateloop_recurrent(q, k, v, log_a, output_final_state=True)
    o, S = fused_scan(q.float(), k.float(), v.float(), log_a.to(torch.complex64), None)
    assert_close_rms(o, o_ref, tol=1e-3, what="output")
    assert_close_rms(S, S_ref, tol=1e-3, what="final state")


@needs_kernel
@pytest.mark.parametrize("shape", ["max-headed", "decay-per-channel"])
def test_work_split_across_threads_gives_the_same_bits(shape):
    """Max-headed: tasks of 256 channels that straddle batch rows (B=3, H=300); heads: (b, h) pairs.
    1 and 2 threads agree exactly."""
    H = 300 if shape == "max-headed" else 5
    args, S0 = inputs(3, 50, H, complex_=True, init=True, dtype=torch.float32, **SHAPES[shape])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = outputs_and_grads(fused_scan, args, S0)
        torch.set_num_threads(2)
        two = outputs_and_grads(fused_scan, args, S0)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


@needs_kernel
@pytest.mark.parametrize("T", [1, 2, 7, 33])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_without_gradients_the_final_state_alone_gives_the_same_result(shape, T):
    """Under no_grad, gateloop_scan asks the kernel to keep the final state alone, not one per block."""
    args, S0 = inputs(2, T, 3, complex_=True, init=True, **SHAPES[shape])
    o_all, S_all = fused_scan(*args, S0)
    with torch.no_grad():
        o, S = gateloop_scan(*args, initial_state=S0, output_final_state=True)
    assert torch.equal(o, o_all) and torch.equal(S, S_all)


def test_gateloop_scan_takes_the_kernels_unless_switched_off(monkeypatch):
    """CPU inputs of every head size go to the kernels (where they are built), unless GATELOOP_FUSED=0."""
    calls = []
    monkeypatch.setattr(fused.FusedScan, "apply", lambda keep, *a: calls.append("fused") or _GateLoopScan.apply(*a))
    (q, k, v, log_a), _ = inputs(1, 5, 3, complex_=True, init=False)
    wide, _ = inputs(1, 5, 3, complex_=True, init=False, **SHAPES["decay-per-head"])
    gateloop_scan(q, k, v, log_a)
    gateloop_scan(*wide)
    expected = ["fused"] * 2 if fused.fused_scan_available(q) else []
    assert calls == expected
    monkeypatch.setenv("GATELOOP_FUSED", "0")
    gateloop_scan(q, k, v, log_a)
    assert calls == expected  # switched off: the PyTorch path


def test_a_kernel_that_cannot_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found\nmore lines")

    monkeypatch.setattr(cpp, "load", no_compiler)
    monkeypatch.setenv("GATELOOP_CACHE", str(tmp_path))
    fused._kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"could not be built \(Error building extension: c\+\+ not found\)"):
            assert not fused.fused_scan_available(torch.zeros(1))
        assert not [p for p in tmp_path.rglob("*") if p.is_dir() and ".build-" in p.name]  # no scratch left
        (q, k, v, log_a), S0 = inputs(1, 9, 3, complex_=True, init=True)
        o, S = gateloop_scan(q, k, v, log_a, initial_state=S0, output_final_state=True)
        o_ref, S_ref = gateloop_recurrent(q, k, v, log_a, initial_state=S0, output_final_state=True)
        assert_close_rms(o, o_ref, torch.float64)
        assert_close_rms(S, S_ref, torch.float64)
    finally:
        fused._kernel.cache_clear()  # the next caller builds (or loads) the real kernel again


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_the_kernels_transition_is_torchs_exp(dtype):
    """a = exp(log_a) in one pass (own exp, cos and sin in float32; libm in float64) against
    torch.exp of the complex tensor: typical and extreme magnitudes (down to log |a| = -inf, a = 0),
    angles small, large and beyond the reduction's range (8192), NaN, a conjugated view, and a
    length that leaves a partial vector of 8."""
    g = torch.Generator().manual_seed(0)
    n = 4099
    m = torch.cat([-torch.rand(n - 9, generator=g, dtype=dtype) * 8,
                   torch.tensor([0.0, -50.0, -87.5, -120.0, -math.inf, 3.0, -1e-3, -0.5, -0.1], dtype=dtype)])
    th = torch.cat([torch.randn(n - 9, generator=g, dtype=dtype) * 30,
                    torch.tensor([0.0, 1e4, -9000.0, 8191.0, math.pi, math.nan, -math.pi / 4, 2e5, 3.0],
                                 dtype=dtype)])
    log_a = torch.complex(m, th)
    for x in (log_a, log_a.conj()):
        ar, ai = fused._transition(x)
        expected = torch.exp(x)
        close = dict(atol=2e-6 * (dtype == torch.float32) + 1e-15, rtol=2e-6 if dtype == torch.float32 else 1e-15)
        torch.testing.assert_close(ar, expected.real, equal_nan=True, **close)
        torch.testing.assert_close(ai, expected.imag, equal_nan=True, **close)
        assert ar[-5].item() == 0.0 and ai[-5].item() == 0.0  # log |a| = -inf: a = 0 exactly


@needs_kernel
def test_a_built_kernel_is_imported_without_a_build_step(monkeypatch):
    """Once built, the library is imported from the cache directly: torch's build step (and its lock,
    which a process killed mid-build would leave held) is not entered again."""
    import torch.utils.cpp_extension as cpp

    assert fused.fused_scan_available(torch.zeros(1))
    monkeypatch.setattr(cpp, "load", lambda *a, **k: pytest.fail("the build step ran for a cached kernel"))
    fused._kernel.cache_clear()
    try:
        assert fused.fused_scan_available(torch.zeros(1))
    finally:
        fused._kernel.cache_clear()


def test_the_cache_key_covers_the_headers_a_kernel_includes(tmp_path, monkeypatch):
    """A kernel's build directory changes with its source and with any header beside it (csrc/vec8.h
    is shared by the kernels), so that editing a header never loads a stale library."""
    from gateloop.ops.cpp import build_directory

    monkeypatch.setenv("GATELOOP_CACHE", str(tmp_path / "cache"))
    source, header = tmp_path / "k.cpp", tmp_path / "vec8.h"
    source.write_text('#include "vec8.h"\n')
    header.write_text("// one\n")
    first = build_directory(source)
    assert build_directory(source) == first
    header.write_text("// two\n")
    assert build_directory(source) != first
    source.write_text('#include "vec8.h"\n// edited\n')
    assert len({first, build_directory(source)}) == 2
