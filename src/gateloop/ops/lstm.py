"""LSTM with peepholes and the eight variants of Greff et al. 2015, "LSTM: A Search Space Odyssey"
(arXiv 1503.04069; docs/models/lstm.md). The recurrence is non-linear in its state, so there is no
scan or chunked form: one loop over time is the op. Only the input projection W x_t + b, done by the
caller as one matmul over all steps (x_proj), is parallel.

Vanilla LSTM, blocks in torch.nn.LSTM's order (i, f, z, o), a_t^k = x_proj_t^k + R_k y_{t-1}:
    i_t = sigma(a_t^i + p_i * c_{t-1})          f_t = sigma(a_t^f + p_f * c_{t-1})
    z_t = g(a_t^z)                              c_t = f_t * c_{t-1} + i_t * z_t
    o_t = sigma(a_t^o + p_o * c_t)              y_t = o_t * h(c_t)            g = h = tanh
The output gate's peephole sees the new cell c_t, the other two the old one.

Two implementations of the same loop: lstm_recurrent, the reference, differentiated by autograd
through every step; lstm_bptt, the fast path, one autograd Function whose backward pass (BPTT) is
written out and checked against the reference in tests/ops/test_lstm.py.

Variants: NIG / NFG / NOG: i / f / o fixed to 1 (its block and peephole are gone). NIAF: g = identity.
NOAF: h = identity. NP: no peepholes; with R = weight_hh and x_proj = x weight_ih^T + b_ih + b_hh it is
exactly torch.nn.LSTM. CIFG: f_t = 1 - i_t (no f block). FGR: every gate's pre-activation also gets
R_gates [i_{t-1}; f_{t-1}; o_{t-1}], the paper's nine matrices R_ii, R_fi, ..., R_oo as one [3N, 3N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .lstm_fused import fused_backward, fused_forward, fused_lstm_available, variant_spec

# The blocks of x_proj and R, and the rows of p, in order, per variant.
GATES = {"vanilla": "ifzo", "NIG": "fzo", "NFG": "izo", "NOG": "ifz", "NIAF": "ifzo", "NOAF": "ifzo",
         "NP": "ifzo", "CIFG": "izo", "FGR": "ifzo"}
PEEPHOLES = {v: "" if v == "NP" else "".join(k for k in g if k != "z") for v, g in GATES.items()}
VARIANTS = tuple(GATES)

LSTMState = tuple[Tensor, ...]  # (y, c), each [B, N]; FGR adds the previous gates [i; f; o]: [B, 3N]


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
                   variant: str = "vanilla", initial_state: LSTMState | None = None,
                   output_final_state: bool = False) -> tuple[Tensor, LSTMState | None]:
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


def lstm_bptt(x_proj: Tensor, R: Tensor, p: Tensor | None = None, *, R_gates: Tensor | None = None,
              variant: str = "vanilla", initial_state: LSTMState | None = None,
              output_final_state: bool = False) -> tuple[Tensor, LSTMState | None]:
    """lstm_recurrent's loop inside one autograd Function whose backward (BPTT) is written out: the same
    arguments and results, without an autograd graph of ~15 nodes per step. The recurrent weights'
    and peepholes' gradients are then a few big products over all steps, after the loop."""
    dtype = x_proj.dtype
    x_proj, R, p, R_gates, state = _prepare(x_proj, R, p, R_gates, variant, initial_state)
    with torch.autocast(x_proj.device.type, enabled=False):  # the loop's products stay in float32
        y, *final = _LSTMLoop.apply(variant, x_proj, R, p, R_gates, *state)
    return y.to(dtype), (tuple(final) if output_final_state else None)


class _LSTMLoop(torch.autograd.Function):
    """Forward: the loop, keeping each step's gate activations. Backward: the adjoint loop, from the last
    step to the first, carrying dL/dy_t, dL/dc_t (and FGR's dL/d[i; f; o]_t) back through each step."""

    @staticmethod
    def forward(ctx, variant, x_proj, R, p, R_gates, y, c, *prev):
        ctx.variant, ctx.fused, initial = variant, fused_lstm_available(x_proj), (y, c, *prev)
        if ctx.fused:
            A, C, Y, c_T, *prev_T = fused_forward(_spec(variant), x_proj, R, p, R_gates, y, c, *prev)
        else:
            A, C, Y, c_T, *prev_T = _forward_loop(variant, x_proj, R, p, R_gates, y, c, *prev)
        ctx.save_for_backward(R, p, R_gates, A, C, Y, *initial)
        return (Y, Y[:, -1].clone(), c_T.clone(), *prev_T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY, dy, dc, *dprev):  # gradients arrive materialised (zeros where unused)
        R, p, R_gates, A, C, Y, y0, c0, *prev0 = ctx.saved_tensors
        saved = dict(R=R, p=p, R_gates=R_gates, A=A, C=C, c0=c0)
        if ctx.fused:
            dA, dy0, dc0, *dprev0 = fused_backward(_spec(ctx.variant), dY, dy, dc, *dprev, **saved)
        else:
            dA, dy0, dc0, *dprev0 = _backward_loop(ctx.variant, dY, dy, dc, *dprev, **saved)
        dR, dp, dR_gates = _weight_grads(ctx.variant, dA, A, C, Y, y0, c0, *prev0, p=p)
        return (None, dA.flatten(2), dR, dp, dR_gates, dy0, dc0, *dprev0)


def _forward_loop(variant, x_proj, R, p, R_gates, y, c, *prev):
    """The loop in PyTorch, the fused kernel's reference: (A [B, T, G, N] each step's gate activations
    (z for the z block), C, Y [B, T, N], c_T[, FGR's [i; f; o]_T])."""
    gates, peep = GATES[variant], PEEPHOLES[variant]
    (B, T, _), G, N = x_proj.shape, len(gates), R.shape[1]
    ji, jf, jz, jo = (gates.index(k) if k in gates else None for k in "ifzo")
    ifo = [ji, jf, jo] if prev else []
    n_old = sum(k in peep for k in "if")  # the leading blocks, which peep at c_{t-1}
    p_o = p[peep.index("o")] if "o" in peep else None
    # Every step writes its gate activations, cell and output straight into these.
    A, C, Y = x_proj.new_empty(B, T, G, N), x_proj.new_empty(B, T, N), x_proj.new_empty(B, T, N)
    for t in range(T):
        a = torch.addmm(x_proj[:, t], y, R.t()).unflatten(-1, (G, N))
        if prev:  # FGR: the gates also see all gates' previous activations
            a[:, ifo] += (prev[0] @ R_gates.t()).unflatten(-1, (3, N))
        if n_old:
            a[:, :n_old].addcmul_(p[:n_old], c[:, None])
        act = A[:, t]
        torch.sigmoid(a, out=act)  # every block at once; z and (with a peephole) o are redone below
        if variant == "NIAF":
            act[:, jz] = a[:, jz]
        else:
            torch.tanh(a[:, jz], out=act[:, jz])
        iz = act[:, jz] if ji is None else act[:, ji] * act[:, jz]
        f = act[:, jf] if jf is not None else (1 - act[:, ji] if variant == "CIFG" else None)
        c = torch.add(c, iz, out=C[:, t]) if f is None else torch.addcmul(iz, f, c, out=C[:, t])
        hc = _h(variant, c)
        if jo is None:
            Y[:, t] = hc
        else:
            if p_o is not None:  # o peeps at the new cell
                torch.sigmoid(torch.addcmul(a[:, jo], p_o, c), out=act[:, jo])
            torch.mul(act[:, jo], hc, out=Y[:, t])
        y = Y[:, t]
        if prev:
            prev = (act[:, ifo].flatten(1),)
    return (A, C, Y, c, *prev)


def _backward_loop(variant, dY, dy, dc, *dprev, R, p, R_gates, A, C, c0):
    """The adjoint loop in PyTorch, the fused kernel's reference: (dA [B, T, G, N] the pre-activations'
    gradients, dL/dy_0, dL/dc_0[, FGR's dL/d[i; f; o]_0])."""
    gates, peep = GATES[variant], PEEPHOLES[variant]
    act = dict(zip(gates, A.unbind(2)))  # each [B, T, N]
    C_prev = torch.cat([c0[:, None], C[:, :-1]], dim=1)
    hc = _h(variant, C)
    # Every factor that does not depend on the incoming gradients, for all steps at once, so that
    # a step of the loop is a few multiply-adds: dL/da_k = dL/dc_t * factor[k] for k in i, f, z
    # (CIFG's f = 1 - i folds its f path into i's factor), dL/da_o = dL/dy_t * factor["o"].
    slope = {k: act[k] * (1 - act[k]) for k in "ifo" if k in act}  # sigma' = s (1 - s)
    factor = {"z": (1.0 if variant == "NIAF" else 1 - act["z"].square()) * act.get("i", 1.0)}
    if "i" in act:
        factor["i"] = slope["i"] * (act["z"] - C_prev if variant == "CIFG" else act["z"])
    if "f" in act:
        factor["f"] = slope["f"] * C_prev
    if "o" in act:
        factor["o"] = slope["o"] * hc
    keep = act["f"] if "f" in act else (1 - act["i"] if variant == "CIFG" else None)  # dc_t/dc_{t-1}
    dy_dc = torch.ones_like(C) if variant == "NOAF" else 1 - hc.square()  # dy_t/dc_t at fixed o
    if "o" in act:
        dy_dc = dy_dc * act["o"]
    n_old, p_o = sum(k in peep for k in "if"), (p[peep.index("o")] if "o" in peep else None)
    blocks = [(gates.index(k), factor[k], slope.get(k), "ifo".find(k)) for k in gates if k != "o"]
    jo = gates.index("o") if "o" in gates else None
    fgr = bool(dprev)
    dprev = dprev[0].unflatten(-1, (3, -1)) if fgr else None
    dA = torch.empty_like(A)  # dL/d(pre-activations), filled step by step: also dL/dx_proj
    for t in reversed(range(A.shape[1])):
        da = dA[:, t]
        dy_t = dY[:, t] + dy
        dc_t = torch.addcmul(dc, dy_t, dy_dc[:, t])
        if jo is not None:
            torch.mul(dy_t, factor["o"][:, t], out=da[:, jo])
            if fgr:
                da[:, jo].addcmul_(dprev[:, 2], slope["o"][:, t])
            if p_o is not None:
                dc_t.addcmul_(da[:, jo], p_o)
        for j, fac, s, r in blocks:
            torch.mul(dc_t, fac[:, t], out=da[:, j])
            if fgr and r >= 0:
                da[:, j].addcmul_(dprev[:, r], s[:, t])
        dc = dc_t if keep is None else dc_t * keep[:, t]
        if n_old:
            dc += (da[:, :n_old] * p[:n_old]).sum(1)
        dy = da.flatten(1) @ R
        if fgr:
            dprev = (da[:, [gates.index(k) for k in "ifo"]].flatten(1) @ R_gates).unflatten(-1, (3, -1))
    return (dA, dy, dc, *((dprev.flatten(1),) if fgr else ()))


def _weight_grads(variant: str, dA: Tensor, A: Tensor, C: Tensor, Y: Tensor, y0: Tensor, c0: Tensor,
                 *prev0: Tensor, p: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dL/dR, dL/dp and FGR's dL/dR_gates from every step's pre-activation gradients dA [B, T, G, N]:
    sums over all (batch, step) pairs, as single products after the loop."""
    gates, peep = GATES[variant], PEEPHOLES[variant]
    C_prev = torch.cat([c0[:, None], C[:, :-1]], dim=1)
    Y_prev = torch.cat([y0[:, None], Y[:, :-1]], dim=1)
    dR = dA.flatten(2).flatten(0, 1).t() @ Y_prev.flatten(0, 1)
    dp = None
    if p is not None:
        dp = torch.stack([(dA[:, :, gates.index(k)] * (C if k == "o" else C_prev)).sum((0, 1)) for k in peep])
    dR_gates = None
    if prev0:  # FGR
        ifo = [gates.index(k) for k in "ifo"]
        P = torch.cat([prev0[0][:, None], A[:, :-1][:, :, ifo].flatten(2)], dim=1)  # [i; f; o]_{t-1}
        dR_gates = dA[:, :, ifo].flatten(2).flatten(0, 1).t() @ P.flatten(0, 1)
    return dR, dp, dR_gates


def _spec(variant: str) -> list[int]:
    """The variant as the fused kernel reads it (ops/lstm_fused.py)."""
    return variant_spec(GATES[variant], PEEPHOLES[variant], cifg=variant == "CIFG", niaf=variant == "NIAF",
                        noaf=variant == "NOAF", fgr=variant == "FGR")


def _h(variant: str, c: Tensor) -> Tensor:
    """The cell's output nonlinearity: tanh, or the identity for NOAF."""
    return c if variant == "NOAF" else torch.tanh(c)


LSTM_MODES = {"recurrent": lstm_recurrent, "bptt": lstm_bptt}
