"""The training step loop that language-model runs (train.py) and task runs (tasks.py) share.

    for s in train_steps(net, model, optimizer, tc, batch_at, loss_of, start=step, dist=dist):
        if s.log: ...        # the caller logs, evaluates and checkpoints as it sees fit

One step: the scheduled learning rate (optim.py) on every param group; the forward under autocast;
one all-reduce carrying the global batch's loss and any rank's stop request; backward, gradient
clipping, the optimizer step. A step whose loss or gradient norm is not finite makes no update and
is reported in its Step; MAX_BAD_STEPS of them in a row raise UserError. A SIGTERM or Ctrl-C ends
the loop between two steps with StopRequested, for the caller to checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import distributed
from .errors import StopRequested, UserError
from .optim import set_lr

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


@dataclass
class Step:
    """What the step just taken reports to the caller of train_steps."""

    step: int  # steps done, this one included
    loss: float  # the global batch's loss, averaged over the ranks
    lr: float
    skipped: str | None  # why no update was made ("non-finite loss" / "non-finite gradient"), or None
    bad_steps: int  # skipped steps in a row, this one included
    log: bool  # a logging step (every train.log_every steps, and the last)
    tokens_per_s: float  # training tokens per second since the previous logging step (on logging steps)
    bar: tqdm


def train_steps(net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tc,
                batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, start: int = 0,
                dist: distributed.Dist, autocast_dtype: torch.dtype | None = None, progress: bool = True,
                diverged: str = "try a lower train.lr", on_interrupt: str = "stopping after this step"
                ) -> Iterator[Step]:
    """Steps start .. tc.steps - 1 of training net (model, or its DDP / compiled wrapper; gradients
    are clipped on model's parameters). batch_at(step) gives this rank's (inputs, targets);
    loss_of(logits, targets) the mean loss (logits come in float32). diverged ends the error raised
    after MAX_BAD_STEPS bad steps; on_interrupt is what a Ctrl-C is told will happen."""
    device, bad_steps = dist.device, 0
    bar = tqdm(total=tc.steps, initial=start, disable=not (progress and dist.is_main), unit="step",
               dynamic_ncols=True)
    last_log, tokens = time.perf_counter(), 0
    try:
        with stop_requests(signal.SIGTERM, signal.SIGINT, announce=on_interrupt if dist.is_main else "") as stop:
            for step in range(start, tc.steps):
                x, y = batch_at(step)
                lr = set_lr(optimizer, step, tc)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits, _ = net(x)
                loss = loss_of(logits.float(), y)
                loss_sum, stops = dist.sum([loss.item(), float(bool(stop))])
                if stops:
                    raise StopRequested(stop[0] if stop else signal.SIGTERM, step)
                loss_value, skipped = loss_sum / dist.world, None
                if not math.isfinite(loss_value):
                    skipped = "non-finite loss"
                else:
                    loss.backward()
                    # The norm of the averaged gradient, the same on every rank; inf means no clipping.
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
                    if torch.isfinite(norm):
                        optimizer.step()
                    else:
                        skipped = "non-finite gradient"
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                if skipped:
                    bad_steps += 1
                    if dist.is_main:
                        tqdm.write(f"step {step + 1}: {skipped} ({loss_value}), step skipped")
                else:
                    bad_steps = 0
                    tokens += x.numel() * dist.world
                done = step + 1
                log = done % tc.log_every == 0 or done == tc.steps
                tokens_per_s = 0.0
                if log:
                    now = time.perf_counter()
                    tokens_per_s, last_log, tokens = tokens / (now - last_log), now, 0
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                yield Step(done, loss_value, lr, skipped, bad_steps, log, tokens_per_s, bar)
                if bad_steps >= MAX_BAD_STEPS:  # after the caller has logged the last one
                    raise UserError(f"{bad_steps} non-finite steps in a row (the last at step {done}): "
                                    f"stopping; {diverged}")
    finally:
        bar.close()


@contextlib.contextmanager
def stop_requests(*signums: int, announce: str = "stopping after this step"):
    """Yields a list that the given signals append to (instead of killing the process), for the loop
    to poll between steps; a first Ctrl-C prints announce (if any), a second raises KeyboardInterrupt,
    for a user who will not wait. Handlers can only be set from the main thread; elsewhere nothing is
    caught."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def request(signum, frame):
        if signum == signal.SIGINT:
            if requested:  # a second Ctrl-C: stop at once, without a checkpoint
                raise KeyboardInterrupt
            if announce:  # under torchrun every rank gets the Ctrl-C; rank 0 says so
                print(f"\ngateloop: interrupted: {announce} (Ctrl-C again: quit at once)", file=sys.stderr, flush=True)
        requested.append(signum)

    previous = {s: signal.signal(s, request) for s in signums}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def cpu_settings(threads: int):
    """Inside: torch's CPU thread count set to `threads` (0: left as it is), and subnormal floats
    (below 1.2e-38 in float32) flushed to zero; both restored afterwards.

    On x86 every operation on a subnormal is dozens of times slower than on a normal float, and
    recurrences make them: a forget gate that saturates multiplies a cell by a tiny factor at every
    step, decays multiply over a whole chunk. An LSTM variant whose gates saturated trained 2.7x
    slower for it (docs/claims.md, LSTM Odyssey). What is flushed is far below what float32 resolves
    in any sum it enters. The flag is per thread (torch.set_flush_denormal): it holds for the
    calling thread and threads it starts later; intra-op workers started before may keep
    subnormals, which costs speed only."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
