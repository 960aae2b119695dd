"""Multi-process training with ``torchrun`` (DDP): process group, sharding of the global batch, gradient sync.

A leaf module (it imports torch and kdrepro.errors only) shared by the training loop (:mod:`kdrepro.train`) and the methods
(:mod:`kdrepro.distill`).

``kdrepro train`` run under ``torchrun --nproc_per_node=N`` detects ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``, joins a
process group (NCCL on GPUs, gloo on CPU) and trains with ``loader.batch_size`` as the **global** batch: every rank
draws the same global batch from the seeded sampler and keeps its contiguous slice (rank ``r`` of ``W`` takes images
``[r·B/W, (r+1)·B/W)``, so gathered tensors come back in the global batch's order), and a run's data stream
does not depend on the number of processes. The student is wrapped in ``DistributedDataParallel`` (gradients averaged
during backward); a method's own trainable modules (projectors, embedding heads) have their gradients averaged after
backward by :func:`average_gradients`, and modules with their own optimizer (SKD's critic, MasKD's tokens) by
:func:`average_gradients_if_distributed`. Only rank 0 logs, evaluates and writes checkpoints; every rank resumes from
the same checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kdrepro.errors import ConfigError


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_environment(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (no-op for a single process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def resolve_device(name: str) -> torch.device:
    """The ``device`` setting as a torch device (``auto``: CUDA when available); a one-line error for CUDA without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def setup_device(name: str) -> tuple[DistributedContext, torch.device]:
    """The process group ``torchrun`` describes (none for one process) and this rank's device for the ``device``
    setting: the one place a command sets up where it runs."""
    context = init_from_environment(name)
    return context, rank_device(resolve_device(name), context)


def shard(batch: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This rank's contiguous slice of a global batch."""
    if not context.enabled:
        return batch
    if batch.shape[0] % context.world_size:
        raise ValueError(f"loader.batch_size={batch.shape[0]} is not divisible by {context.world_size} processes")
    per_rank = batch.shape[0] // context.world_size
    return batch[context.rank * per_rank : (context.rank + 1) * per_rank]


def current_context() -> DistributedContext:
    """The process group this process has joined, or a single-process context when there is none."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistributedContext()


def wrap_student(student: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """The student in ``DistributedDataParallel`` under torchrun; the student itself in a single process."""
    if not context.enabled:
        return student
    device_ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # BN buffers stay rank-local, as in mmseg; the suggested replacement syncs them
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(student, device_ids=device_ids, broadcast_buffers=False)


def average_gradients(parameters: Iterable[nn.Parameter], context: DistributedContext) -> None:
    """All-reduce (mean) the gradients of parameters that DDP does not manage, in one flat buffer."""
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_float(value: float, context: DistributedContext, device: torch.device) -> float:
    """Rank 0's value on every rank (e.g. training seconds, so a seconds budget stops everywhere at once)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def any_rank(flag: bool, context: DistributedContext, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a signal arrived at one process)."""
    if not context.enabled:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def average_gradients_if_distributed(parameters: Iterable[nn.Parameter]) -> None:
    """For a method's separately optimised modules (SKD's discriminator, MasKD's tokens): keep them identical on
    every rank by averaging their gradients before their own optimizer step (no-op in a single process)."""
    average_gradients(parameters, current_context())


@torch.no_grad()
def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); the tensor itself on a single process.

    Every rank must pass an equally shaped tensor (e.g. ``drop_last=True`` batches).
    """
    context = current_context()
    if not context.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def rank_device(device: torch.device, context: DistributedContext) -> torch.device:
    """This rank's GPU under torchrun (``cuda:<local rank>``), else ``device``."""
    if context.enabled and device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def check_global_batch(batch: int, context: DistributedContext) -> None:
    """The same rule as training: the global batch splits into at least 2 images per process."""
    if batch % context.world_size or batch // context.world_size < 2:
        raise ConfigError(
            f"loader.batch_size={batch} is the global batch: it must split into at least 2 images on each of the "
            f"{context.world_size} processes (BatchNorm on the pooled PSP branch needs 2); use a multiple of "
            f"{2 * context.world_size}"
        )
