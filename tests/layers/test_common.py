"""The shared blocks: RMSNorm, GatedMLP, MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from gateloop.layers import MLP, GatedMLP, RMSNorm


def test_rmsnorm_matches_definition_and_keeps_dtype():
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_close_rms(norm(x), expected, what="rmsnorm")
    assert RMSNorm(6)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("activation,act", [("swiglu", F.silu), ("geglu", F.gelu)])
def test_gated_mlp(activation, act):
    mlp = GatedMLP(16, activation=activation).double()
    assert mlp.W_up.out_features == 48  # 8/3 * 16 rounded up to a multiple of 8
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = (act(x @ mlp.W_gate.weight.T) * (x @ mlp.W_up.weight.T)) @ mlp.W_down.weight.T
    assert_close_rms(mlp(x), expected, what=activation)


def test_mlp_and_bad_options():
    mlp = MLP(16).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    assert mlp(x).shape == x.shape and mlp.W_1.out_features == 64
    with pytest.raises(ValueError, match="activation"):
        GatedMLP(16, activation="relu")
    with pytest.raises(ValueError, match="expansion"):
        MLP(16, expansion=0)
