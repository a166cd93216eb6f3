"""The synthetic-task runner: train_task(cfg, out_dir) -> metrics. Importable, no globals.

    cfg = load_task_config(None, ["task.name=mqar", "model.mixer=hgrn", "train.steps=200"])
    metrics = train_task(cfg, "runs/mqar-hgrn")      # {"test_accuracy": ..., ...}

A small LanguageModel over the task's vocabulary is trained on a fixed training set drawn with seed
2 * train.seed and scored on a test set drawn with seed 2 * train.seed + 1, from which every
sequence that also occurs in training is removed (the count is reported). Scoring is per-token
accuracy on the scored positions (targets of -100 are not scored). memory_horizon is also scored
at 4 x task.seq_len, with 4 x task.max_resets resets (the same density of resets), which is
length generalisation.

The run directory holds config.json, model.safetensors, metrics.jsonl (the learning curve),
metrics.json (the final metrics) and learning_curve.png, each written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import distributed
from .config import RULES, apply, read_toml
from .data import synthetic
from .errors import StopRequested, UserError
from .fileio import atomic_write_text
from .loop import cpu_settings, train_steps
from .models.config import ModelConfig
from .optim import make_optimizer
from .plots import plot_learning_curve

LENGTH_FACTOR = 4  # memory_horizon is also scored at this many times the training length
METRICS_JSON, CURVE_PLOT = "metrics.json", "learning_curve.png"


@dataclass
class TaskConfig:
    """Which task, its generator's parameters (None: the generator's default, see data/synthetic.py)
    and the sizes of the data sets. A parameter of another task than `name` may not be set."""

    name: str = "memory_horizon"  # memory_horizon | mqar | selective_copy
    seq_len: int | None = None  # memory_horizon 64, mqar 64, selective_copy 64
    n_numbers: int | None = None  # memory_horizon: N (10)
    max_resets: int | None = None  # memory_horizon: R_max (8)
    n_keys: int | None = None  # mqar (32)
    n_values: int | None = None  # mqar (32)
    n_pairs: int | None = None  # mqar (8)
    n_data: int | None = None  # selective_copy: data tokens to copy (8)
    n_tokens: int | None = None  # selective_copy: distinct data tokens (8)
    n_train: int = 0  # training sequences; 0: steps * batch_size (every batch fresh)
    n_test: int = 512  # test sequences (before removing any that occur in training)

    def params(self) -> dict[str, Any]:
        """The generator's keyword arguments that were set: {"seq_len": 64, ...}."""
        own = synthetic.task_defaults(self.name)
        return {k: v for k, v in dataclasses.asdict(self).items() if k in own and v is not None}


@dataclass
class TaskTrainConfig:
    """Optimisation for a task run; the keys mean what they mean in train.* of `gateloop train`."""

    steps: int = 1500
    batch_size: int = 32
    lr: float | None = None  # None: the task's own rate, TASK_LR
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0  # model initialisation and data (train set: seed 2s, test set: 2s + 1)
    eval_every: int = 100  # test accuracy every this many steps (the learning curve)
    log_every: int = 10
    dtype: str = "float32"  # or "bfloat16" (autocast, as in `gateloop train`)
    device: str = "auto"
    threads: int = 0


# Each task's default peak learning rate, the same for every mixer. MQAR's is lower: at 3e-3 softmax
# attention stalls on it (docs/tasks.md, "MQAR: one budget for every model").
TASK_LR = {"memory_horizon": 3e-3, "mqar": 1e-3, "selective_copy": 3e-3}


def _task_model() -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=2)


@dataclass
class TaskRunConfig:
    model: ModelConfig = field(default_factory=_task_model)  # vocab_size is set from the task
    train: TaskTrainConfig = field(default_factory=TaskTrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRunConfig:
        cfg = apply(cls(), d)
        validate_task_config(cfg)
        return cfg


def load_task_config(path: str | Path | None = None, overrides: list[str] = ()) -> TaskRunConfig:
    """Defaults, then the TOML file (tables [model], [train], [task]), then each `key=value`, validated."""
    cfg = apply(TaskRunConfig(), read_toml(path) if path is not None else {}, overrides)
    if cfg.train.lr is None and cfg.task.name in TASK_LR:  # an unknown task fails in the validation
        cfg.train.lr = TASK_LR[cfg.task.name]
    validate_task_config(cfg)
    return cfg


def validate_task_config(cfg: TaskRunConfig) -> None:
    t = cfg.task
    if t.name not in synthetic.TASKS:
        raise UserError(f"task.name: unknown task {t.name!r}; choose one of {', '.join(synthetic.TASKS)}")
    train_fields = {f.name for f in dataclasses.fields(TaskTrainConfig)}
    for (section, name), (ok, what) in RULES.items():
        if section == "train" and name in train_fields and not ok(getattr(cfg.train, name)):
            raise UserError(f"train.{name} must be {what}, got {getattr(cfg.train, name)!r}")
    own = synthetic.task_defaults(t.name)
    for f in dataclasses.fields(TaskConfig):
        value = getattr(t, f.name)
        if f.default is None and value is not None:  # a generator parameter that was set
            if f.name not in own:
                raise UserError(f"task.{f.name} is not a parameter of {t.name} (its parameters: {', '.join(own)})")
            if value < 1:
                raise UserError(f"task.{f.name} must be positive, got {value}")
    if t.n_train < 0 or t.n_test < 1:
        raise UserError(f"task.n_train must be >= 0 and task.n_test >= 1, got {t.n_train} and {t.n_test}")
    try:
        synthetic.TASKS[t.name](1, **t.params(), seed=0)  # the generator's own checks of its parameters
    except ValueError as e:
        raise UserError(f"task: {e}") from None
    cfg.model.vocab_size = synthetic.vocab_size(t.name, **t.params())
    try:
        cfg.model.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


@dataclass
class TaskData:
    train: tuple[torch.Tensor, torch.Tensor]  # inputs, targets [n_train, T]
    test: tuple[torch.Tensor, torch.Tensor]  # [n_test', T]: without the sequences seen in training
    overlap: int  # test sequences dropped because they occur in training
    test_long: tuple[torch.Tensor, torch.Tensor] | None  # memory_horizon at LENGTH_FACTOR x T


def make_task_data(cfg: TaskRunConfig) -> TaskData:
    t, seed = cfg.task, cfg.train.seed
    make, params = synthetic.TASKS[t.name], t.params()
    n_train = t.n_train or cfg.train.steps * cfg.train.batch_size
    train = make(n_train, **params, seed=2 * seed)
    *test, overlap = synthetic.drop_overlap(train[0], *make(t.n_test, **params, seed=2 * seed + 1))
    if not len(test[0]):
        raise UserError(f"every test sequence of {t.name} also occurs in training: the task is too small "
                        "to test generalisation (raise task.seq_len or the vocabulary)")
    test_long = None
    if t.name == "memory_horizon":
        full = {**synthetic.task_defaults(t.name), **params}
        test_long = make(t.n_test, **{**params, "seq_len": full["seq_len"] * LENGTH_FACTOR,
                                      "max_resets": full["max_resets"] * LENGTH_FACTOR}, seed=2 * seed + 1)
    return TaskData(train, tuple(test), overlap, test_long)


def batch_index(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Rows of the training set for one step: passes over it in order (the first: as generated,
    which is already random; each later pass: a permutation fixed by (seed, pass))."""
    position = step * batch_size + torch.arange(batch_size)
    passes, within = position // n, position % n
    index = within.clone()
    for p in passes.unique().tolist():
        if p:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
            index[passes == p] = perm[within[passes == p]]
    return index


@torch.no_grad()
def evaluate_accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int, device,
                      autocast_dtype: torch.dtype | None = None) -> float:
    """Per-token accuracy on the scored positions, each sequence from an empty state. The model's
    train / eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = scored = 0
    device = torch.device(device)
    for i in range(0, len(inputs), batch_size):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(inputs[i:i + batch_size].to(device))
        c, s = synthetic.accuracy(logits, targets[i:i + batch_size].to(device))
        correct, scored = correct + c, scored + s
    model.train(was_training)
    return correct / max(scored, 1)


def train_task(cfg: TaskRunConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train a small model on cfg.task, writing the run directory out_dir; returns the final metrics.
    torch's thread count (train.threads) is restored afterwards. One process: a task run is small
    enough that torchrun would only add overhead, so it is refused."""
    if distributed.world_size_from_env() > 1:
        raise UserError("gateloop task run trains in one process: run it without torchrun")
    with cpu_settings(cfg.train.threads):
        return _train_task(cfg, Path(out_dir), progress)


def _train_task(cfg: TaskRunConfig, out_dir: Path, progress: bool) -> dict:
    tc = cfg.train
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already exists and is not empty: choose another --out")
    cfg = copy.deepcopy(cfg)
    validate_task_config(cfg)  # also sets model.vocab_size from the task
    dist = distributed.Dist(device=distributed.resolve_device(tc.device))
    device = dist.device
    autocast_dtype = torch.bfloat16 if tc.dtype == "bfloat16" else None
    torch.manual_seed(tc.seed)
    data = make_task_data(cfg)
    model = ckpt.build_model(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / ckpt.CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out_dir / ckpt.METRICS).write_text("")

    n_params = sum(p.numel() for p in model.parameters())
    x_train, y_train = data.train
    start = time.perf_counter()
    print(f"{cfg.task.name} with {cfg.model.mixer} {cfg.model.mixer_options or ''}: {n_params / 1e3:.1f}k "
          f"parameters; {len(x_train):,} train / {len(data.test[0]):,} test sequences of length "
          f"{x_train.shape[1]} ({data.overlap} test sequences dropped as seen in training); {tc.steps} steps "
          f"on {device}; run directory {out_dir}", flush=True)

    def log(row: dict) -> None:
        with open(out_dir / ckpt.METRICS, "a") as f:
            f.write(json.dumps({**row, "seconds": round(time.perf_counter() - start, 3)}) + "\n")

    def test_accuracy() -> float:
        return evaluate_accuracy(model, *data.test, batch_size=tc.batch_size, device=device,
                                 autocast_dtype=autocast_dtype)

    def batch_at(step: int):
        index = batch_index(step, tc.batch_size, len(x_train), tc.seed)
        return x_train[index].to(device), y_train[index].to(device)

    def loss_of(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=synthetic.IGNORE)

    model.train()
    try:
        for s in train_steps(model, model, optimizer, tc, batch_at, loss_of, dist=dist,
                             autocast_dtype=autocast_dtype, progress=progress):
            if s.skipped:
                log({"step": s.step, "skipped": s.skipped})
            elif s.log:
                log({"step": s.step, "train_loss": s.loss, "lr": s.lr})
            if s.step % tc.eval_every == 0 and s.step < tc.steps:
                acc = test_accuracy()
                log({"step": s.step, "test_accuracy": acc})
                s.bar.set_postfix(loss=f"{s.loss:.3f}", acc=f"{acc:.3f}", refresh=False)
    except StopRequested as stop:  # a task run keeps no checkpoint: it is quick to run again
        raise StopRequested(stop.signum, stop.step, f"a task run does not resume: run it again (the curve so "
                                                    f"far is in {out_dir})") from None
    train_seconds = time.perf_counter() - start

    metrics = {"task": cfg.task.name, "mixer": cfg.model.mixer, "mixer_options": cfg.model.mixer_options,
               "seed": tc.seed, "steps": tc.steps, "parameters": n_params, "seq_len": int(x_train.shape[1]),
               "test_accuracy": test_accuracy(), "test_sequences": len(data.test[0]),
               "test_overlap_removed": data.overlap, "train_seconds": round(train_seconds, 1)}
    if data.test_long is not None:
        metrics["test_accuracy_4x"] = evaluate_accuracy(model, *data.test_long, batch_size=tc.batch_size,
                                                        device=device, autocast_dtype=autocast_dtype)
    log({"step": tc.steps, "test_accuracy": metrics["test_accuracy"], "final": True})
    ckpt.save_weights(out_dir, model)
    atomic_write_text(out_dir / METRICS_JSON, json.dumps(metrics, indent=2) + "\n")
    plot_learning_curve(ckpt.read_metrics(out_dir), out_dir / CURVE_PLOT,
                        title=f"{cfg.task.name}: {cfg.model.mixer} {_options_label(cfg.model.mixer_options)}")
    extra = f", at {LENGTH_FACTOR}x length {metrics['test_accuracy_4x']:.4f}" if data.test_long is not None else ""
    print(f"test accuracy {metrics['test_accuracy']:.4f}{extra} ({train_seconds:.0f} s of training)")
    return metrics


def _options_label(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items())


def load_task_run(run_dir: str | Path, device="cpu"):
    """(model in eval mode, TaskRunConfig) from a task run directory; UserError if anything is off."""
    run_dir = Path(run_dir)
    if not (run_dir / ckpt.CONFIG).exists():
        raise UserError(f"{run_dir} is not a task run directory: it has no {ckpt.CONFIG}")
    try:
        blob = json.loads((run_dir / ckpt.CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{run_dir / ckpt.CONFIG} is corrupt: {e}") from None
    if not isinstance(blob, dict) or set(blob) != {"model", "train", "task"}:
        raise UserError(f"{run_dir / ckpt.CONFIG} is not a task run config (made by `gateloop task run`)")
    cfg = TaskRunConfig.from_dict(blob)
    return ckpt.load_model(run_dir, cfg.model, device), cfg
