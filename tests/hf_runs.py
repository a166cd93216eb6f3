"""Tiny run directories for the gateloop.hf tests (tests/test_hf.py, tests/test_hf_lm_eval.py)."""

from __future__ import annotations

import torch

from gateloop.checkpoint import create_run_dir, save_config, save_weights
from gateloop.config import RunConfig
from gateloop.data import ByteTokenizer
from gateloop.layers import MIXERS
from gateloop.models import LanguageModel, ModelConfig


def model_config(mixer: str, vocab_size: int = 256, n_layers: int = 2) -> ModelConfig:
    return ModelConfig(mixer=mixer, vocab_size=vocab_size, d_model=16, n_layers=n_layers,
                       mixer_options=MIXERS[mixer].test_options[0])


def make_run(path, mixer: str, seed: int = 0):
    """A run directory holding an untrained tiny byte-level model (what `gateloop train` writes at step 0)."""
    cfg = RunConfig()
    cfg.model = model_config(mixer, n_layers=1)  # one layer: these runs go through export, load and generate
    torch.manual_seed(seed)
    model = LanguageModel(cfg.model)

    def write(tmp):
        save_config(tmp, cfg, ByteTokenizer(), step=0)
        save_weights(tmp, model)

    create_run_dir(path, write)
    return path
