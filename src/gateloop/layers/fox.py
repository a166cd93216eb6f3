"""The Forgetting Transformer's mixer (FoX, Lin et al. 2025, docs/models/fox.md): softmax attention
with a forget gate, in its "Pro" form, around the ops in ops/forgetting_attn.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.forgetting_attn import cumulative_log_f, forgetting_attention, forgetting_attention_naive
from .base import Mixer, register_mixer
from .common import RMSNorm, gated_output
from .short_conv import conv_inputs, make_short_conv, with_conv_state

FORGET_GATES = ("full", "bias", "fixed", "none")
FoXCache = dict[str, Tensor]  # the KV cache of the positions seen so far (see ForgettingAttention)


@register_mixer("fox")
class ForgettingAttention(Mixer):
    """Multi-head causal softmax attention whose scores decay with a learned forget gate.

    Per head (H = d_model / head_dim heads of size Dh = head_dim)::

        f_t = sigma(w_f^T x_t + b_f),   c_t = sum_{l <= t} log f_l
        o_t = sum_{s <= t} softmax_s( q_t.k_s / sqrt(Dh) + c_t - c_s ) v_s
        out_t = W_o( RMSNorm_head(o_t) (.) sigma(W_g x_t) )

    No positional embedding: the gate is the only notion of distance (with forget_gate="none" the
    layer is softmax attention with no position information beyond the causal mask, "NoPE").

    Options:
      forget_gate: "full" (data-dependent, W_f x_t + b_f; b_f = 0 at init, as in FoX), "bias"
        (sigma(b_f), learned, independent of x), "fixed" (a constant per head, a buffer, never
        trained: the data-independent-and-fixed variant, ALiBi-like), "none" (f = 1).
        "bias" and "fixed" start (or stay) at log f_h = -1 / tau_h with decay times tau_h
        log-uniform in [decay_time_min, decay_time_max] (FoX's T_min / T_max initialisation; the
        defaults 2 .. 256 cover ALiBi's slopes for 8 heads).
      qk_norm: per-head RMSNorm of q and k (scale shared by the heads, as in the paper's runs).
      shift: the data-dependent token shift of keys and values, before the qk-norm, each with its
        own gate per head: k_t = alpha_t k~_{t-1} + (1 - alpha_t) k~_t, alpha_t = sigma(w_alpha^T x_t)
        (and likewise v with its own w), k~_{-1} = 0.
      output_gate / output_norm: the sigma(W_g x) gate and the per-head RMSNorm of o (scale shared
        by the heads). The Pro block is all four options on (the defaults); all off is plain FoX.
      log_pruning_tolerance: None, or log eps < 0 to enable Adaptive Computation Pruning (-10 in the
        paper): tiles of the score matrix whose softmax mass is provably below eps per row are
        skipped. The pruning decisions depend on each call's max |q|, |k| and length, so the split
        and step-by-step invariants then hold to within that bound, not to rounding. After each
        pruned call, `pruned_fraction` holds the share of causal tiles it skipped (None otherwise);
        training logs their mean over the layers as acp_pruned_fraction.
      block_size: the op's tile size.
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.

    forward(x: [B, T, d_model], state or None) -> (y: [B, T, d_model], state). The state is a dict:
    "k", "v" [B, S, H, Dh] (the KV cache: shifted, normed keys, shifted values), "c" [B, S, H] the
    cumulative log-gates of the cached positions in float64 (its last entry is the running c), and
    with shift, "k_shift", "v_shift" [B, 1, H, Dh], the last unshifted k~, v~.
    """

    test_options = [{"head_dim": 8, "block_size": 8}, {"head_dim": 4, "block_size": 8, "forget_gate": "bias"},
                    {"head_dim": 8, "block_size": 8, "forget_gate": "fixed", "qk_norm": False, "output_norm": False},
                    {"head_dim": 8, "block_size": 8, "forget_gate": "none", "shift": False, "output_gate": False}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, head_dim: int = 64,
                 forget_gate: str = "full", qk_norm: bool = True, shift: bool = True,
                 output_gate: bool = True, output_norm: bool = True,
                 log_pruning_tolerance: float | None = None, block_size: int = 64,
                 decay_time_min: float = 2.0, decay_time_max: float = 256.0, short_conv: int = 0):
        super().__init__()
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of head_dim ({head_dim})")
        if forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {forget_gate!r}")
        if log_pruning_tolerance is not None and not -math.inf < log_pruning_tolerance < 0:
            raise ValueError(f"log_pruning_tolerance must be None or a finite log eps < 0, got {log_pruning_tolerance}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0 < decay_time_min <= decay_time_max < math.inf:
            raise ValueError(f"need 0 < decay_time_min <= decay_time_max, got {decay_time_min}, {decay_time_max}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.head_dim, self.n_heads, self.forget_gate = head_dim, d_model // head_dim, forget_gate
        self.log_pruning_tolerance, self.block_size = log_pruning_tolerance, block_size
        self.pruned_fraction: float | None = None
        H = self.n_heads

        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        self.W_g = nn.Linear(d_model, d_model, bias=False) if output_gate else None
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None
        self.out_norm = RMSNorm(head_dim) if output_norm else None
        self.W_alpha_k = nn.Linear(d_model, H, bias=False) if shift else None
        self.W_alpha_v = nn.Linear(d_model, H, bias=False) if shift else None

        # log f_h = -1 / tau_h, tau_h log-uniform: b = logit(e^{-1/tau}) = -log(e^{1/tau} - 1).
        tau = torch.logspace(math.log10(decay_time_min), math.log10(decay_time_max), H, dtype=torch.float64)
        if forget_gate == "full":
            self.W_f = nn.Linear(d_model, H)
            with torch.no_grad():
                self.W_f.bias.zero_()
        elif forget_gate == "bias":
            self.b_f = nn.Parameter((-torch.log(torch.expm1(1 / tau))).float())
        elif forget_gate == "fixed":
            self.register_buffer("log_f_fixed", (-1 / tau).float())
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def compute_log_f(self, x: Tensor) -> Tensor:
        """log f_t: [B, T, H], in float32 (float64 for float64 inputs) even under autocast: gates near
        1 have log f ~ -1e-3, which bfloat16 cannot hold."""
        B, T, _ = x.shape
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.W_q.weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            if self.forget_gate == "full":
                return F.logsigmoid(F.linear(x.to(dtype), self.W_f.weight.to(dtype), self.W_f.bias.to(dtype)))
            if self.forget_gate == "bias":
                return F.logsigmoid(self.b_f.to(dtype)).expand(B, T, -1)
            if self.forget_gate == "fixed":
                return self.log_f_fixed.to(dtype).expand(B, T, -1)
            return x.new_zeros(B, T, self.n_heads, dtype=dtype)

    @staticmethod
    def _shift(cur: Tensor, prev: Tensor | None, alpha_logit: Tensor) -> Tensor:
        """alpha_t prev_t + (1 - alpha_t) cur_t with prev_t = cur_{t-1} (prev, or 0, before the first).
        cur: [B, T, H, Dh], prev: [B, 1, H, Dh] or None, alpha_logit: [B, T, H]."""
        first = cur.new_zeros(cur[:, :1].shape) if prev is None else prev.to(cur.dtype)
        before = torch.cat([first, cur[:, :-1]], dim=1)
        alpha = torch.sigmoid(alpha_logit).unsqueeze(-1).to(cur.dtype)
        return alpha * before + (1 - alpha) * cur

    def forward(self, x: Tensor, state: FoXCache | None = None) -> tuple[Tensor, FoXCache]:
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q, k, v = (W(x).view(B, T, H, Dh) for W in (self.W_q, self.W_k, self.W_v))  # [B, T, H, Dh]
        new_state: FoXCache = {}
        if self.W_alpha_k is not None:
            new_state["k_shift"], new_state["v_shift"] = k[:, -1:], v[:, -1:]
            k = self._shift(k, None if state is None else state["k_shift"], self.W_alpha_k(x))
            v = self._shift(v, None if state is None else state["v_shift"], self.W_alpha_v(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        log_f = self.compute_log_f(x)  # [B, T, H]
        c_past = None
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=1)  # [B, S + T, H, Dh]
            v = torch.cat([state["v"].to(v.dtype), v], dim=1)
            c_past = state["c"]
        if self.log_pruning_tolerance is not None:
            o, stats = forgetting_attention(q, k, v, log_f, c_past=c_past, block_size=self.block_size,
                                            log_pruning_tolerance=self.log_pruning_tolerance, return_stats=True)
            self.pruned_fraction = stats.pruned_fraction
        elif T == 1:
            # One token (generation): a single row over the cache; the blockwise op would walk the
            # cache block by block in Python. Same maths, same result.
            o = forgetting_attention_naive(q, k, v, log_f, c_past=c_past)
        else:
            o = forgetting_attention(q, k, v, log_f, c_past=c_past, block_size=self.block_size)
        new_state.update(k=k, v=v, c=cumulative_log_f(log_f, c_past))
        y = gated_output(o, x, self.out_norm, self.W_g, self.W_o, gate=torch.sigmoid)
        return y, with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"forget_gate={self.forget_gate!r}, log_pruning_tolerance={self.log_pruning_tolerance}")
