"""ModelConfig: everything needed to rebuild a LanguageModel, JSON-serialisable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NORMS = ("pre", "post")
MLPS = ("swiglu", "gelu", "none")


@dataclass
class ModelConfig:
    """A language model: embedding, n_layers blocks of (mixer, MLP), final norm, head.

    mixer: a key of gateloop.layers.MIXERS, or "package.module:Class" for a mixer of your own (see
    layers/base.py for the contract it keeps); mixer_options: its keyword options (e.g. head_dim).
    norm: "pre" (x + f(norm(x)), the modern default) or "post" (norm(x + f(x)), the GateLoop paper's).
    mlp: "swiglu" (GatedMLP), "gelu" (the paper's FFN), or "none" (mixer-only blocks).
    """

    mixer: str = "gateloop"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    mixer_options: dict[str, Any] = field(default_factory=dict)
    mlp: str = "swiglu"
    mlp_expansion: float | None = None  # None: the MLP's own default (8/3 for swiglu, 4 for gelu)
    norm: str = "pre"
    tie_embeddings: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (the mixer's own options are checked when built)."""
        from ..layers import resolve_mixer

        resolve_mixer(self.mixer)
        for name in ("vocab_size", "d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.mlp not in MLPS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.mlp_expansion is not None and not 0 < self.mlp_expansion < float("inf"):
            raise ValueError(f"model.mlp_expansion must be a positive finite number, got {self.mlp_expansion}")
