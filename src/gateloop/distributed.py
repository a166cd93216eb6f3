"""Data parallelism with torch.distributed: `torchrun --nproc_per_node=N -m gateloop train ...`.

torchrun starts N copies of the command and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in each; `init` reads them and joins the process group (gloo on CPU, nccl on CUDA, one
GPU per local rank). Without them (a plain `gateloop train`) it returns a one-process Dist whose
collectives are no-ops, so the training loop has one code path.

How train.py uses it, and why the result equals a one-process run:
- every rank draws the same global batch from (seed, step) and keeps its own block of rows
  (`shard`), so N ranks together see exactly the batch one process would;
- DistributedDataParallel averages the gradients of the N equal shards: the mean over the global
  batch, up to float32 summation order;
- rank 0 alone reads the run directory and writes to it; what the others need (tokenizer, resume
  state, or the UserError that rank 0 raised) is broadcast to them;
- losses and evaluation sums are all-reduced, so every rank takes the same decisions (skip a
  non-finite step, stop on SIGTERM) and reaches the same collectives.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from .errors import UserError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job: rank in [0, world), and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init() created the process group (and close() ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of rows of a global batch [B, ...] -> [B / world, ...]."""
        rows = x.shape[0] // self.world
        return x[self.rank * rows:(self.rank + 1) * rows]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, its result broadcast to every rank; a UserError there is raised on all."""
        if self.world == 1:
            return fn()
        payload: list[Any] = [None, None]
        if self.is_main:
            try:
                payload = [None, fn()]
            except UserError as e:
                payload = [str(e), None]
        torch_dist.broadcast_object_list(payload, src=0, device=self._collective_device())
        if payload[0] is not None:
            raise UserError(payload[0])
        return payload[1]

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over ranks (float64): losses, evaluation totals, flags."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False

    def _collective_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo only CPU ones.
        return self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device_name: str, timeout_minutes: float = 30.0) -> Dist:
    """Join torchrun's process group if there is one (else a one-process Dist) and pick the device.

    device_name is train.device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".
    With several processes, "auto" and "cuda" mean cuda:LOCAL_RANK: one GPU per process.
    """
    grouped = torch_dist.is_available() and torch_dist.is_initialized()  # e.g. made by a test
    world = torch_dist.get_world_size() if grouped else world_size_from_env()
    if world <= 1:
        return Dist(device=resolve_device(device_name))
    if device_name.startswith("cuda:"):
        raise UserError(f"train.device is {device_name!r}, but under torchrun each process takes the GPU of its "
                        "local rank: use train.device=cuda (or auto)")
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"train.device={device_name!r}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    if not grouped:
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(rank=torch_dist.get_rank(), world=world, device=device, owns_group=not grouped)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"train.device {name!r} is not a device: {str(e).splitlines()[0][:120]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"train.device is {name!r} but there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"train.device {name!r}: only cpu and cuda are supported (MPS has no float64, "
                        "which RoPE, FoX and GateLoop's attention mode use)")
    return device
