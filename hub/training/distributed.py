"""Data-parallel training over processes started by `accelerate launch` / `torchrun` (or `hub train --nproc N`).

Every process holds the whole frozen backbone and the same trainable weights. Each optimizer step, all processes
draw the same global micro-batch of `batch_size × world_size` examples (same seed) and each takes its own slice;
gradients are summed over processes after the local loss is scaled by the process's share of the global batch's
labelled tokens, so a step equals one process's step on the global batch (up to float summation order). Only
rank 0 writes the run folder and prints. Backend: gloo on the CPU, nccl on GPUs (one GPU per process).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from hub.errors import HubError

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes the launcher started (its WORLD_SIZE), 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_accelerate_note() -> str | None:
    """`accelerate launch --num_processes N` on a machine without GPUs starts ONE process (its simple launcher sets
    MASTER_ADDR but no WORLD_SIZE); say so rather than let the user believe the run is data-parallel."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        return ("note: accelerate launch started a single process: without GPUs it needs --multi_gpu (its name for "
                "the torchrun launcher) to start several, e.g. `accelerate launch --multi_gpu --num_processes 2 -m "
                "hub train ...`, or use `hub train --nproc 2`; training in one process")
    return None


def init_process_group(device: str) -> None:
    """Join the launcher's process group (env://) when WORLD_SIZE > 1: nccl with one GPU per local rank, else gloo."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    atexit.register(dist.destroy_process_group)


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group; every method is a no-op (or identity) for a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls, device: torch.device) -> "DataParallel":
        if not dist.is_initialized():
            return cls(device=device)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's contiguous slice of a global batch (the first processes get one more when it is uneven)."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start : start + size + (self.rank < extra)])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def token_share(self, local_tokens: int) -> float:
        """This process's share of the global micro-batch's labelled tokens, times world_size: scaling the local
        mean loss by it and summing gradients gives the gradient of the global mean loss."""
        if self.world_size == 1:
            return 1.0
        (total,) = self.sum([local_tokens])
        return local_tokens / max(total, 1.0)

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum gradients over processes, flattened into one buffer (one collective per step)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace gradients by their mean over processes (steps every process takes on its own data, such as a
        regulariser's, stay identical everywhere)."""
        if self.world_size == 1:
            return
        self.sum_gradients(params)
        for param in params:
            param.grad /= self.world_size

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter], seed: int) -> None:
        """Start every process from rank 0's trainable weights; then seed each process's dropout differently."""
        if self.world_size == 1:
            return
        for param in params:
            dist.broadcast(param.data, src=0)
        torch.manual_seed(seed + self.rank)

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run `action` on rank 0 only; a HubError it raises is raised on every process (none is left waiting)."""
        result, message = None, None
        if self.is_main:
            try:
                result = action()
            except HubError as err:
                message = str(err)
        if self.world_size > 1:
            shared = [message]
            dist.broadcast_object_list(shared, src=0)
            message = shared[0]
        if message is not None:
            raise HubError(message)
        return result


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """`hub ARGV` again under torchrun with `nproc` processes (a free local port), without its --nproc option."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "hub", *args]
