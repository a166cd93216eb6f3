"""The run directory: save and load it, atomically and without running code from it.

    run_dir/config.json          the RunConfig, the tokenizer's config and the step of the weights
    run_dir/model.safetensors    weights (safetensors: data only)
    run_dir/tokenizer.json       BPE only
    run_dir/trainer_state.pt     everything to resume: weights, optimizer, RNG, step (weights_only load)
    run_dir/metrics.jsonl        one JSON object per log line
    run_dir/loss.png             the loss curves

Each file is written atomically (temp file, fsync, rename). The resume state holds its own copy of
the weights so that it is complete in one file: a kill between two renames can leave
model.safetensors one checkpoint ahead of trainer_state.pt, never a torn pair. A new run directory
is itself created atomically: built complete (config, tokenizer, the step-0 checkpoint) in a hidden
temp folder beside it, then renamed into place, so any folder holding config.json loads and resumes.
A process killed mid-write leaves a hidden `.NAME.PID.HEX.tmp` file behind; resuming removes those.

Nothing here runs code from the files it reads: JSON, safetensors, and torch.load(weights_only=True),
which refuses a pickle that names a callable (a tampered trainer_state.pt) with a UserError.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from .config import RunConfig
from .data import load_tokenizer, save_tokenizer
from .errors import UserError
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir
from .models import LanguageModel, ModelConfig

CONFIG, WEIGHTS, TRAINER_STATE, METRICS, LOSS_PLOT = (
    "config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl", "loss.png")
TRAINER_STATE_KEYS = ("model", "optimizer", "rng", "step")
_TEMP_FILE = re.compile(r"^\..+\.\d+\.[0-9a-f]{32}\.tmp$")  # fileio's temp names


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).exists()


def save_config(run_dir: Path, cfg: RunConfig, tokenizer, step: int) -> None:
    blob = {**cfg.to_dict(), "tokenizer": tokenizer.to_config(), "step": step}
    atomic_write_text(run_dir / CONFIG, json.dumps(blob, indent=2) + "\n")


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the tied head (safetensors refuses shared storage; it is rebuilt on load)."""
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "head.weight")}


def save_weights(run_dir: Path, model: torch.nn.Module) -> None:
    atomic_write_bytes(run_dir / WEIGHTS, safetensors.torch.save(weights_of(model)))


def save_trainer_state(run_dir: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / TRAINER_STATE, buffer.getvalue())


def save_checkpoint(run_dir: Path, cfg: RunConfig, tokenizer, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, step: int) -> None:
    """Weights, then the resume state, then config.json's step: each file atomic, in that order."""
    save_weights(run_dir, model)
    save_trainer_state(run_dir, {"model": weights_of(model), "optimizer": optimizer.state_dict(),
                                 "rng": torch.get_rng_state(), "step": step})
    save_config(run_dir, cfg, tokenizer, step=step)


def create_run_dir(run_dir: Path, write: Callable[[Path], None]) -> None:
    """Make run_dir all at once: write(tmp) fills a hidden folder beside it, which is then renamed
    to run_dir (replacing an empty folder there). A kill before the rename leaves run_dir as it was."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.with_name(f".{run_dir.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.replace(tmp, run_dir)
        except OSError as e:  # someone filled run_dir meanwhile
            raise UserError(f"cannot create the run directory {run_dir}: {e.strerror}") from None
        fsync_dir(run_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temp files a killed writer left in run_dir (only while no one writes there)."""
    stale = [p for p in Path(run_dir).iterdir() if p.is_file() and _TEMP_FILE.match(p.name)]
    for p in stale:
        p.unlink()
    return stale


def read_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    if not (run_dir / CONFIG).exists():
        raise UserError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    try:
        blob = json.loads((run_dir / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{run_dir / CONFIG} is corrupt: {e}") from None
    if not isinstance(blob, dict) or not {"model", "data", "train", "tokenizer"} <= blob.keys():
        raise UserError(f"{run_dir / CONFIG} is not a gateloop run config")
    return blob


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, RunConfig) from a run directory; UserError if anything is off."""
    run_dir = Path(run_dir)
    blob = read_config(run_dir)
    cfg = RunConfig.from_dict({k: blob[k] for k in ("model", "data", "train")})
    tokenizer = load_tokenizer(blob["tokenizer"], run_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:  # its ids would fall outside the embedding
        raise UserError(f"{run_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.model.vocab_size}")
    return load_model(run_dir, cfg.model, device), tokenizer, cfg


def load_model(run_dir: Path, cfg: ModelConfig, device: str | torch.device = "cpu") -> LanguageModel:
    """The model cfg describes with run_dir's saved weights, in eval mode on device (a language-model
    run or a task run: both save model.safetensors); UserError if the weights are missing, corrupt
    or do not fit."""
    model = build_model(cfg)
    if not (run_dir / WEIGHTS).exists():
        raise UserError(f"{run_dir} has no {WEIGHTS}: the run saved no weights yet")
    try:
        weights = safetensors.torch.load((run_dir / WEIGHTS).read_bytes())
    except SafetensorError as e:
        raise UserError(f"{run_dir / WEIGHTS} is corrupt: {e}") from None
    load_weights(model, weights, str(run_dir / WEIGHTS))
    return model.to(device).eval()


def build_model(cfg: ModelConfig) -> LanguageModel:
    _check_size(cfg)
    try:
        return LanguageModel(cfg)
    except (ValueError, TypeError) as e:  # the mixer rejected its options
        raise UserError(f"model config: {e}") from None
    except (MemoryError, OverflowError, RuntimeError) as e:  # sizes past what can be allocated
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"model config: cannot build a model this large "
                        f"(d_model={cfg.d_model}, n_layers={cfg.n_layers}): {first}") from None


def _check_size(cfg: ModelConfig) -> None:
    """Refuse a model whose float32 weights alone exceed this machine's memory (n_layers=10**8 would
    otherwise build for hours, d_model=10**5 exhaust memory), counted on the meta device: one layer,
    extrapolated, no memory allocated."""
    try:
        with torch.device("meta"):
            one = LanguageModel(dataclasses.replace(cfg, n_layers=1))
    except (ValueError, TypeError) as e:  # the mixer rejected its options
        raise UserError(f"model config: {e}") from None
    except (RuntimeError, NotImplementedError):  # a mixer that cannot be built on meta: no estimate
        return
    per_layer = sum(p.numel() for p in one.blocks[0].parameters())
    n_params = sum(p.numel() for p in one.parameters()) + (cfg.n_layers - 1) * per_layer
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no limit known
        return
    if 4 * n_params > memory:
        raise UserError(f"model config: {n_params / 1e9:,.1f}B parameters (d_model={cfg.d_model}, "
                        f"n_layers={cfg.n_layers}) need {4 * n_params / 2**30:,.0f} GiB for their float32 weights "
                        f"alone; this machine has {memory / 2**30:,.0f} GiB")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    expected = weights_of(model)
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    wrong = [k for k in expected.keys() & weights.keys() if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{where} does not match its config: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}, wrong shape {sorted(wrong)[:3]}")
    model.load_state_dict(weights, strict=False)  # strict=False only for the tied head


def load_trainer_state(run_dir: Path) -> dict[str, Any]:
    """The resume state, loaded with weights_only=True: a file holding code is refused."""
    path = Path(run_dir) / TRAINER_STATE
    if not path.exists():
        raise UserError(f"{run_dir} has no {TRAINER_STATE}: nothing to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise UserError(f"{path} refused: it is corrupt or holds more than tensors and plain data "
                        f"({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is corrupt: {first}") from None
    _check_trainer_state(state, path)
    return state


def _check_trainer_state(state: Any, path: Path) -> None:
    """The shape of what save_checkpoint writes, so that a wrong file fails here, not mid-resume."""
    def fail(what: str):
        raise UserError(f"{path} is not a gateloop trainer state: {what}")
    if not isinstance(state, dict) or not set(TRAINER_STATE_KEYS) <= state.keys():
        fail(f"it must be a dict with keys {', '.join(TRAINER_STATE_KEYS)}")
    if not isinstance(state["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        fail("'model' must map names to tensors")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= opt.keys():
        fail("'optimizer' is not an optimizer state dict")
    rng = state["rng"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
        fail("'rng' must be a 1-D uint8 tensor")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        fail("'step' must be a non-negative integer")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics log, skipping a torn last line (the process may have been killed mid-append)."""
    path = Path(run_dir) / METRICS
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
