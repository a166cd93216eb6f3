"""Shared test helpers: the one tolerance table and the comparison that uses it."""

from __future__ import annotations

import random

import pytest
import torch

# Relative RMS error allowed when a fast path is compared with its reference, by compute dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.complex128: 1e-10, torch.complex64: 1e-4}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (absolute RMS when expected is all zeros)."""
    actual, expected = actual.detach().to(torch.complex128), expected.detach().to(torch.complex128)
    err = (actual - expected).abs().pow(2).mean().sqrt()
    scale = expected.abs().pow(2).mean().sqrt()
    return (err / scale if scale > 0 else err).item()


def assert_close_rms(actual, expected, dtype=None, tol=None, what=""):
    """Assert relative RMS closeness, with the tolerance looked up from TOL by dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(torch.view_as_real(actual) if actual.is_complex() else actual).all(), f"{what}: non-finite"
    tol = tol if tol is not None else TOL[dtype or expected.dtype]
    err = rel_rms(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3e} > {tol:.0e}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 30 small text documents."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the cat sat on a mat while rain fell over quiet hills and rivers ran".split()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(20)))
    return folder
