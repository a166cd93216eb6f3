"""Models built from the layers: the language model and its config."""

from .config import ModelConfig
from .lm import Block, LanguageModel, sample

__all__ = ["Block", "LanguageModel", "ModelConfig", "sample"]
