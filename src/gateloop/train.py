"""Training and evaluation of a language model: train(cfg, out_dir) -> metrics. No globals.

One readable loop: deterministic batches (drawn from a generator seeded by (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would), AdamW with warmup and cosine
decay, per-parameter learning-rate scales (`p.lr_scale`, e.g. GateLoop's transitions), gradient
clipping, skipped non-finite steps, periodic evaluation and atomic checkpoints.
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
from .config import RunConfig
from .data import (build_tokenizer, document_texts, encode_splits, load_corpus, load_tokenizer,
                   split_documents, unigram_bits_per_byte)
from .errors import UserError
from .fileio import atomic_write_text
from .plots import plot_losses

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops


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
             device, autocast_dtype=None, baseline_ids: torch.Tensor | None = None) -> dict:
    """Loss on consecutive, non-overlapping windows of the split (each window starts from an empty
    state), in nats per token and bits per byte of the text those target tokens spell; with
    baseline_ids (the train split), also a unigram model's bits per byte on the same targets."""
    model.eval()
    n_windows = max(1, min((ids.numel() - 1) // seq_len, max_tokens // seq_len))
    seq_len = min(seq_len, ids.numel() - 1)
    total, count = 0.0, 0
    for first in range(0, n_windows, batch_size):
        starts = torch.arange(first, min(first + batch_size, n_windows)) * seq_len
        chunk = ids[starts[:, None] + torch.arange(seq_len + 1)].to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    targets = ids[1:1 + n_windows * seq_len]
    n_bytes = len(tokenizer.decode(targets.tolist()).encode("utf-8"))
    loss = total / count
    metrics = {"loss": loss, "bits_per_byte": total / math.log(2) / max(n_bytes, 1),
               "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "bytes": n_bytes}
    if baseline_ids is not None:
        metrics["unigram_bits_per_byte"] = unigram_bits_per_byte(baseline_ids, targets, n_bytes,
                                                                 tokenizer.vocab_size)
    return metrics


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with one group per (lr_scale, decayed?): matrices decay, vectors (norms, biases) do not."""
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((getattr(p, "lr_scale", 1.0), p.dim() >= 2), []).append(p)
    param_groups = [{"params": ps, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (scale, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA device is available")
    return device


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train per cfg, writing the run directory out_dir; returns the final evaluation metrics."""
    out_dir = Path(out_dir)
    tc = cfg.train
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already exists and is not empty: pass --resume to continue that run, "
                        "or choose another --out")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    torch.manual_seed(tc.seed)
    autocast_dtype = torch.bfloat16 if tc.dtype == "bfloat16" else None

    tokenizer = load_tokenizer(ckpt.read_config(out_dir)["tokenizer"], out_dir) if resume else None
    data = prepare_data(cfg, tokenizer)
    cfg.model.vocab_size = data.tokenizer.vocab_size
    model = ckpt.build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    step, bad_steps = 0, 0
    if resume:
        state = ckpt.load_trainer_state(out_dir)
        ckpt.load_weights(model, state["model"], str(out_dir / ckpt.TRAINER_STATE))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        _truncate_metrics(out_dir, step)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(out_dir, cfg, data.tokenizer, step=0)
        ckpt.save_tokenizer(data.tokenizer, out_dir)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = tc.batch_size * tc.seq_len
    print(f"{cfg.model.mixer}: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d_model "
          f"{cfg.model.d_model}; {data.ids['train'].numel():,} train tokens; {tc.steps} steps of "
          f"{tokens_per_step:,} tokens on {device}; run directory {out_dir}", flush=True)

    def save(step: int) -> None:
        ckpt.save_weights(out_dir, model)
        ckpt.save_trainer_state(out_dir, {"model": ckpt.weights_of(model), "optimizer": optimizer.state_dict(),
                                          "rng": torch.get_rng_state(), "step": step})
        ckpt.save_config(out_dir, cfg, data.tokenizer, step=step)

    def run_eval(step: int, baseline: bool = False) -> dict:
        result = evaluate(model, data.ids["val"], data.tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size,
                          max_tokens=tc.eval_tokens, device=device, autocast_dtype=autocast_dtype,
                          baseline_ids=data.ids["train"] if baseline else None)
        _log(out_dir, {"step": step, "val_loss": result["loss"], "val_bpb": result["bits_per_byte"]})
        return result

    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    last_log, tokens_since = time.perf_counter(), 0
    while step < tc.steps:
        x, y = (t.to(device) for t in get_batch(data.ids["train"], tc.batch_size, tc.seq_len, tc.seed, step))
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"step {step}: non-finite loss ({loss.item()}), step skipped")
            if bad_steps >= MAX_BAD_STEPS:
                raise UserError(f"{bad_steps} non-finite losses in a row at step {step}: stopping; the last "
                                f"good checkpoint in {out_dir} is kept (try a lower train.lr)")
            step += 1
            continue
        bad_steps = 0
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += tokens_per_step
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            tok_s = tokens_since / (now - last_log)
            last_log, tokens_since = now, 0
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            _log(out_dir, {"step": step, "train_loss": loss.item(), "lr": lr, "tokens_per_s": tok_s})
        if step % tc.eval_every == 0 and step < tc.steps:
            result = run_eval(step)
            tqdm.write(f"step {step}: val loss {result['loss']:.4f}, {result['bits_per_byte']:.4f} bits/byte")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save(step)
    bar.close()

    result = run_eval(step, baseline=True)
    unigram = result["unigram_bits_per_byte"]
    metrics = {"step": step, "val_loss": result["loss"], "val_bits_per_byte": result["bits_per_byte"],
               "val_perplexity": result["perplexity"], "unigram_bits_per_byte": unigram,
               "val_tokens": result["tokens"]}
    _log(out_dir, {"step": step, "final": True, **metrics})
    plot_losses(ckpt.read_metrics(out_dir), out_dir / ckpt.LOSS_PLOT, title=f"{cfg.model.mixer} on "
                f"{cfg.data.path or cfg.data.corpus or 'shakespeare'}")
    print(f"validation: loss {metrics['val_loss']:.4f} nats/token, {metrics['val_bits_per_byte']:.4f} bits/byte "
          f"(unigram baseline {unigram:.4f} bits/byte) on {result['tokens']:,} tokens")
    return metrics


def _log(out_dir: Path, row: dict) -> None:
    with open(out_dir / ckpt.METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from: they will be written again."""
    rows = [r for r in ckpt.read_metrics(out_dir) if r["step"] <= step and not r.get("final")]
    atomic_write_text(out_dir / ckpt.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
