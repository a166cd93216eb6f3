"""minGRU / minLSTM: the log-space scan and the blocked mode against the recurrent reference (outputs,
final states and every gradient, the initial state's included), split sequences, saturated gates,
and the log g(h0) bug."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_rms, assert_probes_close, probe, rel_rms

from gateloop.ops.min_rnn import MINGRU_MODES, MINLSTM_MODES, g, log_g, mingru_recurrent, mingru_scan

FAMILIES = {"mingru": (MINGRU_MODES, ["k_z"]), "minlstm": (MINLSTM_MODES, ["k_f", "k_i"])}
PARALLEL = ["scan", "blocked"]


def make_leaves(T, family, *, B=2, D=5, init=True, seed=0):
    """float64 leaves: gate logits (some saturated), candidate pre-activations, a signed h0."""
    gen = torch.Generator().manual_seed(seed)
    rnd = functools.partial(torch.randn, generator=gen, dtype=torch.float64)
    leaves = {name: 2 * rnd(B, T, D) for name in FAMILIES[family][1]}
    leaves["h_tilde_pre"] = 2 * rnd(B, T, D)
    if init:
        leaves["h0"] = rnd(B, D)  # about half the entries negative
    return {name: x.requires_grad_() for name, x in leaves.items()}


def call(mode, family, leaves, dtype=torch.float64, **kw):
    """The op on the leaves cast to dtype: (h, final_state)."""
    args = [leaves[name].to(dtype) for name in FAMILIES[family][1] + ["h_tilde_pre"]]
    h0 = leaves["h0"].to(dtype) if "h0" in leaves else None
    return FAMILIES[family][0][mode](*args, initial_state=h0, output_final_state=True, **kw)


def run(mode, family, leaves, dtype=torch.float64, **kw):
    """probe() of the op's output and final state."""
    return probe(call(mode, family, leaves, dtype, **kw), leaves)


@functools.lru_cache(maxsize=None)
def reference(T, family, init, use_g):
    leaves = make_leaves(T, family, init=init)
    return leaves, run("recurrent", family, leaves, use_g=use_g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "signed-state"])
@pytest.mark.parametrize("use_g", [True, False], ids=["g", "identity"])
@pytest.mark.parametrize("T", [1, 7, 64, 65, 1000])
@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_modes_match_recurrent(family, mode, T, use_g, init, dtype):
    leaves, expected = reference(T, family, init, use_g)
    assert_probes_close(run(mode, family, leaves, dtype, use_g=use_g), expected, dtype, what=f"{family} {mode} T={T}")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64, 100, None])
@pytest.mark.parametrize("use_g", [True, False], ids=["g", "identity"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunk_sizes(family, use_g, chunk_size):
    leaves, expected = reference(65, family, True, use_g)
    result = run("scan", family, leaves, use_g=use_g, chunk_size=chunk_size)
    assert_probes_close(result, expected, torch.float64, what=f"{family} C={chunk_size}")


@pytest.mark.parametrize("split", [1, 30, 64, 99])
@pytest.mark.parametrize("mode", list(MINGRU_MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_sequence_carries_state(family, mode, split):
    """[0, t) then [t, T) from the carried state equals one pass: outputs, state, all gradients."""
    leaves = make_leaves(100, family)
    names = FAMILIES[family][1] + ["h_tilde_pre"]
    op = FAMILIES[family][0][mode]
    h1, S1 = op(*(leaves[n][:, :split] for n in names), initial_state=leaves["h0"], output_final_state=True)
    h2, S2 = op(*(leaves[n][:, split:] for n in names), initial_state=S1, output_final_state=True)
    pieces = probe([torch.cat([h1, h2], dim=1), S2], leaves)
    whole = probe(op(*(leaves[n] for n in names), initial_state=leaves["h0"], output_final_state=True), leaves)
    assert_probes_close(pieces, whole, torch.float64, what=f"split at {split}")


def heinsen_scan(log_a, log_b, log_h0):
    """The paper's listing: log h0 put in front of log b, one logcumsumexp over the whole sequence."""
    log_a = F.pad(log_a, (0, 0, 1, 0))
    a_star = log_a.cumsum(1)
    log_h = a_star + torch.logcumsumexp(torch.cat([log_h0[:, None], log_b], dim=1) - a_star, dim=1)
    return torch.exp(log_h)[:, 1:]


def test_paper_formula_equals_ours_for_positive_h0():
    k_z, h_tilde_pre = make_leaves(50, "mingru", init=False).values()
    h0 = torch.rand(2, 5, dtype=torch.float64) + 0.1
    expected = heinsen_scan(-F.softplus(k_z), -F.softplus(-k_z) + log_g(h_tilde_pre), torch.log(h0))
    h, _ = mingru_scan(k_z, h_tilde_pre, initial_state=h0)
    assert_close_rms(h, expected, torch.float64)


@pytest.mark.parametrize("log_of_state", [torch.log, log_g], ids=["log h0", "log g(h0) (the bug)"])
@torch.no_grad()
def test_split_sequence_catches_log_g_of_initial_state(log_of_state):
    """A public minGRU (lucidrains/minGRU-pytorch) feeds a carried state to the scan as log g(h), as
    if it were a pre-activation; the state is already past g, so it must enter as log h. The split
    test finds it: with log g, continuing from the state of a first piece no longer equals one pass."""
    k_z, h_tilde_pre = make_leaves(60, "mingru", init=False).values()
    log_a, log_b = -F.softplus(k_z), -F.softplus(-k_z) + log_g(h_tilde_pre)
    full, _ = mingru_recurrent(k_z, h_tilde_pre)
    first = heinsen_scan(log_a[:, :20], log_b[:, :20], torch.full_like(log_a[:, 0], -torch.inf))
    second = heinsen_scan(log_a[:, 20:], log_b[:, 20:], log_of_state(first[:, -1]))
    err = rel_rms(torch.cat([first, second], dim=1), full)
    if log_of_state is torch.log:
        assert err < TOL[torch.float64]
    else:
        assert err > 1e-2


def test_g_and_log_g():
    x = torch.linspace(-40, 40, 1001, dtype=torch.float64)
    assert (g(x) > 0).all()
    assert_close_rms(log_g(x), torch.log(g(x)), torch.float64)
    assert g(torch.tensor(0.0)) == 0.5 and g(torch.tensor(-1e-9)).item() == pytest.approx(0.5)  # continuous
    assert log_g(torch.tensor(-1000.0)).item() == -1000.0  # g underflows to 0 there; log g does not


@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_states_stay_positive_with_g(family, mode):
    leaves = make_leaves(200, family, init=False)
    h, _ = call(mode, family, leaves)
    assert (h > 0).all()


@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_and_negative_candidates_without_g(family, mode):
    """use_g=False: candidates exactly 0 for the first 5 steps, and all <= 0 in channel 0 (its positive
    part is missing throughout). No NaN, and a zero candidate keeps its gradient dh/dh~ = z != 0."""
    leaves = make_leaves(40, family, init=False)
    with torch.no_grad():
        leaves["h_tilde_pre"][:, :5] = 0
        leaves["h_tilde_pre"][:, :, 0] = -leaves["h_tilde_pre"][:, :, 0].abs()
    expected = run("recurrent", family, leaves, use_g=False)
    for dtype in (torch.float64, torch.float32):
        result = run(mode, family, leaves, dtype, use_g=False, **({"chunk_size": 8} if mode == "scan" else {}))
        assert_probes_close(result, expected, dtype, what=str(dtype))


@pytest.mark.parametrize("mode", PARALLEL)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_saturated_gates_stay_finite_in_float32(family, mode):
    """Logits of +-60 make sigma round to exactly 0 or 1 in float32; the log-space gates never do, and
    the blocked mode takes 1 - z as sigma(-k_z)."""
    leaves = make_leaves(100, family)
    with torch.no_grad():
        for name in FAMILIES[family][1]:
            leaves[name].mul_(30)
    (h, S), grads = run(mode, family, leaves, torch.float32)
    (h_ref, S_ref), _ = run("recurrent", family, leaves)
    assert_close_rms(h, h_ref, torch.float32, what="output")
    assert_close_rms(S, S_ref, torch.float32, what="final state")
    assert all(torch.isfinite(x).all() for x in grads.values())


def test_chunks_keep_float32_accurate_on_long_sequences():
    """Short-memory gates (z near 0.95) over T = 4096: the default chunks stay within 1e-5, while the
    paper's single logcumsumexp loses precision as |a*| grows (the reason the chunks exist)."""
    gen = torch.Generator().manual_seed(0)
    k_z, h_tilde_pre = (torch.randn(1, 4096, 8, generator=gen, dtype=torch.float64) * 2 + s for s in (3, 0))
    h0 = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    ref, _ = mingru_recurrent(k_z, h_tilde_pre, initial_state=h0)
    f32 = dict(initial_state=h0.float())
    chunked, _ = mingru_scan(k_z.float(), h_tilde_pre.float(), **f32)
    single, _ = mingru_scan(k_z.float(), h_tilde_pre.float(), chunk_size=None, **f32)
    assert_close_rms(chunked, ref, tol=1e-5, what="chunked")
    assert rel_rms(single, ref) > 1e-4


@pytest.mark.parametrize("mode", PARALLEL)
def test_bfloat16_inputs_accumulate_in_float32(mode):
    leaves = make_leaves(70, "minlstm")
    h, S = call(mode, "minlstm", leaves, torch.bfloat16)
    assert h.dtype == torch.bfloat16 and S.dtype == torch.float32
    h_ref, _ = call("recurrent", "minlstm", {n: x.bfloat16().double() for n, x in leaves.items()})
    assert_close_rms(h.double(), h_ref, tol=1e-2)  # the output itself is rounded to bfloat16


@pytest.mark.parametrize("mode", list(MINGRU_MODES))
def test_contract_violations_are_named(mode):
    op = MINGRU_MODES[mode]
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="must all be"):
        op(x, x[:, :, :3])
    with pytest.raises(ValueError, match="must all be"):
        op(x[0], x[0])
    with pytest.raises(ValueError, match="initial_state"):
        op(x, x, initial_state=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="T >= 1"):
        op(x[:, :0], x[:, :0])
    if mode == "scan":
        with pytest.raises(ValueError, match="chunk_size"):
            op(x, x, chunk_size=0)
