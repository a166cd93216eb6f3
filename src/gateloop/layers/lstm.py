"""The LSTM mixer (Greff et al. 2015, "LSTM: A Search Space Odyssey", arXiv 1503.04069): the vanilla
LSTM with peepholes or one of its eight variants, around the loop of ops/lstm.py
(docs/models/lstm.md): the sequential baseline the parallel mixers are measured against."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.lstm import GATES, LSTM_MODES, PEEPHOLES, VARIANTS, LSTMState
from .base import Mixer, register_mixer
from .short_conv import conv_inputs, make_short_conv, with_conv_state


@register_mixer("lstm")
class LSTM(Mixer):
    """An LSTM layer as a mixer: y_t = W_out LSTM(x_1 .. x_t), N = hidden_size cells.

    Parameters, in the paper's symbols (G = len(GATES[variant]) blocks in torch.nn.LSTM's order
    i, f, z, o, minus those the variant removes; see ops/lstm.py for the equations):
      W: nn.Linear(d_model, G N), the input weights and biases of all blocks: one matmul for all steps.
      R: [G N, N] recurrent weights.  p: [P, N] peepholes (absent for NP).
      R_gates: [3N, 3N] gate-to-gate recurrence (FGR only).  W_out: [d_model, N], only when N != d_model.

    Options:
      variant: one of VARIANTS: "vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR".
      hidden_size: N, the number of cells (default d_model).
      mode: "bptt" (default: the loop with its backward pass through time written out, ops/lstm.py: lstm_bptt) or
        "recurrent" (the reference loop, differentiated by autograd; several times slower to train).
      forget_bias: added to the forget gate's bias at init, so the cells start by remembering
        (Gers et al. 2000). CIFG, whose f = 1 - i, subtracts it from the input gate's bias instead, which
        starts f at the same value; NFG has no forget gate to bias.
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.

    Initialisation follows torch.nn.LSTM: every weight, bias and peephole U(-1/sqrt(N), 1/sqrt(N));
    R_gates U(-1/sqrt(3N), 1/sqrt(3N)) (its fan-in is 3N). W_out is nn.Linear's default scaled by
    1 / sqrt(2 n_layers), GPT-2 style, like the other mixers' output projections.

    forward(x: [B, T, d_model], state or None) -> (y: [B, T, d_model], state). The state is the tuple
    (y, c), each [B, N]; FGR adds the previous step's gate activations [i; f; o]: [B, 3N]. It is kept
    in float32 (float64 for float64 inputs), whatever the input dtype.
    """

    test_options = [{}, {"variant": "CIFG"}, {"variant": "FGR", "hidden_size": 12},
                    {"variant": "NP", "hidden_size": 24}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, variant: str = "vanilla",
                 hidden_size: int | None = None, forget_bias: float = 1.0, mode: str = "bptt",
                 short_conv: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mode not in LSTM_MODES:
            raise ValueError(f"mode must be one of {sorted(LSTM_MODES)}, got {mode!r}")
        N = d_model if hidden_size is None else hidden_size
        if not isinstance(N, int) or N < 1:
            raise ValueError(f"hidden_size must be a positive integer (or None), got {hidden_size!r}")
        if not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be finite, got {forget_bias}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.variant, self.hidden_size, self.forget_bias, self.mode = variant, N, float(forget_bias), mode
        G, P = len(GATES[variant]), len(PEEPHOLES[variant])
        self.W = nn.Linear(d_model, G * N)
        self.R = nn.Parameter(torch.empty(G * N, N))
        self.p = nn.Parameter(torch.empty(P, N)) if P else None
        self.R_gates = nn.Parameter(torch.empty(3 * N, 3 * N)) if variant == "FGR" else None
        self.W_out = nn.Linear(N, d_model, bias=False) if N != d_model else None
        self.reset_parameters()
        if self.W_out is not None:
            with torch.no_grad():
                self.W_out.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch.nn.LSTM's initialisation plus the forget bias (see the class docstring)."""
        N, gates = self.hidden_size, GATES[self.variant]
        for w in (self.W.weight, self.W.bias, self.R, self.p):
            if w is not None:
                nn.init.uniform_(w, -N ** -0.5, N ** -0.5)
        if self.R_gates is not None:
            nn.init.uniform_(self.R_gates, -(3 * N) ** -0.5, (3 * N) ** -0.5)
        bias = self.W.bias.view(len(gates), N)
        if "f" in gates:
            bias[gates.index("f")] += self.forget_bias
        elif self.variant == "CIFG":
            bias[gates.index("i")] -= self.forget_bias

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """x: [B, T, d_model], state: (y, c[, gates]) or None -> (y: [B, T, d_model], new state)."""
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        x_proj = self.W(x)  # [B, T, G N]: the only part computed for all steps at once
        # The op accumulates in float32 itself; autocast would push the step matmuls back to bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            lstm = LSTM_MODES[self.mode]
            y, new_state = lstm(x_proj, self.R, self.p, R_gates=self.R_gates, variant=self.variant,
                                initial_state=state, output_final_state=True)
        return (y if self.W_out is None else self.W_out(y)), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, hidden_size={self.hidden_size}, variant={self.variant!r}, "
                f"forget_bias={self.forget_bias}, mode={self.mode!r}")
