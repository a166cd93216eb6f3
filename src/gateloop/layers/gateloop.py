"""The GateLoop mixer (Katsch 2023, arXiv 2311.01927): projections, transitions, gate and norm around
the GateLoop op (see ops/gateloop.py for the four computation modes and docs/models/gateloop.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import GATELOOP_MODES, gateloop_chunk
from ..ops.gateloop_fused import fused_scan_available
from .base import Mixer, register_mixer
from .common import RMSNorm, gated_output
from .short_conv import conv_inputs, make_short_conv, with_conv_state

DECAYS = ("channel", "head")
TRANSITIONS = ("data", "fixed", "none")


def pick_mode(device_type: str, head_dim: int, per_channel_decay: bool, fused_scan: bool, grad: bool = True) -> str:
    """mode=None's choice, from timings of both ops at the layer's shapes (benchmarks/bench_auto_mode.py;
    figures in docs/performance.md, "Which mode mode=None picks"). grad: whether a backward pass will
    follow (training) or not (evaluation, a prompt under torch.no_grad).

    - head_dim 1 (max-headed): "scan"; the chunk form's C x C matrices are outer products of scalars.
    - a decay per key channel, on CPU with the fused scan kernels: "scan", 7.6x to 8.7x faster than
      the chunk form to train (8.6x to 27x forward), whose [C, C, K] decays are elementwise work.
      Without the kernels the PyTorch scan, which passes every [K, V] state through memory, still
      wins at head_dim 16 (x1.5) and loses at 64 (x0.5): "scan" up to head_dim 16.
    - one decay per head on CPU with the kernels: to train, "scan" up to head_dim 16 (x1.5 to x2.0),
      "chunk" above (x1.3 to x2.7, its products win as the [K, V] state grows); forward only, "scan"
      up to head_dim 32 (x5 to x8: without gradients the kernel keeps the final state alone).
    - everything else (other devices, where the kernels do not run): "chunk", made of matrix products.
    """
    if head_dim == 1:
        return "scan"
    if device_type == "cpu":
        if per_channel_decay and (fused_scan or head_dim <= 16):
            return "scan"
        if fused_scan and head_dim <= (16 if grad else 32):
            return "scan"
    return "chunk"


@register_mixer("gateloop")
class GateLoop(Mixer):
    """Data-controlled linear recurrence with a complex, diagonal state transition.

    Per head (H = d_model / head_dim heads, K = V = head_dim)::

        q_t, k_t, v_t = W_q x_t / sqrt(K), W_k x_t, W_v x_t
        log a_t = -softplus(-alpha_t) + i beta_t        |a_t| = sigma(alpha_t) in (0, 1)
        S_t = diag(a_t) S_{t-1} + k_t v_t^T,   y_t = Re(q_t^T S_t)
        out_t = W_o( norm(y_t) (.) silu(W_g x_t) )

    Options:
      head_dim: 1 is the paper's max-headed layer (H = d_model, everything elementwise in C^D);
        64 gives gated linear attention with H = d_model / 64 heads of K = V = 64.
      decay: "channel" (one alpha, beta per key channel: log_a [B, T, H, K]) or "head" (one per head:
        log_a [B, T, H, 1], the op's cheap path).
      use_complex: False drops beta (real decays in (0, 1)).
      transition: "data" (alpha_t = W_alpha x_t + b_alpha, beta_t = W_beta x_t + b_beta), "fixed"
        (alpha, beta are learned parameters independent of x: the S4 / S5 / LRU / RetNet family), or
        "none" (a = 1: causal linear attention; needs use_complex=False; decay is then irrelevant).
      mode: which op computes the sequence: "chunk", "scan", "attention", "recurrent"; all four
        give the same outputs, states and gradients. None (default) picks the fastest for the input's
        device (see `auto_mode`; benchmarks/bench_modes.py and docs/performance.md show the figures).
      output_gate / norm: the silu output gate and the RMSNorm of y. The norm is per head (over V
        channels, weight shared by the heads) when head_dim > 1; with head_dim = 1 a per-head norm
        would reduce y to its sign, so it then normalises all d_model channels together.
      transition_lr_scale: stored as `p.lr_scale` on every transition parameter (W_alpha, b_alpha,
        W_beta, b_beta, or the fixed alpha, beta); the trainer scales their learning rate by it.
        The paper mentions a lowered rate for the transitions; here the full rate (1.0, the default)
        trained better, on the language model and on memory_horizon, for head_dim 1 and 16
        (configs/grids/gateloop_defaults.toml, docs/leaderboard.md).
      chunk_size: passed to the chunk op (None: its default); ignored by the other modes.
      short_conv: the width of a causal convolution on the inputs (layers/short_conv.py); 0 (default): none.

    Initialisation (the paper gives none): long memory at the start. The magnitudes
    r = sigma(b_alpha) are spread over [r_min, r_max] = [0.9, 0.999] with -log r log-uniform (LRU's
    ring, made deterministic): time constants from 10 to 1000 steps. Flat index c * H + h goes to
    head h, channel c, so every head spans the whole range. Phases b_beta are uniform in
    [0, max_phase] = [0, pi/10] (LRU's small-phase ring: slow rotations, periods >= 20 steps).
    W_alpha, W_beta start small (std 0.1 / sqrt(d_model)), so the data can move a_t without
    destroying the ring. The fixed alpha, beta get the same values as b_alpha, b_beta. W_o is
    scaled by 1 / sqrt(2 n_layers), GPT-2 style, to keep the residual stream's variance in check.

    forward(x: [B, T, d_model], state: [B, H, K, V] or None) -> (y: [B, T, d_model], state), the
    state complex when use_complex (the op's accumulation dtype: complex64 or complex128).
    """

    test_options = [{"chunk_size": 8}, {"head_dim": 4, "chunk_size": 8, "decay": "head"}]

    def __init__(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1, head_dim: int = 1,
                 decay: str = "channel", use_complex: bool = True, transition: str = "data",
                 mode: str | None = None, output_gate: bool = True, norm: bool = True,
                 transition_lr_scale: float = 1.0, chunk_size: int | None = None,
                 r_min: float = 0.9, r_max: float = 0.999, max_phase: float = math.pi / 10, short_conv: int = 0):
        super().__init__()
        if mode is not None and mode not in GATELOOP_MODES:
            raise ValueError(f"mode must be one of {sorted(GATELOOP_MODES)}, got {mode!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
        if head_dim < 1 or d_model % head_dim:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of head_dim ({head_dim})")
        if transition == "none" and use_complex:
            raise ValueError("transition='none' means a = 1, which has no phase: set use_complex=False")
        if not transition_lr_scale > 0:
            raise ValueError(f"transition_lr_scale must be positive, got {transition_lr_scale}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive (or None), got {chunk_size}")
        if not 0 < r_min <= r_max < 1:
            raise ValueError(f"need 0 < r_min <= r_max < 1, got r_min={r_min}, r_max={r_max}")
        if max_phase < 0:
            raise ValueError(f"max_phase must be >= 0, got {max_phase}")
        self.d_model, self.layer_idx, self.n_layers = d_model, layer_idx, n_layers
        self.head_dim, self.n_heads = head_dim, d_model // head_dim
        self.decay, self.use_complex, self.transition = decay, use_complex, transition
        self.mode, self.chunk_size = mode, chunk_size
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        H, Kd = self.n_heads, (head_dim if decay == "channel" else 1)
        self.n_decay = Kd

        self.W_q = nn.Linear(d_model, d_model, bias=False)
        self.W_k = nn.Linear(d_model, d_model, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        self.W_g = nn.Linear(d_model, d_model, bias=False) if output_gate else None
        self.W_o = nn.Linear(d_model, d_model, bias=False)
        self.norm_size = head_dim if head_dim > 1 else d_model
        self.norm = RMSNorm(self.norm_size) if norm else None

        # Raw parameters rather than nn.Linear: a model-wide re-init of Linear layers must not wipe
        # the long-memory initialisation below.
        names = []
        if transition == "data":
            self.W_alpha = nn.Parameter(torch.empty(H * Kd, d_model))
            self.b_alpha = nn.Parameter(torch.empty(H * Kd))
            names += ["W_alpha", "b_alpha"]
            if use_complex:
                self.W_beta = nn.Parameter(torch.empty(H * Kd, d_model))
                self.b_beta = nn.Parameter(torch.empty(H * Kd))
                names += ["W_beta", "b_beta"]
        elif transition == "fixed":
            self.alpha = nn.Parameter(torch.empty(H, Kd))
            names += ["alpha"]
            if use_complex:
                self.beta = nn.Parameter(torch.empty(H, Kd))
                names += ["beta"]
        self.transition_names, self.transition_lr_scale = tuple(names), float(transition_lr_scale)
        self._tag_lr_scale()
        self.reset_transition_parameters()
        with torch.no_grad():
            self.W_o.weight.mul_(1 / math.sqrt(2 * n_layers))
        self.conv = make_short_conv(d_model, short_conv)  # last: the other parameters draw as without it

    def _tag_lr_scale(self) -> None:
        for name in self.transition_names:
            getattr(self, name).lr_scale = self.transition_lr_scale

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._tag_lr_scale()  # copy.deepcopy rebuilds Parameters without their extra attributes

    @torch.no_grad()
    def reset_transition_parameters(self) -> None:
        """The long-memory initialisation described in the class docstring."""
        if self.transition == "none":
            return
        H, Kd = self.n_heads, self.n_decay
        # nu = -log r, log-uniform from -log r_max to -log r_min; [Kd, H] -> [H, Kd] interleaves heads.
        log_nu = torch.linspace(math.log(-math.log(self.r_max)), math.log(-math.log(self.r_min)), H * Kd,
                                dtype=torch.float64)
        nu = log_nu.exp().view(Kd, H).t()
        logit_r = -nu - torch.log(-torch.expm1(-nu))  # logit(r) = log r - log(1 - r), r = e^-nu
        phase = self.max_phase * torch.rand(H, Kd, dtype=torch.float64)
        if self.transition == "data":
            self.b_alpha.copy_(logit_r.reshape(-1))
            nn.init.normal_(self.W_alpha, std=0.1 / math.sqrt(self.d_model))
            if self.use_complex:
                self.b_beta.copy_(phase.reshape(-1))
                nn.init.normal_(self.W_beta, std=0.1 / math.sqrt(self.d_model))
        else:
            self.alpha.copy_(logit_r)
            if self.use_complex:
                self.beta.copy_(phase)

    def compute_log_a(self, x: Tensor) -> Tensor:
        """log a_t for x: [B, T, D] -> [B, T, H, K] (decay="channel") or [B, T, H, 1] ("head"),
        complex when use_complex, in float32 (float64 for float64 inputs) even under autocast:
        log-magnitudes near -1e-3 do not survive bfloat16."""
        B, T, _ = x.shape
        H, Kd = self.n_heads, self.n_decay
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.W_q.weight.dtype), torch.float32)
        if self.transition == "none":
            return x.new_zeros(B, T, H, 1, dtype=dtype)
        with torch.autocast(x.device.type, enabled=False):
            if self.transition == "data":
                xa = x.to(dtype)
                alpha = F.linear(xa, self.W_alpha.to(dtype), self.b_alpha.to(dtype)).view(B, T, H, Kd)
                beta = (F.linear(xa, self.W_beta.to(dtype), self.b_beta.to(dtype)).view(B, T, H, Kd)
                        if self.use_complex else None)
            else:  # fixed: the same transition at every step, independent of x
                alpha = self.alpha.to(dtype).expand(B, T, H, Kd)
                beta = self.beta.to(dtype).expand(B, T, H, Kd) if self.use_complex else None
            log_mag = F.logsigmoid(alpha)  # = -softplus(-alpha): no overflow for any alpha
            return log_mag if beta is None else torch.complex(log_mag, beta)

    def auto_mode(self, device: torch.device, grad: bool = True) -> str:
        """The fastest mode for this layer's shape on device, with or without a backward pass to
        follow: pick_mode, told whether the fused CPU scan kernels are there (built and not switched
        off by GATELOOP_FUSED=0)."""
        per_channel = self.decay == "channel" and self.transition != "none"  # "none" gives log_a [.., 1]
        fused = device.type == "cpu" and fused_scan_available(torch.empty(0, device=device))
        return pick_mode(device.type, self.head_dim, per_channel, fused, grad)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: [B, T, D], state: [B, H, K, V] or None -> (y: [B, T, D], new state [B, H, K, V])."""
        x, state, conv_cache = conv_inputs(self.conv, x, state)
        B, T, D = x.shape
        H, K = self.n_heads, self.head_dim
        q = self.W_q(x).view(B, T, H, K) * K ** -0.5  # [B, T, H, K]
        k = self.W_k(x).view(B, T, H, K)
        v = self.W_v(x).view(B, T, H, K)  # V = K
        log_a = self.compute_log_a(x)
        # One token (generation): the recurrent op is the same maths as every mode, with the least work.
        mode = "recurrent" if T == 1 else self.mode or self.auto_mode(x.device, torch.is_grad_enabled())
        op = GATELOOP_MODES[mode]
        extra = {"chunk_size": self.chunk_size} if op is gateloop_chunk else {}
        # The op accumulates in float32 itself; autocast would push its matmuls back to bfloat16.
        with torch.autocast(x.device.type, enabled=False):
            y, new_state = op(q, k, v, log_a, initial_state=state, output_final_state=True, **extra)
        y = y.reshape(B, T, D // self.norm_size, self.norm_size)
        return gated_output(y, x, self.norm, self.W_g, self.W_o), with_conv_state(conv_cache, new_state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"decay={self.decay!r}, use_complex={self.use_complex}, transition={self.transition!r}, "
                f"mode={self.mode!r}")
