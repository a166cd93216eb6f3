"""Data-parallel training: `torchrun --nproc_per_node=2 -m gateloop train` (gloo on CPU) ends where one
process ends, within float32 tolerance; rank 0 alone writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from conftest import assert_close_rms
from test_reliability import tiny_cfg

from gateloop import checkpoint as ckpt
from gateloop.distributed import Dist
from gateloop.train import train

SETTINGS = {"model.d_model": 16, "model.n_layers": 1, "train.steps": 8, "train.batch_size": 4,
            "train.seq_len": 16, "train.eval_tokens": 256, "train.eval_every": 4, "train.checkpoint_every": 4,
            "train.warmup_steps": 2, "train.log_every": 1, "train.threads": 1}


def torchrun(out, corpus, *extra, nproc=2, **overrides):
    """`torchrun --standalone --nproc_per_node=nproc -m gateloop train ...` as a subprocess (Popen)."""
    settings = {**SETTINGS, "data.path": str(corpus), **overrides}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gateloop", "train", *extra, *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
           "--no-progress"]
    if out is not None:
        cmd[cmd.index("train") + 1:cmd.index("train") + 1] = ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_each_rank_takes_its_block_of_the_global_batch():
    x = torch.arange(12).view(6, 2)
    shards = [Dist(rank=r, world=3).shard(x) for r in range(3)]
    assert all(s.shape == (2, 2) for s in shards) and torch.equal(torch.cat(shards), x)
    assert torch.equal(Dist().shard(x), x)


def compare(one, two, loss_tol):
    w1, w2 = (safetensors.torch.load((run / ckpt.WEIGHTS).read_bytes()) for run in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert_close_rms(w2[k], w1[k], dtype=torch.float32, what=k)
    r1, r2 = ckpt.read_metrics(one), ckpt.read_metrics(two)
    assert [sorted(r) for r in r1] == [sorted(r) for r in r2]
    for a, b in zip(r1, r2):
        for key in ("train_loss", "val_loss", "val_bits_per_byte"):
            if key in a:
                assert abs(a[key] - b[key]) < loss_tol, (key, a, b)
    return max((w1[k] - w2[k]).abs().max().item() for k in w1)


def test_two_processes_equal_one(corpus, tmp_path):  # noqa: F811
    """Same global batch, same steps: the 2-process run's weights match the 1-process run's to float32
    rounding (relative RMS < 1e-4 per tensor; measured max |diff| ~1e-6 after 8 steps), its loss curve
    to 1e-5 nats; one progress line (rank 0 prints), one run directory."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = torchrun(two, corpus)  # start it first: it runs while the single process trains
    train(tiny_cfg(corpus, **SETTINGS), one, progress=False)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("parameters,") == 1 and "x 2 processes" in out, out
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    compare(one, two, loss_tol=1e-5)


@pytest.mark.slow
def test_sigterm_under_torchrun_then_resume_in_one_process(corpus, tmp_path):  # noqa: F811
    """SIGTERM to torchrun reaches every rank; rank 0 saves at the current step and all exit; the run
    resumes in one process (or any number: the global batch is fixed) and ends where an uninterrupted
    one-process run ends, within float32 tolerance."""
    steps = {"train.steps": 40}
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_cfg(corpus, **{**SETTINGS, **steps}), one, progress=False)
    proc = torchrun(two, corpus, **steps)
    deadline = time.monotonic() + 300
    while not (two.exists() and any(r.get("step", 0) >= 5 for r in ckpt.read_metrics(two))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM" in err, err[-3000:]
    stopped = ckpt.load_trainer_state(two)["step"]
    assert 5 <= stopped < 40 and json.loads((two / ckpt.CONFIG).read_text())["step"] == stopped
    saved = ckpt.read_config(two)
    cfg = tiny_cfg(corpus, **{**SETTINGS, **steps})
    assert saved["train"] == cfg.to_dict()["train"]
    train(cfg, two, resume=True, progress=False)
    compare(one, two, loss_tol=1e-4)
