"""The command line: a thin argparse front over train / eval / generate / export.

Bad input (config, data, run directories) is a UserError: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import StopRequested, UserError
from .fileio import atomic_write_text

RUNS = Path("runs")
LATEST = RUNS / "latest"


def cmd_train(args) -> int:
    from .checkpoint import read_config
    from .config import RunConfig, load_config
    from .train import train

    if args.resume:
        saved = read_config(args.resume)
        changed = {item.partition("=")[0].split(".")[0] for item in args.set}
        if args.config or changed - {"train"}:
            raise UserError("--resume continues a run with its own config: only train.* keys may be --set")
        if args.out:
            raise UserError("--resume continues the run in its own directory: drop --out (or drop --resume "
                            "to start a new run there)")
        cfg = load_config(None, args.set, base=RunConfig.from_dict({k: saved[k] for k in ("model", "data", "train")}))
        out = Path(args.resume)
    else:
        cfg = load_config(args.config, args.set)
        out = Path(args.out) if args.out else RUNS / f"{cfg.model.mixer}-{time.strftime('%Y%m%d-%H%M%S')}"
    # A signal raises StopRequested (checkpoint saved) out to main(), which exits 128 + signum.
    train(cfg, out, resume=bool(args.resume), progress=not args.no_progress)
    # Keep runs/latest pointing at the newest run (under torchrun, rank 0 alone writes).
    if out.parent.resolve() == RUNS.resolve() and os.environ.get("RANK", "0") == "0":
        LATEST.unlink(missing_ok=True)
        LATEST.symlink_to(out.name)
    return 0


def cmd_eval(args) -> None:
    import torch

    from .checkpoint import load_run
    from .distributed import resolve_device
    from .train import evaluate, prepare_data

    if any(n < 1 for n in args.context or []) or args.max_tokens < 0:
        raise UserError("--context must be positive and --max-tokens >= 0")
    device = resolve_device(args.device)
    model, tokenizer, cfg = load_run(args.run, device)
    data = prepare_data(cfg, tokenizer)
    ids = data.ids[args.split]
    curves = {}
    for context in args.context or [cfg.train.seq_len]:
        # About as many tokens per batch as in training, whatever the context length.
        batch_size = max(1, cfg.train.batch_size * cfg.train.seq_len // context)
        with torch.no_grad():
            metrics = evaluate(model, ids, tokenizer, seq_len=context, batch_size=batch_size,
                               max_tokens=args.max_tokens or ids.numel(), device=device,
                               baseline_ids=data.ids["train"], per_position=args.per_position)
        if args.per_position:
            curves[context] = metrics.pop("loss_at_position")
        print(json.dumps({"run": str(args.run), "split": args.split, "context": context, **metrics}), flush=True)
    if args.per_position:
        from .plots import plot_per_position

        out = Path(args.run) / f"per_position_{args.split}"
        atomic_write_text(out.with_suffix(".json"), json.dumps({str(c): v for c, v in curves.items()}) + "\n")
        plot_per_position({f"context {c}": v for c, v in curves.items()}, out.with_suffix(".png"),
                          title=f"{cfg.model.mixer}: loss at each position ({args.split} split)")
        print(f"loss per position: {out.with_suffix('.json')}, {out.with_suffix('.png')}", file=sys.stderr)


def cmd_generate(args) -> None:
    import torch

    from .checkpoint import load_run
    from .distributed import resolve_device
    from .textstream import stream_text

    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise UserError("--max-new-tokens and --temperature must be >= 0, --top-k >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = resolve_device(args.device)
    model, tokenizer, _ = load_run(args.run, device)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid UTF-8 text") from None
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise UserError("the prompt is empty: give at least one character with --prompt")
    g = torch.Generator(device=device).manual_seed(args.seed)
    for piece in stream_text(model, tokenizer, ids, args.max_new_tokens, stop=args.stop, device=device,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=g):
        sys.stdout.write(piece)
        sys.stdout.flush()  # each piece as it is made
    sys.stdout.write("\n")


def cmd_export(args) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise UserError("gateloop export needs transformers: pip install 'gateloop[hf]'")
    from .hf.export import export_run

    out = export_run(args.run, args.out)
    print(f"exported {args.run} to {out}: load it with AutoModelForCausalLM.from_pretrained after "
          f"`import gateloop.hf` (docs/hf.md)")


def cmd_task_run(args) -> None:
    from .tasks import load_task_config, train_task

    cfg = load_task_config(args.config, [f"task.name={args.name}", *args.set])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RUNS / f"task-{cfg.task.name}-{cfg.model.mixer}-{stamp}"
    train_task(cfg, out, progress=not args.no_progress)
    if args.viz:
        from .attention_map import run_attention_map

        print(f"attention map: {run_attention_map(out)}")


def cmd_viz_attention(args) -> None:
    from .attention_map import run_attention_map

    out = run_attention_map(args.run, args.out, layer=args.layer, n_heads=args.heads, seq_len=args.seq_len,
                            index=args.index)
    print(f"attention map: {out}")


def add_task_commands(sub) -> None:
    """`gateloop task run NAME` (synthetic tasks) and `gateloop viz attention` (docs/tasks.md)."""
    task = sub.add_parser("task", help="train a small model on a synthetic task (memory_horizon, mqar, "
                          "selective_copy) and score it").add_subparsers(dest="task_command", required=True)
    p = task.add_parser("run", help="train on one task; writes metrics.json and learning_curve.png")
    p.add_argument("name", help="memory_horizon, mqar or selective_copy (docs/tasks.md)")
    p.add_argument("--config", help="TOML file with [model], [train], [task] tables (e.g. configs/tasks/*.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. model.mixer=hgrn, task.seq_len=64, train.steps=200 (repeatable)")
    p.add_argument("--out", help="run directory to create (default: runs/task-<name>-<mixer>-<time>)")
    p.add_argument("--viz", action="store_true", help="also write attention.png (GateLoop models only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_task_run)

    viz = sub.add_parser("viz", help="pictures of trained task runs").add_subparsers(dest="viz_command", required=True)
    p = viz.add_parser("attention", help="GateLoop's surrogate attention map and transitions on a task sequence")
    p.add_argument("--run", required=True, help="a run directory made by `gateloop task run`")
    p.add_argument("--out", help="PNG to write (default: RUN/attention.png)")
    p.add_argument("--layer", type=int, default=0, help="which layer (default 0)")
    p.add_argument("--heads", type=int, default=4, help="how many heads to draw: those with the largest maps")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the task's training length)")
    p.add_argument("--index", type=int, default=0, help="which test sequence (default 0)")
    p.set_defaults(func=cmd_viz_attention)


def cmd_grid(args) -> int:
    from .grid import load_grid, run_grid

    if args.jobs < 1:
        raise UserError("--jobs must be positive")
    grid = load_grid(args.grid, args.set, args.seeds, results_root=Path(args.results_root))
    results = Path(args.results) if args.results else Path(args.results_root) / grid.name
    if args.report or args.plot:
        from .grid_report import plot, report

        if args.report:
            print(report(grid, results, f"gateloop grid {args.grid}"))
        if args.plot:
            plot(grid, results, Path(args.plot))
            print(f"plot: {args.plot}", file=sys.stderr)
        return 0
    if args.dry_run:
        from .grid import is_done, run_commands

        for run in grid.runs:
            state = "done" if is_done(run, results) else "to run"
            print(f"# {run.task} {run.label} seed {run.seed}: {state}")
            for cmd in run_commands(run, run.run_dir(Path(args.runs) / grid.name)):
                print(" ".join(cmd[2:]))
        return 0
    failed = run_grid(grid, results, Path(args.runs) / grid.name, jobs=args.jobs, progress=not args.no_progress)
    return 1 if failed else 0


def cmd_bench(args) -> None:
    from .bench import main

    if any(T < 1 for T in args.T) or args.B < 1 or args.repeat < 1:
        raise UserError("--T, --B and --repeat must be positive")
    main(args)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `gateloop bench` (also used by benchmarks/bench_modes.py)."""
    p.add_argument("--T", type=int, nargs="+", default=[128, 1024, 16384], help="sequence lengths")
    p.add_argument("--B", type=int, default=1, help="batch size")
    p.add_argument("--modes", nargs="+", default=["recurrent", "scan", "attention", "chunk"],
                   choices=["recurrent", "scan", "attention", "chunk"])
    p.add_argument("--shapes", nargs="+", default=["max-headed", "head", "channel"],
                   choices=["max-headed", "head", "channel"],
                   help="max-headed: D = 512, K = V = 1; head / channel: H = 8, K = V = 64 with one complex "
                        "decay per head / per key channel")
    p.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: torch's)")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats per case (the median is reported)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip a case whose time, extrapolated from the previous T, exceeds this")
    p.add_argument("--max-gb", type=float, default=4.0, help="skip a case whose memory estimate exceeds this")
    p.add_argument("--real", action="store_true", help="real decays instead of complex")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateloop", description="Sequence models with data-controlled "
                                     "linear recurrence: train, evaluate, generate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a language model (default: GateLoop on Shakespeare, bytes)")
    p.add_argument("--config", help="TOML file with [model], [data], [train] tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. model.mixer=transformer or train.steps=200 (repeatable)")
    p.add_argument("--out", help="run directory to create (default: runs/<mixer>-<time>, linked as runs/latest)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run on its validation or test split (one JSON line)")
    p.add_argument("--run", default=str(LATEST), help="run directory (default: runs/latest)")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0: all)")
    p.add_argument("--context", type=int, nargs="+", metavar="N",
                   help="score windows of N tokens, each from an empty state (default: train.seq_len); "
                        "several N give one JSON line each (length extrapolation)")
    p.add_argument("--per-position", action="store_true",
                   help="also write RUN/per_position_<split>.json and .png: the mean loss at each position")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="sample a continuation of a prompt from a trained run, printed as it "
                       "is made")
    p.add_argument("--run", default=str(LATEST), help="run directory (default: runs/latest)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the fewest most likely tokens whose probabilities reach P (nucleus; default off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the continuation before the first TEXT it contains (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model folder (docs/hf.md; "
                       "needs pip install 'gateloop[hf]')")
    p.add_argument("--run", default=str(LATEST), help="run directory (default: runs/latest)")
    p.add_argument("--out", required=True, help="folder to create: config.json, model.safetensors, tokenizer files")
    p.set_defaults(func=cmd_export)
    add_task_commands(sub)

    p = sub.add_parser("grid", help="run an experiment grid (cells x seeds, resumable) and tabulate or plot "
                       "its results (docs/grids.md)")
    p.add_argument("grid", help="grid TOML file, e.g. configs/grids/lm_board.toml")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each its own process (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key in every run, applied last (repeatable)")
    p.add_argument("--seeds", type=int, metavar="N", help="keep each cell's first N seeds")
    p.add_argument("--results", metavar="DIR", help="where result files go (default: results/<grid name>/)")
    p.add_argument("--results-root", default="results", help=argparse.SUPPRESS)
    p.add_argument("--runs", default="runs/grid", help="where run directories (weights) go (default runs/grid)")
    p.add_argument("--report", action="store_true", help="print markdown tables of the finished runs")
    p.add_argument("--plot", metavar="PNG", help="draw learning curves, scores and loss per position into PNG")
    p.add_argument("--dry-run", action="store_true", help="list the runs, whether each is done, and commands")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("bench", help="time every GateLoop mode over T, beside the machine's GEMM rate "
                       "(docs/performance.md)")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"gateloop: error: {e}", file=sys.stderr)
        return 2
    except StopRequested as e:  # SIGTERM / Ctrl-C between two steps (a checkpoint saved where there is one)
        print(f"gateloop: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("gateloop: interrupted", file=sys.stderr)
        return 130
    return code or 0
