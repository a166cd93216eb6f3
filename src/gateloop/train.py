"""Training and evaluation of a language model: train(cfg, out_dir) -> metrics. No globals.

Deterministic batches (drawn from a generator seeded by (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would) go through the step loop shared with task runs
(loop.py: AdamW with warmup and cosine decay from optim.py, gradient clipping, skipped non-finite
steps); around it, periodic evaluation and atomic checkpoints. The same code runs as one process or
as N under torchrun (distributed.py): each rank takes its block of the global batch, DDP averages
gradients, rank 0 writes. SIGTERM or Ctrl-C saves a checkpoint and stops (Stopped).

Resume is exact: on CPU with a fixed number of threads, a run stopped (SIGTERM, or SIGKILL after a
checkpoint) and resumed ends with bitwise the parameters and the loss curve of an uninterrupted
run; on GPU, within float32 tolerance unless torch's deterministic algorithms are switched on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import RunConfig
from .data import (build_tokenizer, document_texts, encode_splits, load_corpus, load_tokenizer,
                   split_documents, unigram_bits_per_byte)
from .errors import StopRequested, UserError
from .fileio import atomic_write_text
from .loop import cpu_settings, train_steps
from .optim import make_optimizer
from .plots import plot_losses


@dataclass
class Data:
    tokenizer: object
    ids: dict[str, torch.Tensor]  # split -> 1-D int64 token ids


def prepare_data(cfg: RunConfig, tokenizer=None) -> Data:
    """Load, split and tokenise the corpus; trains a BPE on the train split unless one is given."""
    docs = load_corpus(cfg.data.corpus, cfg.data.path)
    splits = split_documents(docs, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction)
    if tokenizer is None:
        texts = document_texts(splits["train"]) if cfg.data.tokenizer == "bpe" else None
        tokenizer = build_tokenizer(cfg.data.tokenizer, texts, cfg.data.bpe_vocab_size)
    ids = encode_splits(splits, tokenizer)
    for name, t in ids.items():
        if t.numel() < 2:
            raise UserError(f"the {name} split of the data holds fewer than 2 tokens: not enough text")
    if ids["train"].numel() <= cfg.train.seq_len + 1:
        raise UserError(f"the train split has {ids['train'].numel()} tokens, fewer than train.seq_len + 2 "
                        f"({cfg.train.seq_len + 2}): use more data or a shorter train.seq_len")
    return Data(tokenizer, ids)


def get_batch(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int):
    """Random windows of the token stream: (inputs [B, T], targets [B, T]), fixed by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=g)
    window = starts[:, None] + torch.arange(seq_len + 1)
    chunk = ids[window]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, tokenizer, *, seq_len: int, batch_size: int, max_tokens: int,
             device, autocast_dtype=None, baseline_ids: torch.Tensor | None = None,
             dist: distributed.Dist | None = None, per_position: bool = False) -> dict:
    """Loss on consecutive, non-overlapping windows of the split (each window starts from an empty
    state), in nats per token and bits per byte of the text those target tokens spell; with
    baseline_ids (the train split), also a unigram model's bits per byte on the same targets.
    per_position adds "loss_at_position": the mean loss (nats) at each of the seq_len positions of a
    window, over the windows (how the loss falls, or rises, with the context seen so far).
    Under torchrun (dist), rank r takes windows r, r + N, ... and the sums are all-reduced.
    The model's train / eval mode is restored afterwards."""
    dist = dist or distributed.Dist(device=torch.device(device))
    was_training = model.training
    model.eval()
    n_windows = max(1, min((ids.numel() - 1) // seq_len, max_tokens // seq_len))
    seq_len = min(seq_len, ids.numel() - 1)
    mine = torch.arange(dist.rank, n_windows, dist.world)
    total, count = 0.0, 0
    at_position = torch.zeros(seq_len, dtype=torch.float64)
    for first in range(0, mine.numel(), batch_size):
        starts = mine[first:first + batch_size] * seq_len
        chunk = ids[starts[:, None] + torch.arange(seq_len + 1)].to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(chunk[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), chunk[:, 1:], reduction="none")  # [b, T]
        total += losses.sum().item()
        count += chunk[:, 1:].numel()
        if per_position:
            at_position += losses.sum(0).double().cpu()
    total, count = dist.sum([total, count])
    count = int(count)
    if per_position:
        at_position = dist.sum(at_position.tolist())
    model.train(was_training)
    targets = ids[1:1 + n_windows * seq_len]
    n_bytes = len(tokenizer.decode(targets.tolist()).encode("utf-8"))
    loss = total / count
    metrics = {"loss": loss, "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
               "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "bytes": n_bytes}
    if per_position:
        metrics["loss_at_position"] = [x / n_windows for x in at_position]
    if baseline_ids is not None:
        metrics["unigram_bits_per_byte"] = unigram_bits_per_byte(baseline_ids, targets, n_bytes,
                                                                 tokenizer.vocab_size)
    return metrics


class Stopped(StopRequested):
    """A signal (SIGTERM, SIGINT) stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, out_dir: Path):
        super().__init__(signum, step, f"checkpoint saved in {out_dir}: continue with `gateloop train --resume "
                                       f"{out_dir}`")
        self.out_dir = out_dir


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train per cfg, writing the run directory out_dir; returns the final evaluation metrics.

    One process, or one of N under torchrun (see distributed.py): the same code, rank 0 writing.
    SIGTERM or SIGINT (Ctrl-C) saves a checkpoint at the current step, then raises Stopped. `resume=True` continues from
    out_dir's trainer_state.pt with the same batches, learning rates and optimizer state as an
    uninterrupted run.
    """
    with cpu_settings(cfg.train.threads):
        dist = distributed.init(cfg.train.device)
        try:
            metrics = _train(cfg, Path(out_dir), resume, progress, dist)
            dist.barrier()
            return metrics
        finally:
            dist.close()


def _open_run(cfg: RunConfig, out_dir: Path, resume: bool) -> tuple[Data, dict | None]:
    """Rank 0's reading of the input: the data (and tokenizer), and the resume state if resuming."""
    if not resume and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty: pass --resume to continue that run, "
                        "or choose another --out")
    if not resume:
        return prepare_data(cfg), None
    tokenizer = load_tokenizer(ckpt.read_config(out_dir)["tokenizer"], out_dir)
    state = ckpt.load_trainer_state(out_dir)
    if state["step"] > cfg.train.steps:
        raise UserError(f"{out_dir} is at step {state['step']}, past train.steps={cfg.train.steps}: "
                        f"--set train.steps to at least {state['step']}")
    return prepare_data(cfg, tokenizer), state


def _restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str) -> int:
    """Load a checked trainer state into model and optimizer; returns its step. Hyperparameters in
    the param groups (weight decay) stay as the current config sets them; only the moments load."""
    ckpt.load_weights(model, state["model"], where)
    current = [{k: g[k] for k in ("weight_decay", "lr_scale")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{where} does not fit this model's optimizer: {str(e).splitlines()[0][:160]}") from None
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)
    return state["step"]


def _train(cfg: RunConfig, out_dir: Path, resume: bool, progress: bool, dist: distributed.Dist) -> dict:
    tc, device, main = cfg.train, dist.device, dist.is_main
    if tc.batch_size % dist.world:
        raise UserError(f"train.batch_size={tc.batch_size} is the global batch: it must be a multiple of the "
                        f"{dist.world} processes")
    torch.manual_seed(tc.seed)
    autocast_dtype = torch.bfloat16 if tc.dtype == "bfloat16" else None

    # Rank 0 reads the input; the others get its tokenizer and resume state (or its UserError).
    opened: list = []
    tokenizer, state = dist.on_main(lambda: _share(opened, _open_run(cfg, out_dir, resume)))
    data = opened[0][0] if opened else prepare_data(cfg, tokenizer)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    model = ckpt.build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    step = 0
    if state is not None:
        step = _restore(state, model, optimizer, str(out_dir / ckpt.TRAINER_STATE))
        del state
    if main and resume:
        ckpt.remove_temp_files(out_dir)
        _truncate_metrics(out_dir, step)
    elif main:
        ckpt.create_run_dir(out_dir, lambda tmp: (ckpt.save_tokenizer(data.tokenizer, tmp),
                                                  ckpt.save_checkpoint(tmp, cfg, data.tokenizer, model, optimizer, 0)))
    net = model
    if dist.world > 1:
        x, _ = get_batch(data.ids["train"], tc.batch_size, tc.seq_len, tc.seed, step)
        net = _data_parallel(model, dist.shard(x).to(device), autocast_dtype)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = tc.batch_size * tc.seq_len
    say = print if main else (lambda *a, **k: None)
    say(f"{cfg.model.mixer}: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d_model "
        f"{cfg.model.d_model}; {data.ids['train'].numel():,} train tokens; {tc.steps} steps of "
        f"{tokens_per_step:,} tokens on {device}{f' x {dist.world} processes' if dist.world > 1 else ''}; "
        f"run directory {out_dir}" + (f" (resuming at step {step})" if resume else ""), flush=True)
    if tc.compile:
        x, _ = get_batch(data.ids["train"], tc.batch_size, tc.seq_len, tc.seed, step)
        net = _compiled(net, dist.shard(x).to(device), autocast_dtype, say)

    # Training time so far (evaluations included), carried over a resume: learning curves against time.
    previous = [r["seconds"] for r in ckpt.read_metrics(out_dir) if "seconds" in r] if main and resume else []
    clock = time.perf_counter() - (previous[-1] if previous else 0.0)

    def log(row: dict) -> None:
        if main:
            _log(out_dir, {**row, "seconds": round(time.perf_counter() - clock, 3)})

    def run_eval(step: int, final: bool = False) -> dict:
        result = evaluate(model, data.ids["val"], data.tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size,
                          max_tokens=tc.eval_tokens, device=device, autocast_dtype=autocast_dtype,
                          baseline_ids=data.ids["train"] if final else None, dist=dist)
        if not final:  # the final evaluation goes in the "final" row, which a resume drops and redoes
            log({"step": step, "val_loss": result["loss"], "val_bpb": result["bits_per_byte"]})
        return result

    def batch_at(step: int):
        x, y = get_batch(data.ids["train"], tc.batch_size, tc.seq_len, tc.seed, step)
        return dist.shard(x).to(device), dist.shard(y).to(device)

    def loss_of(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    model.train()
    steps = train_steps(net, model, optimizer, tc, batch_at, loss_of, start=step, dist=dist,
                        autocast_dtype=autocast_dtype, progress=progress,
                        diverged=f"the last good checkpoint in {out_dir} is kept (try a lower train.lr)",
                        on_interrupt="saving a checkpoint, then stopping")
    try:
        for s in steps:
            step = s.step
            if s.skipped:
                log({"step": step, "skipped": s.skipped})
            elif s.log:
                log({"step": step, "train_loss": s.loss, "lr": s.lr, "tokens_per_s": s.tokens_per_s,
                     **acp_stats(model)})
            if step % tc.eval_every == 0 and step < tc.steps:
                result = run_eval(step)
                if main:
                    tqdm.write(f"step {step}: val loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
            # No checkpoint inside a run of skipped steps: the last one before it stays the latest.
            if main and ((step % tc.checkpoint_every == 0 and not s.bad_steps) or step == tc.steps):
                ckpt.save_checkpoint(out_dir, cfg, data.tokenizer, model, optimizer, step)
    except StopRequested as stop:
        if main:
            ckpt.save_checkpoint(out_dir, cfg, data.tokenizer, model, optimizer, stop.step)
        raise Stopped(stop.signum, stop.step, out_dir) from None

    result = run_eval(step, final=True)
    unigram = result["unigram_bits_per_byte"]
    metrics = {"step": step, "val_loss": result["loss"], "val_bits_per_byte": result["bits_per_byte"],
               "val_perplexity": result["perplexity"], "unigram_bits_per_byte": unigram,
               "val_tokens": result["tokens"], "parameters": n_params, "train_tokens": step * tokens_per_step}
    log({"step": step, "final": True, **metrics})
    if main:
        plot_losses(ckpt.read_metrics(out_dir), out_dir / ckpt.LOSS_PLOT, title=f"{cfg.model.mixer} on "
                    f"{cfg.data.path or cfg.data.corpus or 'shakespeare'}")
    say(f"validation: loss {metrics['val_loss']:.4f} nats/token, {metrics['val_bits_per_byte']:.4f} bits/byte "
        f"(unigram baseline {unigram:.4f} bits/byte) on {result['tokens']:,} tokens")
    return metrics


def acp_stats(model: torch.nn.Module) -> dict[str, float]:
    """{"acp_pruned_fraction": the share of the causal attention tiles (about the share of attention
    FLOPs; tiles on the diagonal count whole) that Adaptive Computation Pruning skipped in the last
    forward, the mean over the FoX layers that prune}; {} when none does."""
    fractions = [m.pruned_fraction for m in model.modules() if getattr(m, "pruned_fraction", None) is not None]
    return {"acp_pruned_fraction": sum(fractions) / len(fractions)} if fractions else {}


def _data_parallel(model: torch.nn.Module, x: torch.Tensor, autocast_dtype) -> torch.nn.Module:
    """DDP around model: it averages the ranks' gradients in backward (every rank's model starts equal:
    same seed and state; DDP also broadcasts rank 0's parameters). Parameters that get no gradient
    (a mixer's option can leave some unused, e.g. for short sequences) need find_unused_parameters,
    which costs a graph traversal per step: one probing forward/backward on x decides."""
    device = x.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(x)
        logits.float().sum().backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)


def _compiled(net: torch.nn.Module, x: torch.Tensor, autocast_dtype, say) -> torch.nn.Module:
    """torch.compile(net) for the training steps (evaluation, checkpoints and generation use the plain
    model, so nothing saved carries the compiled wrapper). One probing forward/backward on x compiles
    both graphs up front; where that fails (no C++ compiler, an op inductor cannot lower), a warning
    and the eager module: a genuine error in the model then surfaces in the first eager step."""
    compiled = torch.compile(net)
    device = x.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits, _ = compiled(x)
            logits.float().sum().backward()
    except Exception as e:  # noqa: BLE001  any compiler failure means: train eagerly
        reason = next(iter(str(e).strip().splitlines()), "")[:200]
        say(f"train.compile: torch.compile failed ({type(e).__name__}: {reason}); training eagerly", flush=True)
        compiled = net
    net.zero_grad(set_to_none=True)
    return compiled


def _share(keep: list, opened: tuple[Data, dict | None]) -> tuple:
    """Keep rank 0's Data (too big to broadcast); hand on the tokenizer and resume state."""
    keep.append(opened)
    return opened[0].tokenizer, opened[1]


def _log(out_dir: Path, row: dict) -> None:
    with open(out_dir / ckpt.METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from: they will be written again."""
    rows = [r for r in ckpt.read_metrics(out_dir) if r["step"] <= step and not r.get("final")]
    atomic_write_text(out_dir / ckpt.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
