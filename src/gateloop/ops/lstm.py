"""LSTM with peepholes and the eight variants of Greff et al. 2015, "LSTM: A Search Space Odyssey"
(arXiv 1503.04069; MODELS.md section 6). The recurrence is non-linear in its state, so there is no
scan or chunked form: one loop over time is the op. Only the input projection W x_t + b, done by the
caller as one matmul over all steps (x_proj), is parallel.

Vanilla LSTM, blocks in torch.nn.LSTM's order (i, f, z, o), a_t^k = x_proj_t^k + R_k y_{t-1}:
    i_t = sigma(a_t^i + p_i * c_{t-1})          f_t = sigma(a_t^f + p_f * c_{t-1})
    z_t = g(a_t^z)                              c_t = f_t * c_{t-1} + i_t * z_t
    o_t = sigma(a_t^o + p_o * c_t)              y_t = o_t * h(c_t)            g = h = tanh
The output gate's peephole sees the new cell c_t, the other two the old one.

Variants: NIG / NFG / NOG: i / f / o fixed to 1 (its block and peephole are gone). NIAF: g = identity.
NOAF: h = identity. NP: no peepholes; with R = weight_hh and x_proj = x weight_ih^T + b_ih + b_hh it is
exactly torch.nn.LSTM. CIFG: f_t = 1 - i_t (no f block). FGR: every gate's pre-activation also gets
R_gates [i_{t-1}; f_{t-1}; o_{t-1}], the paper's nine matrices R_ii, R_fi, ..., R_oo as one [3N, 3N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The blocks of x_proj and R, and the rows of p, in order, per variant.
GATES = {"vanilla": "ifzo", "NIG": "fzo", "NFG": "izo", "NOG": "ifz", "NIAF": "ifzo", "NOAF": "ifzo",
         "NP": "ifzo", "CIFG": "izo", "FGR": "ifzo"}
PEEPHOLES = {v: "" if v == "NP" else "".join(k for k in g if k != "z") for v, g in GATES.items()}
VARIANTS = tuple(GATES)

State = tuple[Tensor, ...]  # (y, c), each [B, N]; FGR adds the previous gates [i; f; o]: [B, 3N]


def _prepare(x_proj, R, p, R_gates, variant, state):
    """Check shapes against the variant and move everything to the accumulation dtype."""
    if variant not in GATES:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    G, P = len(GATES[variant]), len(PEEPHOLES[variant])
    if R.dim() != 2 or R.shape[0] != G * R.shape[1]:
        raise ValueError(f"R must be [{G} N, N] for variant {variant!r}; got {tuple(R.shape)}")
    N = R.shape[1]
    if x_proj.dim() != 3 or x_proj.shape[1] < 1 or x_proj.shape[2] != G * N:
        raise ValueError(f"x_proj must be [B, T >= 1, {G * N}]; got {tuple(x_proj.shape)}")
    if (p is None) != (P == 0) or (p is not None and p.shape != (P, N)):
        raise ValueError(f"variant {variant!r} needs p of shape {(P, N) if P else None}; "
                         f"got {None if p is None else tuple(p.shape)}")
    if (R_gates is None) != (variant != "FGR") or (R_gates is not None and R_gates.shape != (3 * N, 3 * N)):
        raise ValueError(f"R_gates must be [{3 * N}, {3 * N}] for FGR and None otherwise; "
                         f"got {None if R_gates is None else tuple(R_gates.shape)}")
    dtype = torch.promote_types(x_proj.dtype, torch.float32)  # float64 stays, narrower -> float32
    B = x_proj.shape[0]
    shapes = [(B, N), (B, N)] + ([(B, 3 * N)] if variant == "FGR" else [])
    if state is None:
        state = tuple(x_proj.new_zeros(s, dtype=dtype) for s in shapes)
    elif [tuple(s.shape) for s in state] != shapes:
        raise ValueError(f"initial_state must hold tensors of shapes {shapes} for variant {variant!r}; "
                         f"got {[tuple(s.shape) for s in state]}")
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x_proj), cast(R), cast(p), cast(R_gates), tuple(cast(s) for s in state)


def lstm_recurrent(x_proj: Tensor, R: Tensor, p: Tensor | None = None, *, R_gates: Tensor | None = None,
                   variant: str = "vanilla", initial_state: State | None = None,
                   output_final_state: bool = False) -> tuple[Tensor, State | None]:
    """The LSTM (or one of its variants) over a sequence, one step at a time.

    x_proj: [B, T, G N], the input parts W x_t + b of the G = len(GATES[variant]) blocks, in order.
    R: [G N, N] recurrent weights (F.linear layout: y_{t-1} -> blocks). p: [P, N] peephole weights,
    P = len(PEEPHOLES[variant]) (None for NP). R_gates: [3N, 3N] for FGR, else None.
    initial_state: (y, c) [B, N] each (FGR: plus [B, 3N] gates); None means zeros.
    Returns y: [B, T, N] in x_proj's dtype and the final state (float32, or float64) or None.
    """
    dtype = x_proj.dtype
    x_proj, R, p, R_gates, state = _prepare(x_proj, R, p, R_gates, variant, initial_state)
    gates = GATES[variant]
    peep = dict(zip(PEEPHOLES[variant], p.unbind(0))) if p is not None else {}
    g = (lambda a: a) if variant == "NIAF" else torch.tanh
    h = (lambda a: a) if variant == "NOAF" else torch.tanh

    def gate(name, pre, cell):
        """sigma(pre-activation + peephole * cell), or 1 where the variant removed the gate."""
        if name not in pre:
            return 1.0
        return torch.sigmoid(pre[name] + peep[name] * cell if name in peep else pre[name])

    y, c, *prev = state
    out = []
    for t in range(x_proj.shape[1]):
        pre = dict(zip(gates, (x_proj[:, t] + F.linear(y, R)).chunk(len(gates), dim=-1)))
        if prev:  # FGR: the gates also see all gates' previous activations
            for k, extra in zip("ifo", F.linear(prev[0], R_gates).chunk(3, dim=-1)):
                pre[k] = pre[k] + extra
        i = gate("i", pre, c)
        f = 1 - i if variant == "CIFG" else gate("f", pre, c)
        c = f * c + i * g(pre["z"])
        o = gate("o", pre, c)
        y = o * h(c)
        if prev:
            prev = [torch.cat([i, f, o], dim=-1)]
        out.append(y)
    final = (y, c, *prev) if output_final_state else None
    return torch.stack(out, dim=1).to(dtype), final
