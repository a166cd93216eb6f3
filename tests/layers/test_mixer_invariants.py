"""The mixer contract (layers/base.py), checked by gateloop.testing for every registered mixer in
each of its `test_options` (a mixer added later is covered at once): split sequences, token-by-token
stepping, causality, gradients, dtypes. Also: the helper catches a broken mixer, and a mixer from
outside the package ("module:Class") builds, registers and passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gateloop import testing
from gateloop.layers import MIXERS, Mixer, register_mixer, resolve_mixer
from gateloop.models import LanguageModel, ModelConfig

CASES = [(name, opts) for name in MIXERS for opts in MIXERS[name].test_options]
IDS = [f"{name}-{i}" for name in MIXERS for i in range(len(MIXERS[name].test_options))]


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_mixer_contract(name, opts, check):
    check(MIXERS[name], opts)


class CumulativeMean(Mixer):
    """A mixer of one's own: y_t = W (mean of x_1..x_t); its state is (sum, count)."""

    def __init__(self, d_model, *, layer_idx=0, n_layers=1, leak_future=False):
        super().__init__()
        self.W = nn.Linear(d_model, d_model)
        self.leak_future = leak_future

    def forward(self, x, state=None):
        total, count = state if state is not None else (x.new_zeros(x.shape[0], x.shape[2]), 0)
        sums = total[:, None] + x.cumsum(1)
        counts = count + torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        if self.leak_future:  # a bug: every position sees the whole chunk
            sums = sums[:, -1:].expand_as(sums)
        return self.W(sums / counts), (sums[:, -1], count + x.shape[1])


def test_check_mixer_passes_a_correct_mixer_and_names_what_a_broken_one_breaks():
    testing.check_mixer(CumulativeMean)
    with pytest.raises(AssertionError, match="check_split_equals_full: output, split at 1"):
        testing.check_mixer(CumulativeMean, {"leak_future": True})


def test_a_mixer_from_outside_the_package(tmp_path, monkeypatch):
    """"module:Class" resolves by import; the model trains one step with it; register_mixer names it."""
    (tmp_path / "my_mixers.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Identity(nn.Module):\n"
        "    def __init__(self, d_model, *, layer_idx=0, n_layers=1, scale=1.0):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.full((d_model,), scale))\n\n"
        "    def forward(self, x, state=None):\n"
        "        return x * self.w, state\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = resolve_mixer("my_mixers:Identity")
    model = LanguageModel(ModelConfig(mixer="my_mixers:Identity", vocab_size=11, d_model=8, n_layers=1,
                                      mixer_options={"scale": 0.5}))
    assert isinstance(model.blocks[0].mixer, cls) and model.blocks[0].mixer.w[0] == 0.5
    logits, _ = model(torch.randint(0, 11, (2, 5)))
    logits.sum().backward()
    assert model.blocks[0].mixer.w.grad is not None
    for name, error in [("my_mixers:Nope", "is not an nn.Module class"), ("no_such_module_x:Y", "cannot import"),
                        ("nope", "unknown mixer 'nope'")]:
        with pytest.raises(ValueError, match=error):
            resolve_mixer(name)
    register_mixer("cumulative-mean-test")(CumulativeMean)
    try:
        assert resolve_mixer("cumulative-mean-test") is CumulativeMean
        with pytest.raises(ValueError, match="is taken by"):
            register_mixer("cumulative-mean-test")(cls)
    finally:
        del MIXERS["cumulative-mean-test"]
