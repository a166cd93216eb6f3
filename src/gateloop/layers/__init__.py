"""nn.Modules: the mixers (one file per paper) and the shared blocks.

Every mixer follows one contract: ``Mixer(d_model, *, layer_idx=0, n_layers=1, **options)`` and
``forward(x: [B, T, D], state=None) -> (y: [B, T, D], state)``. MIXERS is the one registry.
"""

from .common import MLP, GatedMLP, RMSNorm
from .fox import ForgettingAttention
from .gateloop import GateLoop
from .hgrn import HGRN, HGRN2
from .lstm import LSTM
from .min_rnn import MinGRU, MinLSTM
from .miras import Memora, Moneta, Yaad
from .transformer import Attention

MIXERS = {
    "fox": ForgettingAttention,
    "gateloop": GateLoop,
    "hgrn": HGRN,
    "hgrn2": HGRN2,
    "lstm": LSTM,
    "memora": Memora,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
    "moneta": Moneta,
    "transformer": Attention,
    "yaad": Yaad,
}

__all__ = ["MIXERS", "MLP", "Attention", "ForgettingAttention", "GateLoop", "GatedMLP", "HGRN", "HGRN2", "LSTM",
           "Memora", "MinGRU", "MinLSTM", "Moneta", "RMSNorm", "Yaad"]
