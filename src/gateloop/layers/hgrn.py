"""HGRN (Qin et al. 2023, arXiv 2311.04823) and HGRN2 (Qin et al. 2024, arXiv 2404.07904): gated linear
RNNs whose forget gates are bounded below by a value that rises with depth (docs/models/hgrn.md
for the equations and the choices made here)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.gateloop import gateloop_chunk, gateloop_recurrent, gateloop_scan
from ..ops.gateloop_fused import fused_scan_available
from ..ops.hgrn import HGRN_MODES
from .base import Mixer, register_mixer
from .common import RMSNorm, gated_output
from .gateloop import pick_mode
from .short_conv import conv_inputs, make_short_conv, with_conv_state

LOWER_BOUNDS = ("fixed", "learned", "none")
NORM_ORDERS = ("gate_then_norm", "norm_then_gate")
HGRN2_MODES = {"chunk": gateloop_chunk, "scan": gateloop_scan, "recurrent": gateloop_recurrent}


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """float32 for the gates whatever the input (float64 stays float64): log-gates near -1e-3 do not
    survive bfloat16."""
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)


class ForgetGate(nn.Module):
    """lambda_t = gamma + (1 - gamma) sigma(z_t) per channel, returned in log space.

    The paper learns one Gamma [n_layers, D] for the whole model and sets gamma^k = cumsum(softmax(
    Gamma, over layers))_k - softmax(Gamma)_1: 0 in the first layer, rising with depth, below 1. A
    mixer here is one layer and owns no model-wide parameter, so each layer holds its own bound:

      "fixed" (default): gamma^k = k / n_layers for layer k = layer_idx (0-based), a non-trainable
        constant derived from layer_idx and n_layers (a float, so it is exact in every dtype and needs
        no checkpoint entry). It is the paper's bound at its initialisation (Gamma = 0: a uniform
        softmax) and keeps the paper's ordering, 0 in the first layer and strictly rising, for the
        whole of training.
      "learned": a trainable per-channel gamma^k = sigma(gamma_logit), initialised to k / n_layers;
        the first layer has no parameter and stays at 0. Each layer moves its own bound, so the
        ordering across layers holds at initialisation only.
      "none": gamma = 0 in every layer (the paper's ablation without the bound).
    """

    def __init__(self, size: int, *, layer_idx: int, n_layers: int, lower_bound: str):
        super().__init__()
        if lower_bound not in LOWER_BOUNDS:
            raise ValueError(f"lower_bound must be one of {LOWER_BOUNDS}, got {lower_bound!r}")
        if not 0 <= layer_idx < n_layers:
            raise ValueError(f"need 0 <= layer_idx < n_layers, got layer_idx={layer_idx}, n_layers={n_layers}")
        self.size, self.kind = size, lower_bound
        self.bounded = lower_bound != "none" and layer_idx > 0
        self.gamma = layer_idx / n_layers if self.bounded else 0.0  # the schedule, and the learned init
        if self.bounded and lower_bound == "learned":
            self.gamma_logit = nn.Parameter(torch.full((size,), math.log(self.gamma / (1 - self.gamma))))

    def _log_bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(log gamma, log(1 - gamma)), each [size] in like's dtype, computed without cancellation."""
        if self.kind == "fixed":
            log_gamma = like.new_full((self.size,), math.log(self.gamma))
            return log_gamma, like.new_full((self.size,), math.log1p(-self.gamma))
        logit = self.gamma_logit.to(like.dtype)
        return F.logsigmoid(logit), F.logsigmoid(-logit)

    def bound(self) -> Tensor:
        """gamma, the layer's lower bound: [size] float32 (zeros when unbounded)."""
        if self.bounded and self.kind == "learned":
            return torch.sigmoid(self.gamma_logit.detach().float())
        return torch.full((self.size,), self.gamma)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: [..., size] gate pre-activations -> (log lambda, log(1 - lambda)), both [..., size].

        log(1 - lambda) = log(1 - gamma) + log sigma(-z) and log lambda = logaddexp(log gamma,
        log(1 - gamma) + log sigma(z)) stay exact near lambda = 0 and lambda = 1 alike.
        """
        if not self.bounded:
            return F.logsigmoid(z), F.logsigmoid(-z)
        log_gamma, log_1m_gamma = self._log_bounds(z)
        return torch.logaddexp(log_gamma, log_1m_gamma + F.logsigmoid(z)), log_1m_gamma + F.logsigmoid(-z)


@register_mixer("hgrn")
class HGRN(Mixer):
    """The HGRU token mixer: an elementwise, complex (or real) gated linear recurrence.

    Per channel (D = d_model)::

        c_t = silu(W_c^re x_t) + i silu(W_c^im x_t)           (real: silu(W_c x_t))
        lambda_t = gamma + (1 - gamma) sigma(W_mu x_t)          gamma: the layer's lower bound
        h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t  theta [D]: learned, data-independent
        out_t = W_o norm(silu(W_g x_t) (.) [Re h_t, Im h_t])   ("gate_then_norm", the paper's)
        out_t = W_o (norm([Re h_t, Im h_t]) (.) silu(W_g x_t))  ("norm_then_gate", fla's)

    Options:
      use_complex: True (default, the paper's) or False (fla's real HGRN: no theta, h real, the gate,
        norm and W_o on D channels instead of 2 D).
      norm_order: "gate_then_norm" (default, the paper's) or "norm_then_gate" (fla's).
      lower_bound: "fixed" (default), "learned" or "none": how gamma is held, see ForgetGate.
      mode: "blocked" (the default: the O(T) blocked scan with its backward written out, the faster
        one to train on CPU: benchmarks/bench_train.py), "scan" (the O(T log T) associative scan) or
        "recurrent" (the loop, the reference); same outputs, states and gradients. One-token calls
        always use the loop.
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.

    Initialisation: theta_j = 10000^(-2 j / D), as in the authors' code (periods from 2 pi up to
    ~1e9 steps); W_o is scaled by 1 / sqrt(2 n_layers), GPT-2 style. No biases (fla has none).

    forward(x: [B, T, D], state: [B, D] or None) -> (y: [B, T, D], state [B, D]), the state complex
    when use_complex, in the op's accumulation dtype (float32 / complex64, or 64-bit for float64).
    """

    test_options = [{}, {"use_complex": False, "norm_order": "norm_then_gate"}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, use_complex: bool = True,
                 norm_order: str = "gate_then_norm", lower_bound: str = "fixed", mode: str = "blocked",
                 short_conv: int = 0):
        super().__init__()
        if norm_order not in NORM_ORDERS:
            raise ValueError(f"norm_order must be one of {NORM_ORDERS}, got {norm_order!r}")
        if mode not in HGRN_MODES:
            raise ValueError(f"mode must be one of {sorted(HGRN_MODES)}, got {mode!r}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.use_complex, self.norm_order, self.mode = use_complex, norm_order, mode
        width = 2 * d_model if use_complex else d_model  # [Re h, Im h] or h
        self.forget = ForgetGate(d_model, layer_idx=layer_idx, n_layers=n_layers, lower_bound=lower_bound)
        self.W_c = nn.Linear(d_model, width, bias=False)  # [W_c^re; W_c^im] when complex
        self.W_mu = nn.Linear(d_model, d_model, bias=False)
        self.W_g = nn.Linear(d_model, width, bias=False)
        self.norm = RMSNorm(width)
        self.W_o = nn.Linear(width, d_model, bias=False)
        if use_complex:
            self.theta = nn.Parameter(10000 ** (-2 / d_model * torch.arange(d_model, dtype=torch.float32)))
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def lower_bound(self) -> Tensor:
        """gamma: [D], 0 in the first layer."""
        return self.forget.bound()

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, D], state: [B, D] or None -> (y: [B, T, D], new state [B, D])."""
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        D = self.d_model
        dtype = _compute_dtype(x, self.W_mu.weight)
        c = F.silu(self.W_c(x)).to(dtype)  # [B, T, D | 2D]
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(dtype), self.W_mu.weight.to(dtype))
            log_lambda, log_1m_lambda = self.forget(z)  # [B, T, D] each
            if self.use_complex:
                c = torch.complex(c[..., :D], c[..., D:])
                log_f = torch.complex(log_lambda, self.theta.to(dtype).expand_as(log_lambda))
            else:
                log_f = log_lambda
            op = HGRN_MODES["recurrent" if x.shape[1] == 1 else self.mode]
            h, new_state = op(torch.exp(log_1m_lambda) * c, log_f, initial_state=state, output_final_state=True)
        h = torch.cat([h.real, h.imag], dim=-1) if self.use_complex else h  # [B, T, D | 2D]
        h = h.to(x.dtype)
        g = F.silu(self.W_g(x))
        y = self.norm(g * h) if self.norm_order == "gate_then_norm" else self.norm(h) * g
        return self.W_o(y), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, use_complex={self.use_complex}, norm_order={self.norm_order!r}, "
                f"lower_bound={self.forget.kind!r}, mode={self.mode!r}")


@register_mixer("hgrn2")
class HGRN2(Mixer):
    """The HGRN2 token mixer: HGRN with an outer-product (matrix) state per head.

    Per head (H = d_model / head_dim heads, K = V = head_dim), f_t lower-bounded as in HGRN::

        f_t = gamma + (1 - gamma) sigma(W_f x_t),  i_t = silu(W_i x_t),  o_t = sigma(W_q x_t)
        S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,   y_t = o_t^T S_t
        out_t = W_o norm(y_t)                       (output_gate: W_o (norm(y_t) (.) silu(W_g x_t)))

    That is GateLoop's op with q = o_t, k = 1 - f_t, v = i_t, log_a = log f_t (real, per channel), so
    the input gate is tied to the forget gate and the state expansion costs no parameters.

    Options:
      head_dim: the expand ratio (K = V). 64 by default; the paper's language models use 128.
      lower_bound: "fixed" (default), "learned" or "none": see ForgetGate.
      mode: "chunk", "scan" or "recurrent" (same outputs, states and gradients), or None (default):
        the fastest for the device and shape, chosen as GateLoop's layer chooses for a decay per
        key channel (layers/gateloop.py: pick_mode; on CPU with the fused kernels, "scan").
      output_gate: add HGRN's silu(W_g x) gate after the norm. Off by default, as in the authors'
        code and fla, where o_t is the only output gate.
      chunk_size: passed to the chunk op (None: its default).
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.
    Activations follow the authors' code (silu input, sigmoid output gate); the norm is per head
    (weight shared by the heads), or over all D channels when head_dim = 1.

    forward(x: [B, T, D], state: [B, H, K, V] or None) -> (y: [B, T, D], state [B, H, K, V]).
    """

    test_options = [{"head_dim": 4, "chunk_size": 8}, {"head_dim": 8, "output_gate": True}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, head_dim: int = 64,
                 lower_bound: str = "fixed", mode: str | None = None, output_gate: bool = False,
                 chunk_size: int | None = None, short_conv: int = 0):
        super().__init__()
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of head_dim ({head_dim}); "
                             f"set head_dim for small models")
        if mode is not None and mode not in HGRN2_MODES:
            raise ValueError(f"mode must be one of {sorted(HGRN2_MODES)} or None, got {mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive (or None), got {chunk_size}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.head_dim, self.n_heads = head_dim, d_model // head_dim
        self.mode, self.chunk_size = mode, chunk_size
        self.forget = ForgetGate(d_model, layer_idx=layer_idx, n_layers=n_layers, lower_bound=lower_bound)
        self.W_f = nn.Linear(d_model, d_model, bias=False)
        self.W_i = nn.Linear(d_model, d_model, bias=False)
        self.W_q = nn.Linear(d_model, d_model, bias=False)  # the paper's output gate o_t
        self.W_g = nn.Linear(d_model, d_model, bias=False) if output_gate else None
        self.norm_size = head_dim if head_dim > 1 else d_model
        self.norm = RMSNorm(self.norm_size)
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def lower_bound(self) -> Tensor:
        """gamma: [D], 0 in the first layer."""
        return self.forget.bound()

    def auto_mode(self, device: torch.device) -> str:
        """mode=None's choice: HGRN2's decay is real and per key channel (log f_t [B, T, H, K])."""
        fused = device.type == "cpu" and fused_scan_available(torch.empty(0, device=device))
        return pick_mode(device.type, self.head_dim, True, fused, torch.is_grad_enabled())

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, D], state: [B, H, K, V] or None -> (y: [B, T, D], new state [B, H, K, V])."""
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        q = torch.sigmoid(self.W_q(x)).view(B, T, H, K)
        v = F.silu(self.W_i(x)).view(B, T, H, K)
        dtype = _compute_dtype(x, self.W_f.weight)
        op = HGRN2_MODES["recurrent" if T == 1 else self.mode or self.auto_mode(x.device)]
        extra = {"chunk_size": self.chunk_size} if op is gateloop_chunk else {}
        # The op accumulates in float32 itself; autocast would push its matmuls back to bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            z = F.linear(x.to(dtype), self.W_f.weight.to(dtype))
            log_f, log_1m_f = (t.view(B, T, H, K) for t in self.forget(z))
            y, new_state = op(q, torch.exp(log_1m_f), v, log_f, initial_state=state,
                              output_final_state=True, **extra)  # y: [B, T, H, V]
        y = y.reshape(B, T, D // self.norm_size, self.norm_size)
        return gated_output(y, x, self.norm, self.W_g, self.W_o), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"lower_bound={self.forget.kind!r}, mode={self.mode!r}")
