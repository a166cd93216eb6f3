"""The minGRU and minLSTM mixers (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201):
projections to the gates and the candidate around the ops of ops/min_rnn.py (docs/models/min_rnn.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.min_rnn import MINGRU_MODES, MINLSTM_MODES
from .base import Mixer, register_mixer
from .short_conv import conv_inputs, make_short_conv, with_conv_state


class _MinRNN(Mixer):
    """What minGRU and minLSTM share; a subclass names its gate projections and its ops.

    x: [B, T, d_model] -> gate logits and h~ pre-activations, each [B, T, d_inner] with
    d_inner = round(expansion * d_model) -> h: [B, T, d_inner] -> y = W_o h: [B, T, d_model].
    The state is h_T: [B, d_inner], in float32 (float64 for float64 inputs) whatever the input dtype.
    """

    GATES: tuple[str, ...] = ()
    MODES: dict = {}

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, expansion: float = 1.0,
                 mode: str = "blocked", use_g: bool = True, chunk_size: int | None = 32, bias: bool = True,
                 short_conv: int = 0):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {sorted(self.MODES)}, got {mode!r}")
        if not expansion > 0 or round(expansion * d_model) < 1:
            raise ValueError(f"expansion must be positive and leave d_inner >= 1, got {expansion} "
                             f"(d_model = {d_model})")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive (or None), got {chunk_size}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.d_inner = round(expansion * d_model)
        self.mode, self.use_g, self.chunk_size = mode, use_g, chunk_size
        for name in self.GATES:
            setattr(self, name, nn.Linear(d_model, self.d_inner, bias=bias))
        self.W_h = nn.Linear(d_model, self.d_inner, bias=bias)
        self.W_o = nn.Linear(self.d_inner, d_model, bias=False)
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))  # GPT-2's residual scaling, as in GateLoop
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, d_model], state: [B, d_inner] or None -> (y: [B, T, d_model], state [B, d_inner])."""
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        logits = [getattr(self, name)(x) for name in self.GATES]  # each [B, T, d_inner]
        h_tilde_pre = self.W_h(x)
        # One token (generation): the loop is the same maths with the least work.
        mode = "recurrent" if x.shape[1] == 1 else self.mode
        extra = {"chunk_size": self.chunk_size} if mode == "scan" else {}
        # The op accumulates in float32 itself; autocast must not move its exp / cumsum to bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            h, new_state = self.MODES[mode](*logits, h_tilde_pre, initial_state=state,
                                            output_final_state=True, use_g=self.use_g, **extra)
        return self.W_o(h), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, mode={self.mode!r}, use_g={self.use_g}, "
                f"chunk_size={self.chunk_size}")


@register_mixer("mingru")
class MinGRU(_MinRNN):
    """minGRU: z_t = sigma(W_z x_t), h~_t = W_h x_t, h_t = (1 - z_t) h_{t-1} + z_t g(h~_t), y_t = W_o h_t.

    Options:
      expansion: d_inner / d_model, the width of the recurrence (the paper's optional up-projection).
      mode: "blocked" (default: the blocked linear scan in probability space, the fastest), "scan" (the
        paper's log-space parallel scan) or "recurrent" (the loop). All give the same outputs, states
        and gradients; a single token always takes the loop.
      use_g: True applies the paper's g (x + 0.5 for x >= 0, sigma(x) below) to the candidate, its
        "log-space version" with positive states; False is the plain version, h~ used as is.
      chunk_size: steps per chunk of the log-space scan (None: one chunk, the paper's exact form); see
        ops/min_rnn.py for why chunks keep float32 accurate.
      bias: biases on the gate and candidate projections (the paper's listings use nn.Linear's).
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.

    Initialisation: PyTorch's default for every projection (the paper gives none), W_o scaled by
    1 / sqrt(2 n_layers). Parameters: 2 d_model d_inner (+ 2 d_inner biases) + d_inner d_model.
    """

    test_options = [{"chunk_size": 8}, {"expansion": 2.0, "use_g": False, "chunk_size": 8}]

    GATES = ("W_z",)
    MODES = MINGRU_MODES


@register_mixer("minlstm")
class MinLSTM(_MinRNN):
    """minLSTM: f_t = sigma(W_f x_t), i_t = sigma(W_i x_t), h~_t = W_h x_t,
    h_t = f'_t h_{t-1} + i'_t g(h~_t) with f' = f / (f + i), i' = i / (f + i) (the paper's
    length-independent normalisation, which makes it a minGRU with z = i'), y_t = W_o h_t.

    Options and initialisation as for MinGRU; parameters 3 d_model d_inner (+ 3 d_inner) + d_inner d_model.
    """

    test_options = [{"chunk_size": 8}, {"expansion": 0.5, "use_g": False}]

    GATES = ("W_f", "W_i")
    MODES = MINLSTM_MODES
