"""The performance targets of docs/performance.md, measured side by side in one run, against peers.

    bash benchmarks/setup_peers.sh                     # once: the peers, into benchmarks/.peers
    python benchmarks/bench_peers.py [--threads 1] [--sections op chunk layer rnn generation]

Sections (each prints a table; all rows go to benchmarks/out/peers.csv, generation.png is drawn):
  op:         our GateLoop op (scan mode, max-headed complex, B=4 T=2048 D=512) against
              gateloop-transformer 0.2.5's gate_loop_operator on the same values, after checking
              that both agree (outputs and gradients of q, k, v on a small float64 case).
  chunk:      the chunk op at H=8, K=V=64, B=4, T=2048, one complex decay per head and one per key
              channel: GFLOP/s (counted as in gateloop.bench.chunk_flops) as a fraction of a 2048^3
              float32 GEMM timed in the same run, beside the traced reference and the scan mode.
  layer:      our GateLoop layer (D=512, T=2048, B=4, the default max-headed layer) against
              GateLoopedAttention and SimpleGateLoopLayer, and against its own projections' matrix
              products alone (the floor).
  rnn:        our minGRU against mingru-pytorch 0.2.1's minGRU; our LSTM against torch.nn.LSTM.
  generation: time and state memory per generated token against context length, GateLoop against
              the Transformer's KV cache (two small language models of the same width and depth).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import OUT, print_table, write_csv

from gateloop.bench import SHAPES, chunk_flops, gemm_gflops, median_time
from gateloop.layers import MIXERS
from gateloop.models import LanguageModel, ModelConfig
from gateloop.ops import gateloop_scan
from gateloop.ops.gateloop_fused import fused_scan_available

PEERS = Path(__file__).parent / ".peers"


def import_peers():
    if not PEERS.is_dir():
        sys.exit("peers not installed: run `bash benchmarks/setup_peers.sh` first")
    sys.path.insert(0, str(PEERS))
    from gateloop_transformer import GateLoopedAttention, SimpleGateLoopLayer
    from gateloop_transformer.gateloop_transformer import gate_loop_operator
    from minGRU_pytorch import minGRU

    return dict(gate_loop_operator=gate_loop_operator, GateLoopedAttention=GateLoopedAttention,
                SimpleGateLoopLayer=SimpleGateLoopLayer, minGRU=minGRU)


def fwd_and_fwdbwd(fn, params, repeat):
    """(forward ms without a graph, forward+backward ms) of fn() -> tensor, grads zeroed each time."""
    def fb():
        for p in params:
            p.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    with torch.no_grad():
        t_f = median_time(fn, repeat=repeat)
    return 1e3 * t_f, 1e3 * median_time(fb, repeat=repeat)


# ------------------------------------------------------------------------------------------------ op

def peer_layout(q, k, v, log_a):
    """Our [B, T, H, 1] tensors and log-decays -> gate_loop_operator's (b h) n d inputs and its a."""
    B, T, H, _ = q.shape
    to = (lambda x: x.permute(0, 2, 1, 3).reshape(B * H, T, 1))
    return to(q), to(k), to(v), torch.exp(log_a).permute(0, 2, 1, 3).reshape(B * H, T, 1, 1)


def check_op_agreement(peers) -> dict:
    """Relative max errors between our op and theirs, float64, B=2 T=100 H=8, K=V=1."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 100, 8
    q, k, v = (torch.randn(B, T, H, 1, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    log_a = torch.complex(-0.2 * torch.rand(B, T, H, 1, generator=g, dtype=torch.float64),
                          torch.rand(B, T, H, 1, generator=g, dtype=torch.float64))
    w = torch.randn(B, T, H, 1, generator=g, dtype=torch.float64)
    o, _ = gateloop_scan(q, k, v, log_a)
    ours = [o.detach(), *torch.autograd.grad((o * w).sum(), (q, k, v))]
    qp, kp, vp, ap = peer_layout(q, k, v, log_a)
    op = peers["gate_loop_operator"](qp, kp, vp, ap).reshape(B, H, T, 1).permute(0, 2, 1, 3)
    theirs = [op.detach(), *torch.autograd.grad((op * w).sum(), (q, k, v))]
    errs = {name: ((a - b).abs().max() / b.abs().max()).item()
            for name, a, b in zip(["output", "dq", "dk", "dv"], ours, theirs)}
    print("agreement with gate_loop_operator (max |ours - theirs| / max |theirs|, float64): " +
          ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    assert max(errs.values()) < 1e-10, errs
    return errs


def section_op(peers, repeat) -> list[dict]:
    errs = check_op_agreement(peers)
    B, T, H = 4, 2048, 512
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, 1, generator=g) for _ in range(3))
    log_a = torch.complex(-0.1 * torch.rand(B, T, H, 1, generator=g), torch.rand(B, T, H, 1, generator=g))
    ours = [x.clone().requires_grad_() for x in (q, k, v, log_a)]
    theirs = [x.detach().clone().requires_grad_() for x in peer_layout(q, k, v, log_a)]
    fused = fused_scan_available(q)
    f_o, fb_o = fwd_and_fwdbwd(lambda: gateloop_scan(*ours)[0], ours, repeat)
    os.environ["GATELOOP_FUSED"] = "0"  # the PyTorch path (_GateLoopScan), the fused kernel's reference
    try:
        f_p, fb_p = fwd_and_fwdbwd(lambda: gateloop_scan(*ours)[0], ours, repeat)
    finally:
        del os.environ["GATELOOP_FUSED"]
    f_t, fb_t = fwd_and_fwdbwd(lambda: peers["gate_loop_operator"](*theirs), theirs, repeat)
    note = f"agree to {max(errs.values()):.0e}"
    return [dict(section="op", what=f"gateloop_scan (ours, {'fused C++ kernel' if fused else 'PyTorch: no kernel'})",
                 fwd_ms=f_o, fwdbwd_ms=fb_o, note=note),
            dict(section="op", what="gateloop_scan (ours, PyTorch path: GATELOOP_FUSED=0)", fwd_ms=f_p,
                 fwdbwd_ms=fb_p, note=f"ours faster than this: fwd x{f_p / f_o:.2f}, fwd+bwd x{fb_p / fb_o:.2f}"),
            dict(section="op", what="gate_loop_operator (gateloop-transformer)", fwd_ms=f_t, fwdbwd_ms=fb_t,
                 note=f"ours faster: fwd x{f_t / f_o:.2f}, fwd+bwd x{fb_t / fb_o:.2f} (target x5)")]


# --------------------------------------------------------------------------------------------- chunk

def section_chunk(repeat) -> list[dict]:
    from gateloop.ops import gateloop_chunk, gateloop_scan
    from gateloop.ops.gateloop import gateloop_chunk_traced

    B, T = 4, 2048
    gemm = gemm_gflops()
    rows = []
    for shape in (SHAPES["multi-head, decay per head"], SHAPES["multi-head, decay per channel"]):
        g = torch.Generator().manual_seed(2)
        args = [torch.randn(B, T, shape.H, shape.K, generator=g) for _ in range(3)]
        args.append(torch.complex(-0.1 * torch.rand(B, T, shape.H, shape.Kd, generator=g),
                                  torch.rand(B, T, shape.H, shape.Kd, generator=g)))
        args = [x.requires_grad_() for x in args]
        decay = "per-head" if shape.Kd == 1 else "per-channel"
        f, fb = fwd_and_fwdbwd(lambda: gateloop_chunk(*args)[0], args, repeat)
        # The traced form (autograd through plain tensor code), the reference the fast path replaced.
        f_r, fb_r = fwd_and_fwdbwd(lambda: gateloop_chunk_traced(*args)[0], args, repeat)
        f_s, fb_s = fwd_and_fwdbwd(lambda: gateloop_scan(*args)[0], args, repeat)
        for name, ms, bwd, target in (("fwd", f, False, 0.50), ("fwd+bwd", fb, True, 0.35)):
            flops = chunk_flops(B, T, shape, backward=bwd)
            rate = flops / (ms / 1e3) / 1e9
            rows.append(dict(section="chunk", what=f"gateloop_chunk H=8 K=V=64 {decay} complex, {name}",
                             fwd_ms=f if not bwd else None, fwdbwd_ms=fb if bwd else None,
                             note=f"{flops / 1e9:.2f} GFLOP, {rate:.1f} GFLOP/s = {100 * rate / gemm:.0f}% of GEMM "
                                  f"{gemm:.1f}" + (f"; target {100 * target:.0f}%" if shape.Kd == 1 else "")))
        rows.append(dict(section="chunk", what=f"gateloop_chunk_traced (the reference), {decay}", fwd_ms=f_r,
                         fwdbwd_ms=fb_r, note=f"chunk faster than this: fwd x{f_r / f:.2f}, fwd+bwd x{fb_r / fb:.2f}"))
        rows.append(dict(section="chunk", what=f"gateloop_scan, {decay}", fwd_ms=f_s, fwdbwd_ms=fb_s,
                         note=f"chunk faster than this: fwd x{f_s / f:.2f}, fwd+bwd x{fb_s / fb:.2f}"))
    rows[0]["note"] += f" (GEMM after the section: {gemm_gflops():.1f})"
    return rows


# --------------------------------------------------------------------------------------------- layer

class ProjectionsOnly(torch.nn.Module):
    """The matrix products of our GateLoop layer and nothing else: its floor."""

    def __init__(self, layer):
        super().__init__()
        self.weights = [m.weight for m in (layer.W_q, layer.W_k, layer.W_v, layer.W_g, layer.W_o) if m is not None]
        self.weights += [getattr(layer, n) for n in ("W_alpha", "W_beta") if hasattr(layer, n)]

    def forward(self, x):
        return sum(F.linear(x, w).sum() for w in self.weights)


def section_layer(peers, repeat) -> list[dict]:
    B, T, D = 4, 2048, 512
    x = torch.randn(B, T, D)
    ours = MIXERS["gateloop"](D)
    floor = ProjectionsOnly(ours)
    gla = peers["GateLoopedAttention"](dim=D)
    simple = peers["SimpleGateLoopLayer"](dim=D)
    rows = []
    for name, fn, params in (
            ("GateLoop layer (ours, max-headed, scan)", lambda: ours(x)[0], list(ours.parameters())),
            ("its projections alone (floor)", lambda: floor(x), floor.weights),
            ("GateLoopedAttention (gateloop-transformer)", lambda: gla(x), list(gla.parameters())),
            ("SimpleGateLoopLayer (gateloop-transformer, real decays)", lambda: simple(x), list(simple.parameters()))):
        f, fb = fwd_and_fwdbwd(fn, params, repeat)
        rows.append(dict(section="layer", what=name, fwd_ms=f, fwdbwd_ms=fb, note=""))
    o, fl, g = rows[0], rows[1], rows[2]
    o["note"] = (f"vs floor: fwd x{o['fwd_ms'] / fl['fwd_ms']:.2f}, fwd+bwd x{o['fwdbwd_ms'] / fl['fwdbwd_ms']:.2f} "
                 f"(target <= 2); GateLoopedAttention / ours: fwd x{g['fwd_ms'] / o['fwd_ms']:.2f}, "
                 f"fwd+bwd x{g['fwdbwd_ms'] / o['fwdbwd_ms']:.2f} (target > 1)")
    return rows


# ----------------------------------------------------------------------------------------------- rnn

def section_rnn(peers, repeat) -> list[dict]:
    """Per family: ours (default mode), the peer, then our references or the paper's form; the notes
    give the peer's time over ours, and each reference's over ours. The LSTM is timed at the
    benchmark's width and at the leaderboard's (B = 16, T = 256, N = 128)."""
    B, D = 4, 512
    lstm_cases = (lambda n: [
        ("LSTM (ours, NP variant = nn.LSTM's maths, mode=bptt)", MIXERS["lstm"](n, variant="NP"), True),
        ("torch.nn.LSTM", torch.nn.LSTM(n, n, batch_first=True), True),
        ("LSTM (ours, NP, mode=bptt, PyTorch path: GATELOOP_FUSED=0)", MIXERS["lstm"](n, variant="NP"), "unfused"),
        ("LSTM (ours, NP, mode=recurrent: autograd through the loop)",
         MIXERS["lstm"](n, variant="NP", mode="recurrent"), True)])
    families = [
        (torch.randn(B, 2048, D), "T=2048", [
            ("minGRU (ours, mode=blocked)", MIXERS["mingru"](D, mode="blocked"), True),
            ("minGRU (mingru-pytorch)", peers["minGRU"](D), False),
            ("minGRU (ours, mode=scan: the paper's log-space scan)", MIXERS["mingru"](D, mode="scan"), True)]),
        (torch.randn(B, 512, D), "B=4 T=512 N=512", lstm_cases(D)),
        (torch.randn(16, 256, 128), "B=16 T=256 N=128", lstm_cases(128)),
    ]
    rows = []
    for x, shape, cases in families:
        first = len(rows)
        for name, module, returns in cases:
            fn = (lambda m=module, r=returns: m(x)[0] if r else m(x))
            if returns == "unfused":
                fn = (lambda m=module: _unfused(lambda: m(x)[0]))
            f, fb = fwd_and_fwdbwd(fn, list(module.parameters()), repeat)
            rows.append(dict(section="rnn", what=f"{name}, {shape}", fwd_ms=f, fwdbwd_ms=fb, note=""))
        ours, peer, *refs = rows[first:]
        ours["note"] = (f"peer / ours: fwd x{peer['fwd_ms'] / ours['fwd_ms']:.2f}, "
                        f"fwd+bwd x{peer['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}")
        for ref in refs:
            ref["note"] = (f"this / ours: fwd x{ref['fwd_ms'] / ours['fwd_ms']:.2f}, "
                           f"fwd+bwd x{ref['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}")
    return rows


def _unfused(fn):
    """fn() with the fused CPU kernels switched off (GATELOOP_FUSED=0, read at each call)."""
    os.environ["GATELOOP_FUSED"] = "0"
    try:
        return fn()
    finally:
        del os.environ["GATELOOP_FUSED"]


# ---------------------------------------------------------------------------------------- generation

def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    return 0


def section_generation(contexts, steps=16) -> list[dict]:
    rows = []
    for mixer in ("gateloop", "transformer"):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(mixer=mixer, vocab_size=256, d_model=256, n_layers=2)).eval()
        for L in contexts:
            with torch.no_grad():
                _, state = model(torch.randint(0, 256, (1, L)))  # prefill: the context, in parallel
                token = torch.randint(0, 256, (1, 1))
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    _, state = model(token, state)
                    times.append(time.perf_counter() - t0)
            times.sort()
            rows.append(dict(section="generation", what=mixer, context=L, ms_per_token=1e3 * times[len(times) // 2],
                             state_kib=state_bytes(state) / 1024))
            print(f"generation {mixer:<11} context {L:>6}: {rows[-1]['ms_per_token']:.2f} ms/token, "
                  f"state {rows[-1]['state_kib']:.0f} KiB", flush=True)
    plot_generation(rows)
    return rows


def plot_generation(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for mixer in dict.fromkeys(r["what"] for r in rows):
        pts = [r for r in rows if r["what"] == mixer]
        axes[0].loglog([r["context"] for r in pts], [r["ms_per_token"] for r in pts], marker="o", label=mixer)
        axes[1].loglog([r["context"] for r in pts], [r["state_kib"] for r in pts], marker="o", label=mixer)
    axes[0].set(xlabel="context length", ylabel="ms per generated token", title="time per token")
    axes[1].set(xlabel="context length", ylabel="state carried (KiB)", title="memory per token")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "generation.png", dpi=110)


# ---------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every contender")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=["op", "chunk", "layer", "rnn", "generation"],
                        choices=["op", "chunk", "layer", "rnn", "generation"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    peers = import_peers() if set(args.sections) & {"op", "layer", "rnn"} else None
    rows = []
    for section in args.sections:
        got = {"op": lambda: section_op(peers, args.repeat), "chunk": lambda: section_chunk(args.repeat),
               "layer": lambda: section_layer(peers, args.repeat), "rnn": lambda: section_rnn(peers, args.repeat),
               "generation": lambda: section_generation(args.contexts)}[section]()
        print()
        print_table([{k: ("" if v is None else v) for k, v in r.items() if k != "section"} for r in got])
        print(flush=True)
        rows += got
    keys = list(dict.fromkeys(k for r in rows for k in r))
    write_csv([{k: r.get(k, "") for k in keys} for r in rows], "peers.csv")


if __name__ == "__main__":
    main()
