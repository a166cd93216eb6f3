"""Runs survive crashes: exact resume after SIGTERM or SIGKILL, atomic checkpoints under random kills,
no code run from a loaded file, non-finite steps skipped then a clean stop, bfloat16 autocast training.

Training runs in forked child processes (cheap: torch is already imported) so that they can be
killed; every run uses one thread, which makes CPU training bitwise reproducible.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings

import pytest
import safetensors.torch
import torch

from gateloop import checkpoint as ckpt
from gateloop.cli import main
from gateloop.config import load_config
from gateloop.errors import UserError
from gateloop.layers import MIXERS
from gateloop.loop import MAX_BAD_STEPS, cpu_settings, stop_requests
from gateloop.train import train

STEPS = 24
TINY = {"model.d_model": 16, "model.n_layers": 1, "train.steps": STEPS, "train.batch_size": 4,
        "train.seq_len": 16, "train.eval_tokens": 128, "train.eval_every": 5, "train.checkpoint_every": 4,
        "train.warmup_steps": 2, "train.log_every": 1, "train.threads": 1}
TIMING = {}  # how long a tiny run's start-up and one of its steps take in a child, measured by `reference`


def argv(corpus, out, **overrides):
    settings = {**TINY, "data.path": str(corpus), **overrides}
    return ["train", "--out", str(out), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")],
            "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import in the parent what training imports lazily (torch._dynamo via the optimizer, matplotlib),
    so that forked children start training at once: the kill tests need them to reach checkpoints."""
    import matplotlib.pyplot  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def _child(args):
    code = 1
    try:
        code = main(args)
    finally:
        os._exit(code)


def start(args) -> multiprocessing.Process:
    """`gateloop <args>` in a forked child; exitcode is its return code, or -signum if killed."""
    with warnings.catch_warnings():  # fork of a process with (torch's idle) threads: the child uses one
        warnings.simplefilter("ignore", DeprecationWarning)
        proc = multiprocessing.get_context("fork").Process(target=_child, args=(args,))
        proc.start()
    return proc


def finish(args, timeout=120) -> int:
    proc = start(args)
    proc.join(timeout)
    return proc.exitcode


def wait_for_step(run, step, proc, timeout=60):
    """Until the run has logged `step` (or its process ended)."""
    deadline = time.monotonic() + timeout
    while proc.is_alive():
        if run.exists() and any(r.get("step", 0) >= step for r in ckpt.read_metrics(run)):
            return
        assert time.monotonic() < deadline, f"the run did not reach step {step} in {timeout} s"
        time.sleep(0.005)


def weights(run):
    return safetensors.torch.load((run / ckpt.WEIGHTS).read_bytes())


def curve(run):
    """The metrics log without timings: what must match between an interrupted and a whole run."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds")} for r in ckpt.read_metrics(run)]


def assert_same_run(a, b, steps=STEPS):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa, sb = ckpt.load_trainer_state(a), ckpt.load_trainer_state(b)
    assert sa["step"] == sb["step"] == steps
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert curve(a) == curve(b)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run (its wall time, on this machine now, sets how long the kill tests wait)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    begin = time.monotonic()
    assert finish(argv(corpus, out, **{"train.checkpoint_every": 1})) == 0
    run_seconds = time.monotonic() - begin
    # A step's time from the run's own log, and start-up as the rest: kill windows sized by the whole
    # run's time reached so far into training that the run finished before enough kills.
    logged = sorted((r["step"], r["seconds"]) for r in ckpt.read_metrics(out) if "train_loss" in r)
    (first, t_first), (last, t_last) = logged[0], logged[-1]
    TIMING["step_seconds"] = (t_last - t_first) / max(last - first, 1)
    TIMING["startup_seconds"] = max(run_seconds - STEPS * TIMING["step_seconds"], 0.05)
    shutil.rmtree(out)
    assert finish(argv(corpus, out)) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_resume_after_a_kill_is_bitwise_the_uninterrupted_run(corpus, reference, tmp_path, signum):
    """SIGTERM and SIGINT (Ctrl-C) save a checkpoint at the current step and exit 128 + signum; SIGKILL
    loses the steps since the last checkpoint (checkpoint_every=4). Either way `--resume` ends with
    bitwise the same weights, optimizer-driven trajectory and loss curve (train and validation) as the
    uninterrupted run."""
    run = tmp_path / "run"
    proc = start(argv(corpus, run))
    wait_for_step(run, 6, proc)
    os.kill(proc.pid, signum)
    proc.join(60)
    stopped_at = ckpt.load_trainer_state(run)["step"]
    if signum != signal.SIGKILL:
        assert proc.exitcode == 128 + signum
        assert stopped_at >= 6 and json.loads((run / ckpt.CONFIG).read_text())["step"] == stopped_at
    else:
        assert proc.exitcode == -signal.SIGKILL and stopped_at % 4 == 0
    assert stopped_at < STEPS
    assert finish(["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(run, reference)


def test_a_second_ctrl_c_quits_at_once(capsys):
    """The first SIGINT is a request the training loop polls (it saves, then stops); a second one
    raises KeyboardInterrupt, for a user who will not wait for the checkpoint. Python's own SIGINT
    handler is put first: a shell that starts the tests in the background makes them ignore SIGINT."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_requests(signal.SIGTERM, signal.SIGINT, announce="saving a checkpoint, then stopping") as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
            assert stop == [signal.SIGINT]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert "saving a checkpoint" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_random_kills_never_leave_a_broken_run(corpus, reference, tmp_path):
    """SIGKILL at random moments, checkpointing every step: whenever the run directory exists it loads
    (weights and resume state, complete), and resuming after every kill still ends bitwise equal to
    the uninterrupted run."""
    killed, _ = _kill_many(corpus, reference, tmp_path, STEPS, kills=12, seed=0)
    assert killed >= 8


@pytest.mark.slow
def test_many_random_kills(corpus, tmp_path):
    reference = tmp_path / "reference"
    assert finish(argv(corpus, reference, **{"train.steps": 100})) == 0
    killed, mid_write = _kill_many(corpus, reference, tmp_path, 100, kills=60, seed=1)
    assert killed >= 50 and mid_write >= 1  # measured: about 30% of the kills after progress leave a temp file


def _kill_many(corpus, reference, tmp_path, steps, kills, seed) -> tuple[int, int]:
    """Each round starts the run (fresh, or resuming) and SIGKILLs it: a third of the time at a random
    moment of its start-up, else at a random moment within about a step after it made progress, where
    the time goes to writing checkpoints (so a round gains about two steps at most, and the asked-for
    kills fit in the run). After each kill the run directory must be sound. Returns the
    number of kills (fewer than asked if the run finished first) and how many cut a file write
    (they leave its temp file behind)."""
    rng = random.Random(seed)
    run = tmp_path / "run"
    fresh = argv(corpus, run, **{"train.checkpoint_every": 1, "train.steps": steps})
    step_seconds = TIMING["step_seconds"]
    steps_seen, killed, mid_write = set(), 0, 0
    for _ in range(kills):
        done = ckpt.load_trainer_state(run)["step"] if run.exists() else -1
        proc = start(["train", "--resume", str(run), "--no-progress"] if run.exists() else fresh)
        if rng.random() < 1 / 3:
            time.sleep(rng.uniform(0.0, TIMING["startup_seconds"]))
        else:
            wait_for_step(run, done + 1, proc)
            time.sleep(rng.uniform(0.0, 1.5 * step_seconds))
        proc.kill()  # SIGKILL, unless it has ended already
        proc.join(60)
        if proc.exitcode == 0:  # it finished before the kill
            break
        assert proc.exitcode == -signal.SIGKILL
        killed += 1
        if not run.exists():  # killed before the run directory was renamed into place
            continue
        mid_write += any(p.name.endswith(".tmp") for p in run.iterdir())
        model, _, cfg = ckpt.load_run(run)
        state = ckpt.load_trainer_state(run)
        ckpt.load_weights(model, state["model"], "trainer state")
        assert 0 <= state["step"] <= steps and cfg.train.steps == steps
        steps_seen.add(state["step"])
    # Resume once more (a finished run only redoes its final evaluation, which a kill may have cut).
    assert finish(["train", "--resume", str(run), "--no-progress"] if run.exists() else fresh) == 0
    assert len(steps_seen - {0, steps}) >= 2, f"the kills hit too few checkpoints to mean much: {sorted(steps_seen)}"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "stale temp files after resume"
    assert_same_run(run, reference, steps)
    return killed, mid_write


class Exploit:
    """Unpickling this runs a shell command: what a tampered trainer_state.pt could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_trainer_state_is_refused_without_running_it(reference, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for p in reference.iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    marker = tmp_path / "pwned"
    state = ckpt.load_trainer_state(run)
    state["optimizer"] = Exploit(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (run / ckpt.TRAINER_STATE).write_bytes(buffer.getvalue())
    assert b"system" in buffer.getvalue()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--set", f"train.steps={STEPS + 2}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "trainer_state.pt" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # The exploit is real: a full unpickling (weights_only=False) runs the command.
    torch.load(run / ckpt.TRAINER_STATE, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"PK\x03\x04 truncated zip",
                                     "pickle of a list", "state without keys", "step is a string"],
                         ids=["empty", "zeros", "truncated-zip", "list", "missing-keys", "string-step"])
def test_corrupt_or_foreign_trainer_states_are_one_line_errors(reference, tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    for p in reference.iterdir():
        (run / p.name).write_bytes(p.read_bytes())
    if isinstance(content, str):
        state = ckpt.load_trainer_state(reference)
        obj = {"pickle of a list": [1, 2], "state without keys": {"step": 3},
               "step is a string": {**state, "step": "3"}}[content]
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        content = buffer.getvalue()
    (run / ckpt.TRAINER_STATE).write_bytes(content)
    assert main(["train", "--resume", str(run), "--set", f"train.steps={STEPS + 2}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer_state.pt" in err and len(err.splitlines()) == 1, err


def test_resuming_past_the_configured_steps_is_refused(reference, capsys):
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    assert main(["train", "--resume", str(reference), "--set", "train.steps=3", "--no-progress"]) == 2
    assert "past train.steps=3" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before


def poisoned_build_model(bad_steps, build=ckpt.build_model):
    """build_model whose model returns NaN logits on the given training forward passes (0-based)."""
    def build(cfg, _build=build):
        model = _build(cfg)
        calls = [0]

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls[0] += 1
            logits, state = output
            return (logits * math.nan if calls[0] - 1 in bad_steps else logits), state
        model.register_forward_hook(hook)
        return model
    return build


def tiny_cfg(corpus, **overrides):
    settings = {**TINY, "data.path": str(corpus), **overrides}
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def test_a_non_finite_step_is_skipped_and_logged(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "build_model", poisoned_build_model({2, 3}))
    run = tmp_path / "run"
    metrics = train(tiny_cfg(corpus, **{"train.steps": 8}), run, progress=False)
    rows = ckpt.read_metrics(run)
    assert [r["step"] for r in rows if "skipped" in r] == [3, 4]
    assert all(r["skipped"] == "non-finite loss" for r in rows if "skipped" in r)
    assert metrics["step"] == 8 and math.isfinite(metrics["val_loss"])
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "build_model", poisoned_build_model(set(range(5, 100))))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=f"{MAX_BAD_STEPS} non-finite steps in a row"):
        train(tiny_cfg(corpus), run, progress=False)
    state = ckpt.load_trainer_state(run)
    assert state["step"] == 4  # checkpoint_every=4: the last one before the bad steps (5..9)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    model, _, _ = ckpt.load_run(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_bfloat16_autocast_training_tracks_float32(mixer, corpus, tmp_path):
    """Every mixer trains 30 steps under bfloat16 autocast (train.dtype=bfloat16; the layers run their
    recurrences in float32) with no skipped step, and its train loss stays within 0.05 nats of the
    float32 run's at every step, its final validation loss within 0.05. Measured on this corpus:
    gateloop 0.011 (train) / 0.002 (val); the others 0.0005 to 0.003 / 0.0004 to 0.0015."""
    options = {f"model.mixer_options.{k}": json.dumps(v) for k, v in MIXERS[mixer].test_options[0].items()}
    common = {"model.mixer": mixer, "model.d_model": 32, "train.steps": 30, "train.eval_every": 100, **options}
    final, loss = {}, {}
    for dtype in ("float32", "bfloat16"):
        final[dtype] = train(tiny_cfg(corpus, **common, **{"train.dtype": dtype}), tmp_path / dtype, progress=False)
        rows = ckpt.read_metrics(tmp_path / dtype)
        assert not any("skipped" in r for r in rows)
        loss[dtype] = [r["train_loss"] for r in rows if "train_loss" in r]
    assert len(loss["float32"]) == len(loss["bfloat16"]) == 30
    gap = max(abs(a - b) for a, b in zip(loss["float32"], loss["bfloat16"]))
    assert gap < 0.05, f"bf16 train loss off float32's by up to {gap:.4f} nats"
    assert abs(final["float32"]["val_loss"] - final["bfloat16"]["val_loss"]) < 0.05
    assert loss["bfloat16"][-1] < loss["bfloat16"][0] - 1.0  # it learned


def _train_losses(corpus, run, **overrides):
    final = train(tiny_cfg(corpus, **{"train.steps": 12, "train.eval_every": 100, **overrides}), run, progress=False)
    return [r["train_loss"] for r in ckpt.read_metrics(run) if "train_loss" in r], final


def test_compiled_training_tracks_eager(corpus, tmp_path, capsys):
    """train.compile=true: the training steps run through torch.compile (no fallback here: the
    machine has a C++ compiler), their losses track the eager run's (fused kernels round
    differently; measured gap 0 nats on this tiny model), and the run directory holds plain, loadable weights."""
    eager, _ = _train_losses(corpus, tmp_path / "eager")
    compiled, final = _train_losses(corpus, tmp_path / "compiled", **{"train.compile": "true"})
    assert "torch.compile failed" not in capsys.readouterr().out
    assert len(compiled) == len(eager) == 12
    gap = max(abs(a - b) for a, b in zip(eager, compiled))
    print(f"compiled vs eager train loss: max gap {gap:.1e} nats")
    assert gap < 1e-3
    weights = safetensors.torch.load_file(tmp_path / "compiled" / ckpt.WEIGHTS)
    assert not any("_orig_mod" in name for name in weights)
    assert math.isfinite(final["val_loss"])


def test_a_failing_compile_falls_back_to_eager(corpus, tmp_path, monkeypatch, capsys):
    """Where torch.compile cannot compile (here: it raises on the first call), one warning line, then
    the eager run, bitwise: the probing step leaves no trace in gradients, RNG or data order."""
    def broken_compile(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler found\nsecond line of the traceback")
        return fail

    eager, _ = _train_losses(corpus, tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback, _ = _train_losses(corpus, tmp_path / "fallback", **{"train.compile": "true"})
    out = capsys.readouterr().out
    assert "train.compile: torch.compile failed (RuntimeError: no C++ compiler found); training eagerly" in out
    assert fallback == eager


def test_acp_logs_the_pruned_fraction_and_tracks_the_unpruned_run(corpus, tmp_path):
    """FoX with Adaptive Computation Pruning: every train row logs acp_pruned_fraction, and the loss
    curve tracks the same seed without ACP (the pruned softmax mass per row is bounded by eps). At
    init the forget gates are sigma(0) = 1/2 per token, so tiles more than a few blocks back fall
    below eps = e^-10: at seq_len 64 in tiles of 8, a good share is pruned."""
    fox = {"model.mixer": "fox", "model.mixer_options.head_dim": 8, "model.mixer_options.block_size": 8,
           "train.seq_len": 64, "train.steps": 4}
    train(tiny_cfg(corpus, **fox), tmp_path / "exact", progress=False)
    train(tiny_cfg(corpus, **fox, **{"model.mixer_options.log_pruning_tolerance": -10.0}), tmp_path / "acp",
          progress=False)
    exact, pruned = (ckpt.read_metrics(tmp_path / name) for name in ("exact", "acp"))
    rows = [r for r in pruned if "train_loss" in r]
    assert len(rows) == 4 and all(0.2 < r["acp_pruned_fraction"] < 1 for r in rows), rows
    assert not any("acp_pruned_fraction" in r for r in exact)
    for a, b in zip((r["train_loss"] for r in exact if "train_loss" in r), (r["train_loss"] for r in rows)):
        assert abs(a - b) < 1e-4


def test_training_flushes_subnormals_and_restores_the_settings_afterwards():
    """cpu_settings (what train and task runs run under): a subnormal float32 reads as zero inside,
    and both the flag and the thread count are as before afterwards."""
    tiny = torch.tensor([1e-39])  # subnormal in float32
    threads = torch.get_num_threads()
    with cpu_settings(1):
        assert torch.get_num_threads() == 1
        flushed = (tiny * 1.0).item()
    assert torch.get_num_threads() == threads
    if torch.set_flush_denormal(True):  # the CPU can flush: it did inside
        torch.set_flush_denormal(False)
        assert flushed == 0.0
    assert (tiny * 1.0).item() > 0.0
