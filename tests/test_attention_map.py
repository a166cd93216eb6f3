"""The surrogate attention map against the recurrent reference, and the viz command on a tiny run."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_rms
from gateloop.cli import main
from gateloop.errors import UserError
from gateloop.layers import GateLoop
from gateloop.ops import gateloop_recurrent
from gateloop.tasks import load_task_config, train_task
from gateloop.attention_map import run_attention_map, surrogate_attention

TINY = ["model.d_model=16", "model.n_layers=2", "train.steps=3", "train.batch_size=4", "train.warmup_steps=1",
        "task.n_test=4", "task.seq_len=24", "train.threads=1"]


@pytest.mark.parametrize("options", [
    {}, {"use_complex": False}, {"transition": "fixed"}, {"transition": "none", "use_complex": False},
    {"head_dim": 4}, {"head_dim": 4, "decay": "head"},
])
def test_attention_map_times_v_is_the_layer_output(options):
    torch.manual_seed(0)
    layer = GateLoop(8, **options).double()
    with torch.no_grad():  # strong, varied transitions so that the decays matter
        for name in layer.transition_names:
            getattr(layer, name).add_(torch.randn_like(getattr(layer, name)))
    x = torch.randn(1, 37, 8, dtype=torch.float64)
    A, log_a = surrogate_attention(layer, x)
    H, K = layer.n_heads, layer.head_dim
    assert A.shape == (H, 37, 37) and torch.all(A.triu(1) == 0)
    q = layer.W_q(x).view(1, 37, H, K) * K ** -0.5
    k, v = layer.W_k(x).view(1, 37, H, K), layer.W_v(x).view(1, 37, H, K)
    expected, _ = gateloop_recurrent(q, k, v, layer.compute_log_a(x))
    assert torch.equal(log_a, layer.compute_log_a(x)[0])
    assert_close_rms(torch.einsum("hts,shv->thv", A, v[0].detach()), expected[0].detach(), what=str(options))


def test_attention_map_needs_one_sequence():
    with pytest.raises(ValueError, match="one sequence"):
        surrogate_attention(GateLoop(4), torch.randn(2, 3, 4))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("viz") / "run"
    train_task(load_task_config(None, TINY), out, progress=False)
    return out


def test_viz_attention_writes_a_png(run, tmp_path, capsys):
    out = run_attention_map(run, tmp_path / "a.png", layer=1, n_heads=3, seq_len=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["viz", "attention", "--run", str(run)]) == 0
    assert (run / "attention.png").stat().st_size > 0 and "attention.png" in capsys.readouterr().out


def test_viz_attention_errors(run, tmp_path, capsys):
    with pytest.raises(UserError, match="--layer"):
        run_attention_map(run, tmp_path / "a.png", layer=5)
    other = tmp_path / "hgrn"
    train_task(load_task_config(None, [*TINY, "model.mixer=hgrn", "model.n_layers=1"]), other, progress=False)
    with pytest.raises(UserError, match="needs a GateLoop model"):
        run_attention_map(other)
    assert main(["viz", "attention", "--run", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("gateloop: error: ")
