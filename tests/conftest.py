"""Shared test helpers: the tolerance table and comparison (from gateloop.testing), the one harness
that compares a fast path with its reference (probe, assert_probes_close), a small corpus."""

from __future__ import annotations

import random

import pytest
import torch

# The one tolerance table and comparison, shared with the package's own mixer checks.
from gateloop.testing import TOL, assert_close_rms, rel_rms  # noqa: F401  (imported by the tests from here)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 30 small text documents."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over quiet hills and rivers ran".split()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(20)))
    return folder


def probe(outputs, leaves: dict[str, torch.Tensor], seed: int = 123, unused_is_zero: bool = True):
    """What a fast path is compared with its reference on: the outputs (an op's or a layer's output,
    its final state, ...: tensors computed from the leaves), detached, and the gradient per leaf of
    one fixed random functional of all of them (complex outputs enter as their real views). A leaf
    the outputs do not depend on gets a zero gradient, or None with unused_is_zero=False."""
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for t in outputs:
        r = torch.view_as_real(t) if t.is_complex() else t
        loss = loss + (r * torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=unused_is_zero)
    return [t.detach() for t in outputs], dict(zip(leaves, grads))


def probe_layer(fn, layer: torch.nn.Module, x: torch.Tensor, state0: torch.Tensor):
    """probe() of fn(x, state0)'s output and final state (fn: the layer itself, or a reference loop
    on its weights) over x, the initial state and every parameter of layer (None: no gradient)."""
    x, state0 = x.clone().requires_grad_(True), state0.clone().requires_grad_(True)
    leaves = {"x": x, "initial state": state0, **dict(layer.named_parameters())}
    return probe(fn(x, state0), leaves, unused_is_zero=False)


def assert_probes_close(result, expected, dtype=None, tol=None, what="", names=("output", "final state")):
    """Two probe() results agree: every output (named by names, in order) and every leaf's gradient."""
    (outs, grads), (outs_ref, grads_ref) = result, expected
    for name, a, e in zip(names, outs, outs_ref, strict=True):
        assert_close_rms(a, e, dtype, tol, what=f"{what} {name}")
    for name, e in grads_ref.items():
        assert (grads[name] is None) == (e is None), f"{what} d/d{name}: a gradient on one side only"
        if e is not None:
            assert_close_rms(grads[name], e, dtype, tol, what=f"{what} d/d{name}")
