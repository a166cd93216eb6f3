"""Both LSTM ops (the reference loop and lstm_bptt, its fast path with a written-out backward) against
torch.nn.LSTM (NP) and against the paper's equations written out by hand for every variant (outputs,
final states and all gradients), the fast path against the reference on long sequences, each
variant's defining property, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_rms

from gateloop.ops.lstm import GATES, LSTM_MODES, PEEPHOLES, VARIANTS, lstm_bptt, lstm_recurrent

B, N, DX = 2, 4, 5
f64 = torch.float64


def rnd(*shape, seed):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", LSTM_MODES)
@pytest.mark.parametrize("T", [1, 7, 200])
def test_np_equals_torch_lstm(T, mode):
    """NP is torch.nn.LSTM: outputs, final (h, c) and the gradients of every weight, x, h0 and c0."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(DX, N, batch_first=True).double()
    x, h0, c0 = (rnd(*s, seed=i).requires_grad_() for i, s in enumerate([(B, T, DX), (1, B, N), (1, B, N)]))
    w_y, w_h, w_c = rnd(B, T, N, seed=10), rnd(B, N, seed=11), rnd(B, N, seed=12)
    params = [ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0]

    def loss_and_grads(y, h, c):
        loss = (y * w_y).sum() + (h * w_h).sum() + (c * w_c).sum()
        return y.detach(), h.detach(), c.detach(), torch.autograd.grad(loss, [x, h0, c0, *params])

    y_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    expected = loss_and_grads(y_ref, h_ref[0], c_ref[0])
    x_proj = F.linear(x, ref.weight_ih_l0, ref.bias_ih_l0 + ref.bias_hh_l0)
    y, (h, c) = LSTM_MODES[mode](x_proj, ref.weight_hh_l0, variant="NP", initial_state=(h0[0], c0[0]),
                                 output_final_state=True)
    actual = loss_and_grads(y, h, c)
    for what, a, e in zip(["y", "h", "c"], actual[:3], expected[:3]):
        assert_close_rms(a, e, what=what)
    for what, a, e in zip(["x", "h0", "c0", "W_ih", "W_hh", "b_ih", "b_hh"], actual[3], expected[3]):
        assert_close_rms(a, e, what=f"d/d{what}")


def full_params(seed=0):
    """Every weight of the vanilla LSTM plus FGR's, by name: input parts a[k] [B, T, N] per block,
    recurrent R[k] [N, N], peepholes p[k] [N], R_gates [3N, 3N], and an initial state."""
    leaves = {f"a{k}": rnd(B, 9, N, seed=seed + j) for j, k in enumerate("ifzo")}
    leaves |= {f"R{k}": 0.5 * rnd(N, N, seed=seed + 10 + j) for j, k in enumerate("ifzo")}
    leaves |= {f"p{k}": rnd(N, seed=seed + 20 + j) for j, k in enumerate("ifo")}
    leaves |= {"R_gates": 0.5 * rnd(3 * N, 3 * N, seed=seed + 30), "y0": rnd(B, N, seed=seed + 31),
               "c0": rnd(B, N, seed=seed + 32), "g0": torch.rand(B, 3 * N, dtype=f64)}
    return {k: v.requires_grad_() for k, v in leaves.items()}


def paper_lstm(P, variant, T):
    """The paper's equations, one step at a time, with each variant's change written out."""
    y, c, prev = P["y0"], P["c0"], P["g0"]
    ys = []
    for t in range(T):
        a = {k: P[f"a{k}"][:, t] + y @ P[f"R{k}"].T for k in "ifzo"}
        if variant == "FGR":
            for k, extra in zip("ifo", (prev @ P["R_gates"].T).chunk(3, dim=-1)):
                a[k] = a[k] + extra
        peep = {k: (0 if variant == "NP" else P[f"p{k}"]) for k in "ifo"}
        i = torch.sigmoid(a["i"] + peep["i"] * c)
        f = torch.sigmoid(a["f"] + peep["f"] * c)
        i = torch.ones_like(i) if variant == "NIG" else i
        f = torch.ones_like(f) if variant == "NFG" else 1 - i if variant == "CIFG" else f
        z = a["z"] if variant == "NIAF" else torch.tanh(a["z"])
        c = f * c + i * z
        o = torch.sigmoid(a["o"] + peep["o"] * c)
        o = torch.ones_like(o) if variant == "NOG" else o
        y = o * (c if variant == "NOAF" else torch.tanh(c))
        prev = torch.cat([i, f, o], dim=-1)
        ys.append(y)
    return torch.stack(ys, dim=1), ((y, c, prev) if variant == "FGR" else (y, c))


def op_lstm(P, variant, T, dtype=f64, mode="recurrent"):
    """The op on the blocks its variant declares (GATES, PEEPHOLES), taken from the full set."""
    cast = (lambda name: P[name].to(dtype))
    x_proj = torch.cat([cast(f"a{k}")[:, :T] for k in GATES[variant]], dim=-1)
    R = torch.cat([cast(f"R{k}") for k in GATES[variant]], dim=0)
    p = torch.stack([cast(f"p{k}") for k in PEEPHOLES[variant]]) if PEEPHOLES[variant] else None
    state = (cast("y0"), cast("c0")) + ((cast("g0"),) if variant == "FGR" else ())
    return LSTM_MODES[mode](x_proj, R, p, R_gates=cast("R_gates") if variant == "FGR" else None,
                            variant=variant, initial_state=state, output_final_state=True)


def outputs_and_grads(P, result):
    y, state = result
    g = torch.Generator().manual_seed(99)
    loss = sum((s * torch.randn(s.shape, generator=g, dtype=f64).to(s.dtype)).sum() for s in [y, *state])
    grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True, materialize_grads=True)
    return [y.detach(), *(s.detach() for s in state)], dict(zip(P, grads))


@pytest.mark.parametrize("mode", LSTM_MODES)
@pytest.mark.parametrize("dtype", [f64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("variant", VARIANTS)
def test_op_matches_the_papers_equations(variant, T, dtype, mode):
    P = full_params()
    out_ref, grads_ref = outputs_and_grads(P, paper_lstm(P, variant, T))
    out, grads = outputs_and_grads(P, op_lstm(P, variant, T, dtype, mode))
    for j, (a, e) in enumerate(zip(out, out_ref, strict=True)):
        assert a.dtype == dtype
        assert_close_rms(a, e, dtype, what=f"{variant} output/state {j}")
    for name, e in grads_ref.items():
        assert_close_rms(grads[name], e, dtype, what=f"{variant} d/d{name}")
        assert torch.isfinite(grads[name]).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_loop_matches_the_reference_on_long_sequences(variant):
    """lstm_bptt against lstm_recurrent over 300 float32 steps from a non-zero state, with gradients
    flowing in from only part of the outputs (the rest arrive as zeros) and from the final state."""
    Bl, Nl, T = 3, 16, 300
    G, P = len(GATES[variant]), len(PEEPHOLES[variant])
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(Bl, T, G * Nl, generator=g), torch.randn(G * Nl, Nl, generator=g) / Nl ** 0.5,
              torch.randn(P, Nl, generator=g) if P else None,
              torch.randn(3 * Nl, 3 * Nl, generator=g) / (3 * Nl) ** 0.5 if variant == "FGR" else None,
              torch.randn(Bl, Nl, generator=g), torch.randn(Bl, Nl, generator=g)]
    if variant == "FGR":
        leaves.append(torch.rand(Bl, 3 * Nl, generator=g))
    leaves = [x if x is None else x.requires_grad_() for x in leaves]
    w = torch.randn(Bl, T, Nl, generator=g) * (torch.arange(T) < 250)[:, None]  # the last steps get no output gradient
    results = {}
    for mode, op in LSTM_MODES.items():
        x_proj, R, p, R_gates, *state = leaves
        y, final = op(x_proj, R, p, R_gates=R_gates, variant=variant, initial_state=tuple(state),
                      output_final_state=True)
        loss = (y * w).sum() + final[1].square().sum()
        used = [x for x in leaves if x is not None]
        results[mode] = (y.detach(), *(s.detach() for s in final), *torch.autograd.grad(loss, used))
    for j, (a, e) in enumerate(zip(results["bptt"], results["recurrent"], strict=True)):
        assert_close_rms(a, e, torch.float32, what=f"{variant}: output, state or gradient {j}")


def test_fast_loop_keeps_float32_under_autocast():
    x, R, p = rnd(B, 5, 4 * N, seed=0).float(), rnd(4 * N, N, seed=1).float(), rnd(3, N, seed=2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = lstm_bptt(x, R, p, output_final_state=True)
    assert y.dtype == torch.float32 and s[1].dtype == torch.float32
    assert_close_rms(y, lstm_recurrent(x, R, p)[0], torch.float32)


def one_step(variant, z_pre=0.0, c0=None, seed=0):
    """One step from y0 = 0 (so R plays no part): final (y, c) for given z-block input and c0."""
    x_proj = rnd(B, 1, len(GATES[variant]) * N, seed=seed)
    x_proj.view(B, 1, -1, N)[:, 0, GATES[variant].index("z")] = z_pre
    R = rnd(len(GATES[variant]) * N, N, seed=seed + 1)
    p = rnd(len(PEEPHOLES[variant]), N, seed=seed + 2) if PEEPHOLES[variant] else None
    R_gates = rnd(3 * N, 3 * N, seed=seed + 3) if variant == "FGR" else None
    state = None if c0 is None else (torch.zeros(B, N, dtype=f64), c0) + (
        (torch.zeros(B, 3 * N, dtype=f64),) if variant == "FGR" else ())
    y, s = lstm_recurrent(x_proj, R, p, R_gates=R_gates, variant=variant, initial_state=state,
                          output_final_state=True)
    assert torch.equal(y[:, -1], s[0])
    return s[0], s[1]


def test_each_variants_defining_property():
    c0, z = rnd(B, N, seed=5), rnd(B, N, seed=6)
    # NIG: i = 1, so from c0 = 0 the cell is exactly z = tanh(a_z); vanilla scales it by i < 1.
    assert_close_rms(one_step("NIG", z)[1], torch.tanh(z))
    assert (one_step("vanilla", z)[1].abs() < torch.tanh(z).abs()).all()
    # NFG: f = 1, so with z = 0 the cell keeps c0 exactly; vanilla forgets part of it.
    assert torch.equal(one_step("NFG", 0.0, c0)[1], c0)
    assert (one_step("vanilla", 0.0, c0)[1].abs() < c0.abs()).all()
    # CIFG: f = 1 - i, a convex combination: a cell equal to z = tanh(a_z) stays put.
    assert_close_rms(one_step("CIFG", z, torch.tanh(z))[1], torch.tanh(z))
    # NOG: o = 1, so y = tanh(c) exactly.
    y, c = one_step("NOG", z, c0)
    assert torch.equal(y, torch.tanh(c))
    # NOAF: y = o * c where vanilla has y = o * tanh(c), the same o and c in the first step (y0 = 0).
    y, c = one_step("NOAF", z, 10 * c0)
    y_vanilla, c_vanilla = one_step("vanilla", z, 10 * c0)
    assert torch.equal(c, c_vanilla) and (y.abs() > 1).any() and (y_vanilla.abs() < 1).all()
    assert_close_rms(y, y_vanilla / torch.tanh(c) * c)
    # NIAF: g = identity, so from c0 = 0 the cell is linear in a_z (and unbounded).
    assert_close_rms(one_step("NIAF", 10 * z)[1], 10 * one_step("NIAF", z)[1])
    # FGR: the state carries the gates (i, f, o) in (0, 1); with R_gates = 0 it is the vanilla LSTM.
    x_proj, R, p = rnd(B, 6, 4 * N, seed=7), rnd(4 * N, N, seed=8), rnd(3, N, seed=9)
    y, s = lstm_recurrent(x_proj, R, p, R_gates=torch.zeros(3 * N, 3 * N, dtype=f64), variant="FGR",
                          output_final_state=True)
    assert len(s) == 3 and s[2].shape == (B, 3 * N) and ((s[2] > 0) & (s[2] < 1)).all()
    assert_close_rms(y, lstm_recurrent(x_proj, R, p)[0])


def test_fgr_is_the_papers_nine_matrices():
    """Greff et al.'s FGR, term by term: the pre-activation of gate k in (i, f, o) gains
    R_ik i_{t-1} + R_fk f_{t-1} + R_ok o_{t-1} (R_jk: from gate j to gate k, after the sigmoids);
    the block input z gains nothing. R_gates holds R_jk as its block (row k, column j)."""
    T = 5
    x_proj, R, p = rnd(B, T, 4 * N, seed=11), 0.5 * rnd(4 * N, N, seed=12), rnd(3, N, seed=13)
    nine = {j + k: rnd(N, N, seed=20 + n) for n, (j, k) in enumerate((j, k) for j in "ifo" for k in "ifo")}
    R_gates = torch.cat([torch.cat([nine[j + k] for j in "ifo"], dim=1) for k in "ifo"], dim=0)
    y, c, gates = torch.zeros(B, N, dtype=f64), torch.zeros(B, N, dtype=f64), dict.fromkeys("ifo", 0.0)
    ys = []
    for t in range(T):
        a = dict(zip("ifzo", (x_proj[:, t] + y @ R.T).chunk(4, dim=-1)))
        for k in "ifo":  # the paper's start: no previous gates
            a[k] = a[k] + sum(gates[j] @ nine[j + k].T for j in "ifo" if t > 0)
        gates["i"] = torch.sigmoid(a["i"] + p[0] * c)
        gates["f"] = torch.sigmoid(a["f"] + p[1] * c)
        c = gates["f"] * c + gates["i"] * torch.tanh(a["z"])
        gates["o"] = torch.sigmoid(a["o"] + p[2] * c)
        y = gates["o"] * torch.tanh(c)
        ys.append(y)
    for op in LSTM_MODES.values():
        out, (y_T, c_T, g_T) = op(x_proj, R, p, R_gates=R_gates, variant="FGR", output_final_state=True)
        assert_close_rms(out, torch.stack(ys, dim=1))
        assert_close_rms(g_T, torch.cat([gates[k] for k in "ifo"], dim=-1))


def test_block_layout():
    """Blocks keep torch.nn.LSTM's order i, f, z, o; a removed gate loses its block and its peephole."""
    removed = {"NIG": "i", "NFG": "f", "NOG": "o", "CIFG": "f"}
    for variant in VARIANTS:
        assert GATES[variant] == "ifzo".replace(removed.get(variant, "-"), "")
        assert PEEPHOLES[variant] == ("" if variant == "NP" else GATES[variant].replace("z", ""))


def test_bfloat16_accumulates_in_float32():
    P = full_params()
    with torch.no_grad():
        y64, s64 = op_lstm(P, "vanilla", 9)
        y16, s16 = op_lstm(P, "vanilla", 9, torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in s16)
    assert_close_rms(y16, y64, tol=5e-2, what="bfloat16 output")


@pytest.mark.parametrize("mode", LSTM_MODES)
def test_bad_arguments_raise(mode):
    op = LSTM_MODES[mode]
    x, R, p = rnd(B, 3, 4 * N, seed=0), rnd(4 * N, N, seed=1), rnd(3, N, seed=2)
    with pytest.raises(ValueError, match="variant"):
        op(x, R, p, variant="GRU")
    with pytest.raises(ValueError, match="x_proj"):
        op(x[..., :-1], R, p)
    with pytest.raises(ValueError, match="x_proj"):
        op(x[:, :0], R, p)
    with pytest.raises(ValueError, match="R must be"):
        op(x[..., :3 * N], R[:3 * N], p[:2], variant="vanilla")
    with pytest.raises(ValueError, match="needs p"):
        op(x, R, p, variant="NP")
    with pytest.raises(ValueError, match="needs p"):
        op(x, R, None)
    with pytest.raises(ValueError, match="R_gates"):
        op(x, R, p, variant="FGR")
    with pytest.raises(ValueError, match="R_gates"):
        op(x, R, p, R_gates=torch.zeros(3 * N, 3 * N, dtype=f64))
    with pytest.raises(ValueError, match="initial_state"):
        op(x, R, p, initial_state=(torch.zeros(B, N, dtype=f64),))
    with pytest.raises(ValueError, match="initial_state"):
        op(x, R, p, R_gates=torch.zeros(3 * N, 3 * N, dtype=f64), variant="FGR",
                       initial_state=(torch.zeros(B, N, dtype=f64),) * 2)


def _op_outputs_and_grads(variant, dtype, T, n, seed=0, batch=B):
    """lstm_bptt's outputs, final state and every gradient on random inputs with an initial state."""
    g = torch.Generator().manual_seed(seed)
    G, P = len(GATES[variant]), len(PEEPHOLES[variant])
    r = (lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g, dtype=f64)).to(dtype).requires_grad_())
    leaves = [r(batch, T, G * n), r(G * n, n, scale=0.5), r(P, n) if P else None,
              r(3 * n, 3 * n, scale=0.3) if variant == "FGR" else None,
              r(batch, n), r(batch, n)] + ([r(batch, 3 * n)] if variant == "FGR" else [])
    x, R, p, R_gates, *state = leaves
    y, final = lstm_bptt(x, R, p, R_gates=R_gates, variant=variant, initial_state=tuple(state),
                         output_final_state=True)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=f64).to(dtype)).sum() for t in (y, *final))
    used = [t for t in leaves if t is not None]
    return [y.detach(), *(f.detach() for f in final), *torch.autograd.grad(loss, used)]


@pytest.mark.parametrize("dtype", [f64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_kernel_matches_the_pytorch_loop(variant, dtype, monkeypatch):
    """The C++ loop (ops/lstm_fused.py) against the PyTorch loops it replaces, for every variant:
    outputs, final state and every gradient; 13 units, so the float32 kernel's 8-wide rows end in a
    partial one; float32 with the kernel's own exp and tanh."""
    from gateloop.ops import lstm_fused

    if not lstm_fused.fused_lstm_available(torch.zeros(1)):
        pytest.skip("the fused LSTM kernel cannot be built here")
    fused = _op_outputs_and_grads(variant, dtype, T=23, n=13)
    monkeypatch.setenv("GATELOOP_FUSED", "0")
    reference = _op_outputs_and_grads(variant, dtype, T=23, n=13)
    assert len(fused) == len(reference)
    for i, (a, e) in enumerate(zip(fused, reference)):
        assert_close_rms(a, e, dtype, what=f"result {i} (outputs, final state, then gradients)")


@pytest.mark.parametrize("batch, n", [(1, 5), (7, 16), (13, 21)])
@pytest.mark.parametrize("variant", ["vanilla", "FGR"])
def test_fused_products_match_at_every_block_shape(variant, batch, n, monkeypatch):
    """The float32 kernel's own per-step products take rows in blocks of 6 and columns in panels of
    16: batches of 1, 7 (6 + 1) and 13 (6 + 6 + 1), widths with and without a partial panel, forward
    (R^T, R_gates^T) and backward (R, R_gates)."""
    from gateloop.ops import lstm_fused

    if not lstm_fused.fused_lstm_available(torch.zeros(1)):
        pytest.skip("the fused LSTM kernel cannot be built here")
    fused = _op_outputs_and_grads(variant, torch.float32, T=6, n=n, batch=batch)
    monkeypatch.setenv("GATELOOP_FUSED", "0")
    reference = _op_outputs_and_grads(variant, torch.float32, T=6, n=n, batch=batch)
    for i, (a, e) in enumerate(zip(fused, reference)):
        assert_close_rms(a, e, torch.float32, what=f"result {i} (outputs, final state, then gradients)")


def test_lstm_bptt_takes_the_kernel_unless_switched_off(monkeypatch):
    from gateloop.ops import lstm_fused

    calls = []
    real = lstm_fused.fused_forward
    monkeypatch.setattr("gateloop.ops.lstm.fused_forward", lambda *a: calls.append(1) or real(*a))
    x, R = rnd(1, 3, 4 * N, seed=0), rnd(4 * N, N, seed=1)
    lstm_bptt(x, R, rnd(3, N, seed=2))
    expected = [1] if lstm_fused.fused_lstm_available(x) else []
    assert calls == expected
    monkeypatch.setenv("GATELOOP_FUSED", "0")
    lstm_bptt(x, R, rnd(3, N, seed=2))
    assert calls == expected
