"""The optimizer and learning-rate schedule every run uses: AdamW, linear warmup, cosine decay.

cfg is a train config (config.TrainConfig, tasks.TaskTrainConfig): lr, warmup_steps, steps,
min_lr_ratio, weight_decay. A parameter may carry `p.lr_scale` (e.g. GateLoop's transitions), a
factor on the scheduled rate for its group.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg) -> float:
    """Put step's scheduled rate (times each group's lr_scale) on every group; returns the rate."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with one group per (lr_scale, decayed?): matrices decay, vectors (norms, biases) do not."""
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((getattr(p, "lr_scale", 1.0), p.dim() >= 2), []).append(p)
    param_groups = [{"params": ps, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
                    for (scale, decay), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95))
