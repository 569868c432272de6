"""Data-parallel training through `accelerate.Accelerator`, over processes started by `accelerate launch`,
`torchrun` or `hub train --nproc N` (which relaunches under torchrun). A plain run is one process and never builds
an Accelerator: every method below is then the identity, and training is what it is without this module.

The Accelerator joins the launcher's process group (gloo on the CPU, nccl with one GPU per process) and
`prepare` wraps the model in DistributedDataParallel, which starts every process from rank 0's weights and
averages the trainable gradients over the processes at a step's last micro-batch (`no_sync` before it). Each
optimizer step, all processes draw the same global micro-batch of `batch_size × world_size` examples (same seed)
and each takes its own contiguous slice, so a step equals one process's step on the global batch (up to float
summation order; `tests/test_distributed.py`). Only rank 0 writes the run folder and prints.

What stays written here, and why Accelerator's own pieces do not fit:
- The loss scale (`token_share`). One process's loss on the global batch is the mean over all its labelled
  tokens; processes hold different numbers of them, so DDP's average of per-process means is not that mean.
  Each process scales its own mean by its share of the global batch's labelled tokens (one `reduce` of the
  count) and by `world_size`, and DDP's average of the scaled gradients is then the global mean's gradient.
  (`Accelerator.backward` and `accumulate` only divide by a fixed number of accumulation steps.)
- The batches. `Accelerator.prepare(DataLoader)` shards batches by interleaving and, with `even_batches`, fills
  an uneven epoch end by wrapping around to its start; one process drawing the global batch would see other
  examples, so the shared seeded draw (`hub.training.batches.epoch_batches`) and `shard` stay.
- Parameters outside the model: a regulariser's modules are never registered in the model (nothing of them is
  exported), so DDP does not see them; their gradients are averaged with `reduce` (`average_gradients`) and they
  start from rank 0's values (`broadcast`).
- `on_main`: an error rank 0 raises while preparing the run folder is sent to every process
  (`broadcast_object_list`), so none is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence, TypeVar

import torch

from hub.errors import HubError

if TYPE_CHECKING:
    from accelerate import Accelerator

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


@functools.cache
def _accelerator(on_gpu: bool) -> "Accelerator":
    """The process's one Accelerator: it joins the launcher's process group (env://) on first use. Mixed precision
    and compilation stay off whatever the launcher says: the trainers choose their own autocast."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [] if on_gpu else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(cpu=not on_gpu, device_placement=False, mixed_precision="no", dynamo_backend="no",
                       kwargs_handlers=handlers)


def join(device: str | torch.device) -> "DataParallel":
    """This process's place in the launcher's group, joining it (nccl with one GPU per local rank where the device
    is a GPU, else gloo) when the launcher started several processes; a plain run joins none."""
    if launched_world_size() <= 1:
        return DataParallel()
    on_gpu = str(device) != "cpu" and torch.cuda.is_available()  # "auto", "cuda", "cuda:1", a torch.device
    return DataParallel(_accelerator(on_gpu))


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank's contiguous slice of a global batch (the first ranks get one more when it is uneven), the rule of
    `Accelerator.split_between_processes`."""
    size, extra = divmod(len(items), world_size)
    start = rank * size + min(rank, extra)
    return list(items[start : start + size + (rank < extra)])


class DataParallel:
    """What a trainer does differently over several processes; the identity for a single one."""

    def __init__(self, accelerator: "Accelerator | None" = None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world_size = accelerator.num_processes if accelerator else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module, extra_params: Sequence[torch.nn.Parameter], seed: int
                ) -> torch.nn.Module:
        """The model to train through (DDP-wrapped; it shares the model's parameters), every process started
        from rank 0's weights, `extra_params` (outside the model) included; then each process's dropout seeded
        differently."""
        if self.accelerator is None:
            return model
        from accelerate.utils import broadcast

        wrapped = self.accelerator.prepare_model(model)
        for param in extra_params:
            param.data.copy_(broadcast(param.data.contiguous(), from_process=0))
        torch.manual_seed(seed + self.rank)
        return wrapped

    def no_sync(self, model: torch.nn.Module, sync: bool) -> ContextManager[None]:
        """Around a micro-batch's backward: DDP averages the gradients only when `sync` (a step's last one)."""
        if self.accelerator is None or sync:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def shard(self, items: Sequence[T]) -> list[T]:
        return shard(items, self.rank, self.world_size)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes."""
        if self.accelerator is None:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.reduce(tensor, "sum").tolist()]

    def token_share(self, local_tokens: int) -> float:
        """This process's share of the global micro-batch's labelled tokens: the local mean loss times it, summed
        over processes, is the global mean loss."""
        if self.accelerator is None:
            return 1.0
        (total,) = self.sum([local_tokens])
        return local_tokens / max(total, 1.0)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of `loss` summed over processes: DDP averages them, so the loss is scaled by world_size."""
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss * self.world_size)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace gradients by their mean over processes, flattened into one buffer (one collective): for
        parameters DDP does not hold (a regulariser's, on the task loss or its own optimiser step)."""
        if self.accelerator is None or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run `action` on rank 0 only; a HubError it raises is raised on every process (none is left waiting)."""
        result, message = None, None
        if self.is_main:
            try:
                result = action()
            except HubError as err:
                message = str(err)
        if self.accelerator is not None:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message], from_process=0)[0]
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
