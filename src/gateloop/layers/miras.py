"""Miras (Behrouz et al. 2025, arXiv 2504.13173; docs/models/miras.md): Moneta, Yaad and Memora, mixers
whose state is a deep memory trained at test time, around the ops in ops/miras.py. EXPERIMENTAL: no
official code exists; docs/models/miras.md lists every choice made here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.miras import MIRAS_MODES, MemoryState
from .base import Mixer, register_mixer
from .common import RMSNorm, gated_output
from .short_conv import conv_inputs, make_short_conv, with_conv_state

# The memory's retention times 1 / (1 - alpha) at init, log-uniform over each head's channels (as FoX's
# decay times): fast channels give the reads a recency the slow ones lack. Equal bounds: one time.
RETENTION_TIME_MIN, RETENTION_TIME_MAX = 2.0, 256.0
DELTA_INIT = 1.0  # Yaad's Huber threshold at init, in units of the (unit-RMS) memory error


class LowRank(nn.Module):
    """x: [..., d_in] -> W_up W_down x + b: [..., d_out], in float32 (float64 stays float64) with
    autocast off: log-retentions near -7e-3 do not survive bfloat16."""

    def __init__(self, d_in: int, rank: int, d_out: int, bias_init: float):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out)
        with torch.no_grad():
            self.up.bias.fill_(bias_init)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.up.weight.dtype), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(x.to(dtype), self.down.weight.to(dtype))
            return F.linear(h, self.up.weight.to(dtype), self.up.bias.to(dtype))


class _Miras(Mixer):
    """Shared by the three mixers; a subclass sets RULE and initialises the memory (init_memory).

    Per head (H = d_model / head_dim heads, Dh = head_dim, F = hidden width of the memory)::

        q_t, k_t = RMSNorm(W_q x_t), RMSNorm(W_k x_t)    v_t = W_v x_t        (per head)
        alpha_t = sigma(U_a D_a x_t + b_a)               per channel, retention in (0, 1)
        eta_t = eta_max sigma(U_e D_e x_t + b_e)         per channel, learning rate in (0, eta_max)
        o_t = M(W_{t-1}; q_t)   the memory after every earlier token (gradients at the chunk start)
        out_t = W_o( RMSNorm(o_t) (.) silu(W_g x_t) )    (output_gate=False drops the gate)

    The inner gradients are taken at the memory at the start of t's chunk (chunks at absolute
    positions), the rule of ops/miras.py. The memory restarts
    from learned initial weights (per head, shared by the batch) whenever state is None.

    Options: head_dim (None: gcd(d_model, 64), i.e. 64 for the usual widths and d_model itself below
    64), expansion (F = round(expansion * head_dim), at least 1), chunk_size, gate_rank (the
    rank of the data-dependent gates), eta_max (None: the rule's default, 0.01; Memora 0.001),
    output_gate, mode ("chunk", the training form, or
    "recurrent", the reference loop: same outputs, states and gradients, far slower),
    retention_time_min / retention_time_max (the retention times 1 / (1 - alpha) at init, log-uniform
    over each head's channels: 2 to 256 tokens; until 2026-12 every channel started at ~150),
    short_conv (the width of a causal convolution on the inputs, layers/short_conv.py; 0, the
    default: none).

    forward(x: [B, T, d_model], state or None) -> (y: [B, T, d_model], state). The state is the op's
    dict: "w1" [B, H, Dh, F], "w2" [B, H, F, Dh] (the accumulators at the last chunk boundary),
    "u1", "u2" (the running accumulators, holding the unfinished chunk's tokens) and "n" (a Python int,
    the number of those tokens), in float32 (float64 for float64 inputs).
    """

    RULE = ""
    ETA_MAX = 0.01  # the default eta_max

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, head_dim: int | None = None,
                 expansion: float = 4.0, chunk_size: int = 16, gate_rank: int = 16, eta_max: float | None = None,
                 output_gate: bool = True, mode: str = "chunk", retention_time_min: float = RETENTION_TIME_MIN,
                 retention_time_max: float = RETENTION_TIME_MAX, short_conv: int = 0):
        super().__init__()
        head_dim = math.gcd(d_model, 64) if head_dim is None else head_dim
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of head_dim ({head_dim})")
        if not expansion > 0:
            raise ValueError(f"expansion must be positive, got {expansion}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if gate_rank < 1:
            raise ValueError(f"gate_rank must be positive, got {gate_rank}")
        eta_max = self.ETA_MAX if eta_max is None else eta_max
        if not 0 < eta_max < math.inf:
            raise ValueError(f"eta_max must be positive and finite, got {eta_max}")
        if not 1 < retention_time_min <= retention_time_max < math.inf:
            raise ValueError("need 1 < retention_time_min <= retention_time_max < inf, got "
                             f"{retention_time_min}, {retention_time_max}")
        if mode not in MIRAS_MODES:
            raise ValueError(f"mode must be one of {sorted(MIRAS_MODES)}, got {mode!r}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.head_dim, self.n_heads, self.hidden = head_dim, d_model // head_dim, max(1, round(expansion * head_dim))
        self.chunk_size, self.eta_max, self.mode = chunk_size, eta_max, mode
        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.q_norm, self.k_norm, self.out_norm = RMSNorm(head_dim), RMSNorm(head_dim), RMSNorm(head_dim)
        self.W_alpha = LowRank(d_model, gate_rank, d_model, 0.0)
        with torch.no_grad():  # alpha = 1 - 1 / tau: bias logit(alpha) = log(tau - 1), per head the same
            tau = torch.logspace(math.log10(retention_time_min), math.log10(retention_time_max), head_dim,
                                 dtype=torch.float64)
            self.W_alpha.up.bias.copy_((tau - 1).log().repeat(d_model // head_dim))
        self.W_eta = LowRank(d_model, gate_rank, d_model, 0.0)
        self.W_g = nn.Linear(d_model, d_model, bias=False) if output_gate else None
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        H, Dh, Fh = self.n_heads, head_dim, self.hidden
        # The learned initial memory, one per head: [H, Dh, F] and [H, F, Dh], W ~ N(0, 1 / fan_in).
        self.w1_init = nn.Parameter(torch.randn(H, Dh, Fh) / math.sqrt(Dh))
        self.w2_init = nn.Parameter(torch.randn(H, Fh, Dh) / math.sqrt(Fh))
        self.init_memory()
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def init_memory(self) -> None:
        """Turn w1_init / w2_init (drawn as weights W) into the rule's accumulators."""

    def initial_accumulators(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The accumulators the memory restarts from: [H, Dh, F], [H, F, Dh]."""
        return self.w1_init.to(dtype), self.w2_init.to(dtype)

    def rule_options(self) -> dict:
        return {}

    def gates(self, x: Tensor) -> dict:
        """The data-dependent per-channel gates, [B, T, H, Dh] each, in the compute dtype."""
        shape = (*x.shape[:2], self.n_heads, self.head_dim)
        return {"log_alpha": F.logsigmoid(self.W_alpha(x)).view(shape),
                "eta": (self.eta_max * torch.sigmoid(self.W_eta(x))).view(shape)}

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        q = self.q_norm(self.W_q(x).view(B, T, H, Dh))
        k = self.k_norm(self.W_k(x).view(B, T, H, Dh))
        v = self.W_v(x).view(B, T, H, Dh)
        gates = self.gates(x)
        if state is None:  # a new sequence: every batch element starts from the learned memory
            w1, w2 = self.initial_accumulators(gates["eta"].dtype)
            state = {"w1": w1.expand(B, -1, -1, -1).clone(), "w2": w2.expand(B, -1, -1, -1).clone()}
        o, new_state = MIRAS_MODES[self.mode](
            q, k, v, gates.pop("log_alpha"), gates.pop("eta"), rule=self.RULE, initial_state=state,
            chunk_size=self.chunk_size, output_final_state=True, **gates, **self.rule_options())
        return gated_output(o.to(x.dtype), x, self.out_norm, self.W_g, self.W_o), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"hidden={self.hidden}, chunk_size={self.chunk_size}, mode={self.mode!r}")


@register_mixer("moneta")
class Moneta(_Miras):
    """EXPERIMENTAL. Miras's Moneta: l_p attentional bias (p = 3) with l_q retention (q = 4).

        A_t = alpha_t A_{t-1} - eta_t grad (1/p)||M(W_s; k_t) - v_t||_p^p,   W = A / ||A||_nu^(q-2)

    ||A||_nu = (sum |A|^q + nu^q)^(1/q), nu = 0.05: the floor keeps W bounded once retention empties A.

    Options p >= 2, q >= 2 besides those of the family (see _Miras). The memory starts from weights
    W_0 ~ N(0, 1 / fan_in), stored as the A_0 with W(A_0) = W_0.
    """

    test_options = [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8}]

    RULE = "moneta"

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, p: float = 3.0, q: float = 4.0,
                 **options):
        if not p >= 2 or not q >= 2:
            raise ValueError(f"Moneta needs p >= 2 and q >= 2 (smooth inner gradients), got p={p}, q={q}")
        self.p, self.q = float(p), float(q)
        super().__init__(d_model, layer_idx=layer_idx, n_layers=n_layers, **options)

    def init_memory(self) -> None:
        # W(c W_0) = c^(3-q) ||W_0||_q^(2-q) W_0, so c = ||W_0||_q^((q-2)/(3-q)) gives W(A_0) = W_0
        # (q = 3 normalises away any scale: A_0 = W_0).
        if self.q != 3:
            with torch.no_grad():
                for w in (self.w1_init, self.w2_init):
                    norm = w.abs().pow(self.q).sum((-2, -1), keepdim=True).pow(1 / self.q)
                    w.mul_(norm.pow((self.q - 2) / (3 - self.q)))

    def rule_options(self) -> dict:
        return {"p": self.p, "q_retention": self.q}


@register_mixer("yaad")
class Yaad(_Miras):
    """EXPERIMENTAL. Miras's Yaad: Huber attentional bias with l_2 retention (weight decay).

        W_t = alpha_t W_{t-1} - eta_t grad sum_i huber_{delta_t,i}(M(W_s; k_t)_i - v_t,i)
        delta_t = softplus(U_d D_d x_t + b_d)   per channel, 1 at init

    The l_2 gradient where |e_i| <= delta_i, delta_i times the l_1 gradient elsewhere (per coordinate).
    """

    test_options = [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8},
                    {"head_dim": 4, "expansion": 1.0, "gate_rank": 2, "chunk_size": 5, "output_gate": False}]

    RULE = "yaad"

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, gate_rank: int = 16, **options):
        super().__init__(d_model, layer_idx=layer_idx, n_layers=n_layers, gate_rank=gate_rank, **options)
        self.W_delta = LowRank(d_model, gate_rank, d_model, math.log(math.expm1(DELTA_INIT)))

    def gates(self, x: Tensor) -> dict:
        gates = super().gates(x)
        gates["delta"] = F.softplus(self.W_delta(x)).view(gates["eta"].shape)
        return gates


@register_mixer("memora")
class Memora(_Miras):
    """EXPERIMENTAL. Miras's Memora: l_2 attentional bias with KL retention.

        W_t = Softmax(alpha_t log W_{t-1} - eta_t grad (1/2)||M(W_s; k_t) - v_t||^2)

    The softmax runs over the hidden axis F (every row of W1 and column of W2 is a distribution); the
    memory reads F W1 so its pre-activations stay O(1). The initial weights are softmax(logits) with
    learned logits (w1_init, w2_init, drawn N(0, 4)): positive by construction. eta_max defaults to
    0.001: the step acts on log-weights with a gradient w.r.t. weights of size ~1/F, so it is ~F times
    larger than the same eta in Yaad; at 0.01 (F = 128) float32 and float64 runs part by 1e-1.
    """

    test_options = [{"head_dim": 8, "expansion": 2.0, "gate_rank": 4, "chunk_size": 8}]

    RULE = "memora"
    ETA_MAX = 0.001

    def init_memory(self) -> None:
        # Logits of std 2: near-uniform distributions make every output channel of the memory nearly
        # the same average of h, and its LayerNorm then amplifies rounding (by ~20x at std 1).
        with torch.no_grad():
            self.w1_init.normal_(0.0, 2.0)
            self.w2_init.normal_(0.0, 2.0)

    def initial_accumulators(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.w1_init.to(dtype).log_softmax(-1), self.w2_init.to(dtype).log_softmax(-2)
