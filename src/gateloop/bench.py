"""The main performance table, `gateloop bench`: every GateLoop mode, forward and forward+backward,
over sequence lengths, for the paper's max-headed case and for multi-head; achieved GFLOP/s where the
FLOPs are countable, beside a large float32 GEMM timed in the same run. No peers needed (they live in
benchmarks/, see docs/performance.md). Importable: benchmarks/bench_modes.py builds on it.

Method (docs/design.md, "Measuring speed"): warm up, repeat, report the median; the same thread count for
everything in a run; a ratio measured side by side in one run is the figure that holds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from .ops import GATELOOP_MODES
from .ops.gateloop import default_chunk_size


@dataclass(frozen=True)
class Shape:
    """One benchmark case: H heads of key dim K, value dim V, Kd decays per head (1 or K)."""

    name: str
    H: int
    K: int
    V: int
    Kd: int


SHAPES = {
    "max-headed": Shape("max-headed", H=512, K=1, V=1, Kd=1),  # D = 512, K = V = 1 (the paper's)
    "multi-head, decay per channel": Shape("multi-head, decay per channel", H=8, K=64, V=64, Kd=64),
    "multi-head, decay per head": Shape("multi-head, decay per head", H=8, K=64, V=64, Kd=1),
}


def median_time(fn, *, warmup: int = 1, repeat: int = 5, budget_s: float = 10.0, clock=time.perf_counter) -> float:
    """Median time of fn() in seconds by clock (wall time; time.process_time for CPU time); fewer
    repeats (at least one) when one call is slow."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeat and (not times or sum(times) < budget_s):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def gemm_gflops(n: int = 2048, repeat: int = 5) -> float:
    """The machine's float32 matrix-multiply rate, n x n @ n x n, in GFLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_time(lambda: a @ b, repeat=repeat) / 1e9


def chunk_flops(B: int, T: int, shape: Shape, *, complex_: bool = True, chunk_size: int | None = None,
                backward: bool = False) -> float:
    """The chunk op's useful matrix-product FLOPs (elementwise work not counted), per chunk of C steps
    and per head, with P = 2 for complex decays (the state's real and imaginary halves), 1 for real:

        scores q k^T (causal half) C (C + 1) K  +  scores @ v (causal half) C (C + 1) V
        + the chunk's state contribution 2 C (P K) V  +  the carried state's output 2 C (P K) V

    i.e. per token (C + 1)(K + V) + 4 P K V. A backward pass costs two products per forward product,
    so forward+backward counts 3x. The dense products as executed do 2 C^2 (K + V) for the first two
    terms: the masked upper half is work done but not counted.
    """
    C = chunk_size or default_chunk_size(shape.K, shape.Kd == 1)
    P = 2 if complex_ else 1
    n_chunks = -(-T // C)
    per_chunk = C * (C + 1) * (shape.K + shape.V) + 4 * C * P * shape.K * shape.V
    return (3 if backward else 1) * B * shape.H * n_chunks * per_chunk


def attention_flops(B: int, T: int, shape: Shape, *, backward: bool = False) -> float | None:
    """The attention mode's useful FLOPs with one decay per head (two causal T x T products);
    None for per-channel decays, whose T x T x K decay tensor is elementwise work."""
    if shape.Kd != 1:
        return None
    return (3 if backward else 1) * B * shape.H * T * (T + 1) * (shape.K + shape.V)


def memory_estimate(mode: str, B: int, T: int, shape: Shape) -> float:
    """Rough peak bytes of one forward+backward (complex64 states), to skip what cannot fit."""
    H, K, V, Kd = shape.H, shape.K, shape.V, shape.Kd
    if mode == "attention":
        return 16 * B * H * (Kd + 1) * T * T + 64 * B * T * H * K
    if mode in ("scan", "recurrent"):
        return 48 * B * T * H * K * V + 64 * B * T * H * K
    C = default_chunk_size(K, Kd == 1)
    return 4 * 8 * B * T * H * (C * Kd + 4 * K * V / C + 4 * K)


def make_inputs(B: int, T: int, shape: Shape, *, complex_: bool = True, requires_grad: bool = False,
                seed: int = 0):
    """q, k, v and log_a in the op's layout, log-magnitudes in [-0.1, 0] and phases in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, shape.H, shape.K, generator=g) for _ in range(2))
    v = torch.randn(B, T, shape.H, shape.V, generator=g)
    log_a = -0.1 * torch.rand(B, T, shape.H, shape.Kd, generator=g)
    if complex_:
        log_a = torch.complex(log_a, torch.rand(B, T, shape.H, shape.Kd, generator=g))
    return [x.requires_grad_(requires_grad) for x in (q, k, v, log_a)]


def time_mode(mode: str, B: int, T: int, shape: Shape, *, backward: bool, complex_: bool = True,
              repeat: int = 3, budget_s: float = 10.0) -> float:
    """Median seconds of one forward (no graph) or forward+backward of a GateLoop mode."""
    args = make_inputs(B, T, shape, complex_=complex_, requires_grad=backward)
    op = GATELOOP_MODES[mode]

    def step():
        with torch.set_grad_enabled(backward):
            o, _ = op(*args)
            if backward:
                o.backward(torch.ones_like(o))

    return median_time(step, repeat=repeat, budget_s=budget_s)


def run_table(*, T_values, shapes, modes=tuple(GATELOOP_MODES), B: int = 1, repeat: int = 3,
              budget_s: float = 10.0, max_seconds: float = 30.0, max_bytes: float = 4e9,
              complex_: bool = True, gemm: float | None = None, progress=print) -> list[dict]:
    """One row per (shape, T, pass, mode): ms, tokens/s, GFLOP/s and fraction of the GEMM rate
    where the FLOPs are countable. A case is skipped (row with ms=None and the reason) when its
    memory estimate exceeds max_bytes or when its time, extrapolated from the previous T (linear,
    quadratic for attention), exceeds max_seconds."""
    gemm = gemm if gemm is not None else gemm_gflops()
    rows = []
    for shape in shapes:
        for backward in (False, True):
            last: dict[str, tuple[int, float]] = {}
            for T in T_values:
                for mode in modes:
                    row = dict(shape=shape.name, T=T, pass_="fwd+bwd" if backward else "fwd", mode=mode,
                               ms=None, tokens_per_s=None, gflops=None, of_gemm=None, note="")
                    order = 2 if mode == "attention" else 1
                    if memory_estimate(mode, B, T, shape) > max_bytes:
                        row["note"] = "skipped: memory"
                    elif mode in last and last[mode][1] * (T / last[mode][0]) ** order > max_seconds:
                        row["note"] = "skipped: time"
                    else:
                        t = time_mode(mode, B, T, shape, backward=backward, complex_=complex_,
                                      repeat=repeat, budget_s=budget_s)
                        last[mode] = (T, t)
                        flops = (chunk_flops(B, T, shape, complex_=complex_, backward=backward) if mode == "chunk"
                                 else attention_flops(B, T, shape, backward=backward) if mode == "attention"
                                 else None)
                        row.update(ms=1e3 * t, tokens_per_s=B * T / t)
                        if flops is not None:
                            row.update(gflops=flops / t / 1e9, of_gemm=flops / t / 1e9 / gemm)
                    rows.append(row)
                    if progress:
                        progress(format_row(row))
    return rows


def format_row(row: dict) -> str:
    if row["ms"] is None:
        return f"{row['shape']:<30} T={row['T']:<6} {row['pass_']:<8} {row['mode']:<10} {row['note']}"
    s = f"{row['shape']:<30} T={row['T']:<6} {row['pass_']:<8} {row['mode']:<10} {row['ms']:10.2f} ms"
    if row["gflops"] is not None:
        s += f"  {row['gflops']:6.1f} GFLOP/s ({100 * row['of_gemm']:.0f}% of GEMM)"
    return s


def markdown_table(rows: list[dict]) -> str:
    """Time in ms per mode, one line per (shape, pass, T); chunk GFLOP/s and share of GEMM beside."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["pass_"], r["T"]) for r in rows))
    by = {(r["shape"], r["pass_"], r["T"], r["mode"]): r for r in rows}
    head = ["shape", "pass", "T", *[f"{m} ms" for m in modes], "chunk GFLOP/s (% GEMM)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for shape, pass_, T in keys:
        cells = [shape, pass_, str(T)]
        for m in modes:
            r = by.get((shape, pass_, T, m))
            cells.append("—" if r is None or r["ms"] is None else f"{r['ms']:.1f}")
        c = by.get((shape, pass_, T, "chunk"))
        cells.append("—" if c is None or c["gflops"] is None else f"{c['gflops']:.1f} ({100 * c['of_gemm']:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    """`gateloop bench` (arguments: gateloop.cli.add_bench_arguments): print the main table."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {"max-headed": "max-headed", "head": "multi-head, decay per head",
             "channel": "multi-head, decay per channel"}
    shapes = [SHAPES[names[s]] for s in args.shapes]
    gemm = gemm_gflops()
    print(f"float32 GEMM (2048^3): {gemm:.1f} GFLOP/s on {torch.get_num_threads()} threads; "
          f"B = {args.B}, {'real' if args.real else 'complex'} decays", flush=True)
    rows = run_table(T_values=args.T, shapes=shapes, modes=args.modes, B=args.B, repeat=args.repeat,
                     max_seconds=args.max_seconds, max_bytes=args.max_gb * 1e9, complex_=not args.real,
                     gemm=gemm, progress=lambda line: print(line, flush=True))
    print()
    print(markdown_table(rows))
    print(f"\nGEMM {gemm:.1f} GFLOP/s. Chunk FLOPs per token and head: (C + 1)(K + V) + 4 P K V "
          f"(P = 2 complex, 1 real; x3 with the backward); see gateloop.bench.chunk_flops.")
    return rows

