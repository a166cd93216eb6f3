"""The chunk form for one decay per head (ChunkPerHead, ops/gateloop_chunk_head.py), with the fused
C++ intra-chunk kernel (csrc/gateloop_chunk.cpp) and without it (GATELOOP_FUSED=0), against
gateloop_recurrent and against the traced form it replaced: outputs, final states and the gradients
of q, k, v, both parts of log_a and the initial state; odd lengths; large decays; the switch."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import assert_probes_close, probe

from gateloop.ops import gateloop_chunk, gateloop_recurrent
from gateloop.ops import gateloop_chunk_head as head
from gateloop.ops import gateloop_fused as fused
from gateloop.ops.gateloop import gateloop_chunk_traced

needs_kernel = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")
PATHS = [pytest.param("1", marks=needs_kernel, id="fused"), pytest.param("0", id="pytorch")]


def leaves(T, *, complex_, init, B=2, H=3, K=8, V=5, scale=1.0, seed=0):
    """Float64 leaves: q, k, v, log_a's real (and imaginary) part, the initial state's planes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    out = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K), "v": rnd(B, T, H, V),
           "log_a_re": -scale * torch.nn.functional.softplus(-(2 + 2 * rnd(B, T, H, 1)))}
    if complex_:
        out["log_a_im"] = math.pi * (2 * torch.rand(B, T, H, 1, generator=g, dtype=torch.float64) - 1)
    if init:
        out["S0_re"] = rnd(B, H, K, V)
        if complex_:
            out["S0_im"] = rnd(B, H, K, V)
    return {name: x.requires_grad_() for name, x in out.items()}


def run(op, lv, dtype, **kw):
    c = {name: x.to(dtype) for name, x in lv.items()}
    log_a = torch.complex(c["log_a_re"], c["log_a_im"]) if "log_a_im" in c else c["log_a_re"]
    S0 = c.get("S0_re")
    if "S0_im" in c:
        S0 = torch.complex(S0, c["S0_im"])
    return probe(op(c["q"], c["k"], c["v"], log_a, initial_state=S0, output_final_state=True, **kw), lv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("complex_", [True, False], ids=["complex", "real"])
@pytest.mark.parametrize("T,C", [(1, 16), (37, 16), (64, 64), (133, 64), (50, 1)])
@pytest.mark.parametrize("switch", PATHS)
def test_matches_recurrent(switch, T, C, complex_, init, dtype, monkeypatch):
    monkeypatch.setenv("GATELOOP_FUSED", switch)
    lv = leaves(T, complex_=complex_, init=init)
    expected = run(gateloop_recurrent, lv, torch.float64)
    assert_probes_close(run(gateloop_chunk, lv, dtype, chunk_size=C), expected, dtype, what=f"T={T} C={C}")


@pytest.mark.parametrize("complex_", [True, False], ids=["complex", "real"])
@pytest.mark.parametrize("switch", PATHS)
def test_matches_the_traced_form_in_float32(switch, complex_, monkeypatch):
    """At a layer's shape (K = V = 32, default chunk size, T not a multiple of it)."""
    monkeypatch.setenv("GATELOOP_FUSED", switch)
    lv = leaves(300, complex_=complex_, init=True, B=2, H=2, K=32, V=32)
    expected = run(gateloop_chunk_traced, lv, torch.float64)
    assert_probes_close(run(gateloop_chunk, lv, torch.float32), expected, torch.float32)


@pytest.mark.parametrize("switch", PATHS)
def test_large_decays_stay_finite(switch, monkeypatch):
    """log |a| down to about -40 per step: e^{rho_t - rho_s} above the diagonal would overflow; the
    masked exponent keeps outputs and gradients finite and equal to the reference."""
    monkeypatch.setenv("GATELOOP_FUSED", switch)
    lv = leaves(70, complex_=True, init=True, scale=20.0)
    expected = run(gateloop_recurrent, lv, torch.float64)
    result = run(gateloop_chunk, lv, torch.float32, chunk_size=64)
    assert all(torch.isfinite(t).all() for t in [*result[0], *result[1].values()])
    assert_probes_close(result, expected, torch.float32)


@needs_kernel
def test_the_switch_picks_the_kernel_or_pytorch(monkeypatch):
    calls = []
    real = fused.chunk_kernel()
    assert real is not None, "the chunk kernel did not build on this machine"

    class Counting:
        def forward(self, *a):
            calls.append("forward")
            return real.forward(*a)

        def backward(self, *a):
            calls.append("backward")
            return real.backward(*a)

    monkeypatch.setattr(head, "chunk_kernel", lambda: Counting())
    lv = leaves(20, complex_=True, init=False)
    run(gateloop_chunk, lv, torch.float32)
    assert calls == ["forward", "backward"]
    calls.clear()
    monkeypatch.setenv("GATELOOP_FUSED", "0")
    run(gateloop_chunk, lv, torch.float32)
    assert calls == []


def test_a_decay_per_channel_takes_the_traced_form(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("ChunkPerHead got a decay per channel")

    monkeypatch.setattr(head.ChunkPerHead, "apply", fail)
    q = torch.randn(1, 9, 2, 4)
    gateloop_chunk(q, q, q, -torch.rand(1, 9, 2, 4))


def test_runs_under_torch_compile():
    """The Function is opaque to Dynamo (it runs eagerly inside the compiled graph): same values."""
    lv = leaves(40, complex_=True, init=True)
    expected = run(gateloop_chunk, lv, torch.float32, chunk_size=16)
    compiled = torch.compile(gateloop_chunk)
    assert_probes_close(run(compiled, lv, torch.float32, chunk_size=16), expected, torch.float32)
