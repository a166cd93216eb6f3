"""Miras's chunked memory update against the reference loop (outputs, final states, every gradient,
initial state included), against the paper's token-by-token recurrence written out here with
torch.func.grad (chunk size 1), each rule's distinctive property, carried states and bad arguments."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_rms

from gateloop.ops.miras import (MONETA_NORM_FLOOR, RULES, memory_forward, memory_weights, miras_chunked,
                               miras_recurrent, read_weights)

B, H, DH, FH = 2, 2, 4, 8
STATE_KEYS = ("w1", "w2", "u1", "u2")


def make_leaves(T, rule, *, mid_chunk=False, seed=0, eta_max=0.3):
    """Float64 leaves: q, k, v, the gate pre-activations and the initial accumulators."""
    g = torch.Generator().manual_seed(seed)
    rnd = functools.partial(torch.randn, generator=g, dtype=torch.float64)
    # Memora's logits get a wide spread: near-uniform distributions make every output channel of the
    # memory nearly the same average, and the LayerNorm then amplifies rounding (docs/models/miras.md).
    spread = (2.0, 2.0) if rule == "memora" else (0.5, 1 / 3)
    leaves = {"q": rnd(B, T, H, DH), "k": rnd(B, T, H, DH), "v": rnd(B, T, H, DH),
              "z_alpha": 2 + rnd(B, T, H, DH), "z_eta": rnd(B, T, H, DH), "w1": rnd(B, H, DH, FH) * spread[0],
              "w2": rnd(B, H, FH, DH) * spread[1]}
    if rule == "yaad":
        leaves["z_delta"] = rnd(B, T, H, DH)
    if mid_chunk:
        leaves["u1"], leaves["u2"] = leaves["w1"] + rnd(B, H, DH, FH) / 10, leaves["w2"] + rnd(B, H, FH, DH) / 10
    return {name: t.requires_grad_() for name, t in leaves.items()}, eta_max


def assemble(leaves, eta_max, rule, dtype=torch.float64, n=0):
    """The op's arguments, built differentiably from the leaves (Memora's accumulators normalised)."""
    c = {name: t.to(dtype) for name, t in leaves.items()}
    state = {key: c[key] for key in STATE_KEYS if key in c}
    if rule == "memora":
        state = {key: w.log_softmax(-1 if key.endswith("1") else -2) for key, w in state.items()}
    if n:
        state["n"] = n
    delta = F.softplus(c["z_delta"]) if rule == "yaad" else None
    return (c["q"], c["k"], c["v"], F.logsigmoid(c["z_alpha"]), eta_max * torch.sigmoid(c["z_eta"])), \
        dict(rule=rule, delta=delta, initial_state=state)


def run(op, leaves, eta_max, rule, chunk_size, dtype=torch.float64, n=0):
    """Outputs, final state and the gradients of a fixed random functional of both, per leaf."""
    args, kwargs = assemble(leaves, eta_max, rule, dtype, n)
    o, state = op(*args, **kwargs, chunk_size=chunk_size, output_final_state=True)
    g = torch.Generator().manual_seed(123)
    outs = [o] + [state[key] for key in STATE_KEYS]
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [t.detach() for t in outs], state["n"], dict(zip(leaves, grads))


def check(result, expected, tol, what):
    (outs, n, grads), (outs_ref, n_ref, grads_ref) = result, expected
    assert n == n_ref, f"{what}: n = {n} != {n_ref}"
    for name, a, e in zip(("o",) + STATE_KEYS, outs, outs_ref):
        assert_close_rms(a, e, tol=tol, what=f"{what}: {name}")
    for name in grads_ref:
        assert_close_rms(grads[name], grads_ref[name], tol=tol, what=f"{what}: grad {name}")


# (chunk size, T): T = 1, odd T, T not a multiple of the chunk size, the chunk larger than T.
SHAPES = [(1, 1), (1, 6), (3, 7), (8, 20), (16, 9)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk_size,T", SHAPES)
def test_chunked_matches_recurrent(rule, chunk_size, T):
    leaves, eta_max = make_leaves(T, rule)
    expected = run(miras_recurrent, leaves, eta_max, rule, chunk_size)
    check(run(miras_chunked, leaves, eta_max, rule, chunk_size), expected, TOL[torch.float64],
          f"{rule}, chunk {chunk_size}, T {T}")


@pytest.mark.parametrize("rule", RULES)
def test_chunked_matches_recurrent_from_a_mid_chunk_state(rule):
    """A state holding 3 tokens of a chunk of 4 (u != w): the first segment completes that chunk."""
    leaves, eta_max = make_leaves(10, rule, mid_chunk=True, seed=1)
    expected = run(miras_recurrent, leaves, eta_max, rule, 4, n=3)
    assert expected[1] == (3 + 10) % 4
    check(run(miras_chunked, leaves, eta_max, rule, 4, n=3), expected, TOL[torch.float64], f"{rule}, mid-chunk")


@pytest.mark.parametrize("rule", RULES)
def test_float32_chunked_matches_float64_reference(rule):
    """Outputs and states only. The float32 gradients are not compared: the backward pass runs through
    the inner gradient (second derivatives of LayerNorm and GELU), and in float64 those gradients
    already move by 1e-5 .. 3e-5 when the inputs move by a float32 rounding (measured), so a 1e-4
    comparison would test the problem's conditioning, not the code. The gentle eta keeps Memora's
    exponentiated-gradient steps from swinging its log-weights by tens (chaotic, not imprecise)."""
    leaves, eta_max = make_leaves(20, rule, seed=2, eta_max=0.03)
    outs, n, _ = run(miras_chunked, leaves, eta_max, rule, 4, dtype=torch.float32)
    outs_ref, n_ref, _ = run(miras_recurrent, leaves, eta_max, rule, 4)
    assert n == n_ref and outs[0].dtype == torch.float32
    for name, a, e in zip(("o",) + STATE_KEYS, outs, outs_ref):
        assert_close_rms(a, e, tol=TOL[torch.float32], what=f"{rule}, float32: {name}")


def paper_recurrence(rule, q, k, v, log_alpha, eta, delta, w1, w2, p=3.0, q_ret=4.0):
    """The paper's rules token by token, one (batch, head) at a time, read before write:
    o_t = M(W_{t-1}; q_t), then W_t from W_{t-1} and grad l(W_{t-1}; k_t, v_t) (torch.func.grad)."""
    scale = FH if rule == "memora" else 1.0

    def M(W1, W2, x):  # x + LayerNorm(gelu(scale x W1) W2), the norm written out
        u = F.gelu(scale * (x @ W1)) @ W2
        return x + (u - u.mean()) / torch.sqrt(((u - u.mean()) ** 2).mean() + 1e-5)

    def loss(W1, W2, x, y, d):
        e = M(W1, W2, x) - y
        if rule == "moneta":
            return (e.abs() ** p).sum() / p
        if rule == "yaad":
            return sum(0.5 * e_i ** 2 if e_i.abs() <= d_i else d_i * (e_i.abs() - d_i / 2) for e_i, d_i in zip(e, d))
        return 0.5 * (e ** 2).sum()

    o = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            P1, P2 = w1[b, h], w2[b, h]  # A (moneta), W (yaad), log W (memora)
            for t in range(q.shape[1]):
                if rule == "moneta":
                    W1, W2 = (P / ((P.abs() ** q_ret).sum() + MONETA_NORM_FLOOR ** q_ret) ** ((q_ret - 2) / q_ret)
                              for P in (P1, P2))
                else:
                    W1, W2 = (P.exp() for P in (P1, P2)) if rule == "memora" else (P1, P2)
                o[b, t, h] = M(W1, W2, q[b, t, h])
                d = None if delta is None else delta[b, t, h]
                G1, G2 = torch.func.grad(loss, argnums=(0, 1))(W1, W2, k[b, t, h], v[b, t, h], d)
                a, lr = log_alpha[b, t, h].exp(), eta[b, t, h]
                if rule == "memora":  # W_t = Softmax(alpha log W_{t-1} - eta grad)
                    P1 = torch.log(torch.softmax(a[:, None] * P1 - lr[:, None] * G1, dim=-1))
                    P2 = torch.log(torch.softmax(a[None, :] * P2 - lr[None, :] * G2, dim=-2))
                else:
                    P1, P2 = a[:, None] * P1 - lr[:, None] * G1, a[None, :] * P2 - lr[None, :] * G2
    return o


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_chunk_size_one_is_the_papers_recurrence(rule):
    leaves, eta_max = make_leaves(6, rule, seed=3)
    args, kwargs = assemble(leaves, eta_max, rule)
    o, _ = miras_chunked(*args, **kwargs, chunk_size=1, output_final_state=True)
    expected = paper_recurrence(rule, *args, kwargs["delta"], kwargs["initial_state"]["w1"],
                                kwargs["initial_state"]["w2"])
    assert_close_rms(o, expected, what=f"{rule}: chunk size 1 vs the paper's recurrence")


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_split_sequence_equals_one_call(rule):
    leaves, eta_max = make_leaves(20, rule, seed=4)
    args, kwargs = assemble(leaves, eta_max, rule)
    o, state = miras_chunked(*args, **kwargs, chunk_size=8, output_final_state=True)
    first = [a[:, :13] for a in args]
    o1, s1 = miras_chunked(*first, **{**kwargs, "delta": None if rule != "yaad" else kwargs["delta"][:, :13]},
                           chunk_size=8, output_final_state=True)
    assert s1["n"] == 5
    rest = [a[:, 13:] for a in args]
    o2, s2 = miras_chunked(*rest, **{**kwargs, "initial_state": s1,
                                     "delta": None if rule != "yaad" else kwargs["delta"][:, 13:]},
                           chunk_size=8, output_final_state=True)
    assert_close_rms(torch.cat([o1, o2], dim=1), o, what="split outputs")
    assert s2["n"] == state["n"] == 4
    for key in STATE_KEYS:
        assert_close_rms(s2[key], state[key], what=f"split state {key}")


@pytest.mark.parametrize("rule", RULES)
@torch.no_grad()
def test_each_token_reads_every_earlier_token(rule):
    """Read before write, token by token inside a chunk: o_t = M(W(u after tokens < t); q_t), with the
    gradients still taken at the chunk-start weights, so o_t depends on k_{t-1} and v_{t-1} of its own
    chunk but not on k_t, v_t; the first token reads W_0, and the chunk-start accumulators stay put."""
    T, t = 9, 6
    leaves, eta_max = make_leaves(T, rule, seed=5)
    args, kwargs = assemble(leaves, eta_max, rule)
    o, state = miras_chunked(*args, **kwargs, chunk_size=16, output_final_state=True)
    w1, w2 = kwargs["initial_state"]["w1"], kwargs["initial_state"]["w2"]
    scale = FH if rule == "memora" else 1.0
    q = args[0].transpose(1, 2)
    first = memory_forward(*memory_weights(rule, w1, w2), q[:, :, :1], scale).transpose(1, 2)
    assert_close_rms(o[:, :1], first, what="the first token reads W_0")
    head = [a[:, :t] for a in args]
    delta = kwargs["delta"]
    _, s_t = miras_chunked(*head, **{**kwargs, "delta": None if delta is None else delta[:, :t]},
                           chunk_size=16, output_final_state=True)
    o_t = memory_forward(*read_weights(rule, s_t), q[:, :, t:t + 1], scale).transpose(1, 2)
    assert_close_rms(o[:, t:t + 1], o_t, what="token t reads the weights after tokens < t")
    assert state["n"] == T and torch.equal(state["w1"], w1) and torch.equal(state["w2"], w2)
    for i, name in ((1, "k"), (2, "v")):
        for j, changes in ((t - 1, True), (t, False)):
            moved = list(args)
            moved[i] = moved[i].clone()
            # A random push: a constant one is invisible to the memory's LayerNorm (it removes the mean).
            moved[i][:, j] += torch.randn(moved[i][:, j].shape, generator=torch.Generator().manual_seed(j),
                                          dtype=moved[i].dtype)
            o_moved, _ = miras_chunked(*moved, **kwargs, chunk_size=16)
            assert (o_moved[:, t] - o[:, t]).abs().max() > 1e-6 if changes else torch.equal(o_moved[:, t], o[:, t]), \
                f"{rule}: o_{t} vs {name}_{j}"


@torch.no_grad()
def test_moneta_lq_normalisation():
    """W = A / ||A||_nu^(q-2) per matrix, ||A||_nu = (sum |A|^q + nu^q)^(1/q): for q = 4,
    W ||A||_nu^2 = A; far above the floor W(3A) = W(A) / 3 as in the paper; q = 3 ignores the scale."""
    leaves, eta_max = make_leaves(11, "moneta", seed=6)
    args, kwargs = assemble(leaves, eta_max, "moneta")
    _, state = miras_chunked(*args, **kwargs, chunk_size=4, output_final_state=True)
    for A, W in zip((state["w1"], state["w2"]), memory_weights("moneta", state["w1"], state["w2"])):
        norm_A = (A.abs().pow(4).sum((-2, -1)) + MONETA_NORM_FLOOR ** 4).pow(0.25)
        assert_close_rms(W * norm_A[..., None, None] ** 2, A, what="W ||A||_nu^2")
    big = 100 * state["w1"]
    W1 = memory_weights("moneta", big, state["w2"], 4.0)[0]
    assert_close_rms(memory_weights("moneta", 3 * big, state["w2"], 4.0)[0], W1 / 3, tol=1e-8, what="W(3A), q=4")
    W1_q3 = memory_weights("moneta", big, state["w2"], 3.0)[0]
    assert_close_rms(memory_weights("moneta", 3 * big, state["w2"], 3.0)[0], W1_q3, tol=1e-8, what="W(3A), q=3")


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e-3, 1.0, 1e3])
def test_moneta_weights_stay_bounded_when_retention_empties_the_memory(scale):
    """The floor keeps ||W||_4 <= 1 / (sqrt(2) nu) at any scale of A, in float32 too (without it,
    W = A / ||A||_4^2 blew up as A shrank and turned NaN once sum |A|^4 underflowed), and an
    emptied accumulator reads as an empty memory (W -> 0)."""
    A = torch.randn(2, 3, 8, 16) * scale
    A.requires_grad_()
    W1, _ = memory_weights("moneta", A, A.transpose(-1, -2))
    norm_W = W1.abs().pow(4).sum((-2, -1)).pow(0.25)
    assert torch.isfinite(W1).all() and (norm_W <= 1 / (math.sqrt(2) * MONETA_NORM_FLOOR) * (1 + 1e-5)).all()
    if scale <= 1e-12:
        assert (norm_W < 1e-6).all()
    (grad,) = torch.autograd.grad(W1.sum(), A)
    assert torch.isfinite(grad).all()


@torch.no_grad()
def test_moneta_with_p_2_q_2_is_yaad_without_threshold():
    """p = 2: the l_p gradient is the l_2 one; q = 2: W = A. Yaad with delta = inf never switches."""
    leaves, eta_max = make_leaves(13, "yaad", seed=7)
    args, kwargs = assemble(leaves, eta_max, "yaad")
    o_yaad, s_yaad = miras_chunked(*args, **{**kwargs, "delta": torch.full_like(args[0], math.inf)},
                                   chunk_size=4, output_final_state=True)
    o_mon, s_mon = miras_chunked(*args, **{**kwargs, "rule": "moneta", "delta": None}, p=2.0, q_retention=2.0,
                                 chunk_size=4, output_final_state=True)
    assert_close_rms(o_mon, o_yaad, what="outputs")
    for key in STATE_KEYS:
        assert_close_rms(s_mon[key], s_yaad[key], what=key)


@torch.no_grad()
def test_yaad_switches_from_l2_to_l1_at_delta():
    """One token, alpha = 1, eta = 1, so the update is -grad: the l_2 gradient of (1/2)||e||^2 when
    every |e_i| <= delta, delta times the l_1 gradient when every |e_i| > delta, a mix in between."""
    leaves, _ = make_leaves(1, "yaad", seed=8)
    q, k, v, w1, w2 = (leaves[n].detach() for n in ("q", "k", "v", "w1", "w2"))
    zeros = torch.zeros_like(q)

    def update(delta):
        _, s = miras_chunked(q, k, v, zeros, zeros + 1, rule="yaad", delta=delta, chunk_size=1,
                             initial_state={"w1": w1, "w2": w2}, output_final_state=True)
        return w1 - s["w1"], w2 - s["w2"]

    def grad_of(loss_of_e):
        def loss(W1, W2):
            return loss_of_e(memory_forward(W1, W2, k.transpose(1, 2)) - v.transpose(1, 2))
        return torch.func.grad(loss, argnums=(0, 1))(w1, w2)

    e = memory_forward(w1, w2, k.transpose(1, 2)) - v.transpose(1, 2)
    small, large = e.abs().min().item(), e.abs().max().item()
    l2 = grad_of(lambda e: 0.5 * (e ** 2).sum())
    l1 = grad_of(lambda e: e.abs().sum())
    for got, want in zip(update(zeros + 1.01 * large), l2):
        assert_close_rms(got, want, what="below delta: the l2 gradient")
    delta = 0.99 * small
    for got, want in zip(update(zeros + delta), l1):
        assert_close_rms(got, delta * want, what="above delta: delta times the l1 gradient")
    mixed = update(zeros + e.abs().median().item())
    assert not any(torch.allclose(m, g) for m, g in zip(mixed, l2))


@torch.no_grad()
def test_memora_weights_stay_distributions():
    """Softmax over the hidden axis: after many strong updates every W1 row and W2 column is positive
    and sums to 1, for the completed chunks and the partial one alike."""
    leaves, _ = make_leaves(42, "memora", seed=9)
    args, kwargs = assemble(leaves, 0.5, "memora")
    _, state = miras_chunked(*args, **kwargs, chunk_size=8, output_final_state=True)
    assert state["n"] == 2
    for key, axis in (("w1", -1), ("u1", -1), ("w2", -2), ("u2", -2)):
        W = state[key].exp()
        assert torch.isfinite(state[key]).all() and (W > 0).all()
        assert_close_rms(W.sum(axis), torch.ones_like(W.sum(axis)), what=f"{key} sums over the hidden axis")
    assert not torch.allclose(state["w1"], kwargs["initial_state"]["w1"])


@pytest.mark.parametrize("change,match", [
    ({"rule": "titans"}, "rule"), ({"delta": None}, "delta"), ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.0}, "chunk_size"), ({"p": 1.0}, "p >= 2"), ({"q_retention": 1.5}, "q_retention"),
    ({"initial_state": {"w1": torch.zeros(B, H, DH, FH)}}, "w2"),
    ({"initial_state": {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH + 1)}}, "w2"),
    ({"initial_state": {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH), "n": 4}}, "n = 4"),
    ({"initial_state": {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH), "n": 2}}, "u1"),
    ({"initial_state": {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH),
                        "u1": torch.zeros(B, H, DH, FH)}}, "u2"),
])
def test_bad_arguments(change, match):
    x = torch.zeros(B, 3, H, DH)
    kwargs = {"rule": "yaad", "delta": x + 1, "chunk_size": 4,
              "initial_state": {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH)}, **change}
    with pytest.raises(ValueError, match=match):
        miras_chunked(x, x, x, x, x, **kwargs)


def test_bad_shapes():
    x, state = torch.zeros(B, 3, H, DH), {"w1": torch.zeros(B, H, DH, FH), "w2": torch.zeros(B, H, FH, DH)}
    with pytest.raises(ValueError, match="Dh"):
        miras_chunked(x, x, x[..., :2], x, x, rule="memora", initial_state=state)
    with pytest.raises(ValueError, match="delta"):
        miras_chunked(x, x, x, x, x, rule="memora", delta=x, initial_state=state)
    with pytest.raises(ValueError, match="T >= 1"):
        miras_chunked(x[:, :0], x[:, :0], x[:, :0], x[:, :0], x[:, :0], rule="memora", initial_state=state)


@pytest.mark.parametrize("rule", RULES)
def test_factored_read_matches_the_masked_form(rule, monkeypatch):
    """The fast read (decays factored as exp(cx_t) exp(-ci_j): triangular products; Memora keeps the
    masked form, so for it this checks the switch only) against the reference read (one masked
    [L, L, Dh] decay tensor), both inside the chunked op: outputs, states and every gradient, from a
    mid-chunk state; then retention strong enough to trip the overflow guard, where the fast path
    must hand over to the masked form (against the reference loop)."""
    import gateloop.ops.miras as ops

    leaves, eta_max = make_leaves(19, rule, mid_chunk=True, seed=10)
    fast = run(miras_chunked, leaves, eta_max, rule, 8, n=5)
    monkeypatch.setattr(ops, "FACTOR_LIMIT", -1.0)  # every segment takes the masked form
    check(fast, run(miras_chunked, leaves, eta_max, rule, 8, n=5), TOL[torch.float64], f"{rule}: factored vs masked")
    monkeypatch.undo()
    with torch.no_grad():
        leaves["z_alpha"].sub_(12.0)  # log alpha ~ -10 a token: ~-80 over a chunk of 8
    strong = run(miras_chunked, leaves, eta_max, rule, 8, n=5)
    assert all(torch.isfinite(t).all() for t in strong[0])
    check(strong, run(miras_recurrent, leaves, eta_max, rule, 8, n=5), TOL[torch.float64],
          f"{rule}: strong retention, the guard's fallback vs the reference")


def test_segment_sizes():
    from gateloop.ops.miras import _segment_sizes

    assert _segment_sizes(20, 0, 8) == [8, 8, 4]
    assert _segment_sizes(20, 5, 8) == [3, 8, 8, 1]
    assert _segment_sizes(2, 5, 8) == [2]
