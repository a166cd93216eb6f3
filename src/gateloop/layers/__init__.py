"""nn.Modules: the mixers (one file per paper) and the shared blocks.

Every mixer keeps one contract (base.py): ``Mixer(d_model, *, layer_idx=0, n_layers=1, **options)``
and ``forward(x: [B, T, D], state=None) -> (y: [B, T, D], state)``. MIXERS, the one registry,
maps names to classes; each class enters it with ``@register_mixer(name)`` when imported below.
"""

from .base import MIXERS, Mixer, map_state, register_mixer, resolve_mixer, state_tensors
from .common import MLP, GatedMLP, RMSNorm
from .fox import ForgettingAttention
from .gateloop import GateLoop
from .hgrn import HGRN, HGRN2
from .lstm import LSTM
from .min_rnn import MinGRU, MinLSTM
from .miras import Memora, Moneta, Yaad
from .transformer import Attention

__all__ = ["MIXERS", "MLP", "Attention", "ForgettingAttention", "GateLoop", "GatedMLP", "HGRN", "HGRN2", "LSTM",
           "Memora", "MinGRU", "MinLSTM", "Mixer", "Moneta", "RMSNorm", "Yaad", "map_state", "register_mixer",
           "resolve_mixer", "state_tensors"]
