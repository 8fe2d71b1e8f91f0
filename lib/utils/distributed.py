"""Process-group setup and small collective helpers, for any training script.

Launch with ``torchrun --nproc_per_node=N tools/<script>.py ...`` (or the older
``python -m torch.distributed.launch``): these set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. Without them everything runs as a single process (rank 0 of 1)
and every helper here is a no-op, so scripts need no special case.

Backend: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Number = Union[int, float]


@dataclass
class DistInfo:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files, logs and progress bars)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


class DeviceError(RuntimeError):
    """More processes than devices, or a device that was asked for but is missing."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(local_rank_arg: int = -1, backend: Optional[str] = None,
                     device: Optional[str] = None) -> DistInfo:
    """Initialise the default process group from the environment and choose the device.

    Args:
        local_rank_arg: ``--local_rank`` as passed by ``torch.distributed.launch`` (-1: not given);
            the ``LOCAL_RANK`` environment variable wins when both are set.
        backend: force a backend; default ``'nccl'`` on CUDA and ``'gloo'`` on CPU.
        device: force ``'cpu'`` or ``'cuda'``; default CUDA when available.

    Raises:
        DeviceError: more processes on this node than visible GPUs.
        RuntimeError: a malformed environment.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", local_rank_arg if local_rank_arg >= 0 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise RuntimeError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world_size}")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was requested but CUDA is not available")
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise DeviceError(
                f"process with LOCAL_RANK={local_rank} has no GPU: only {n_gpus} visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                f"launch at most {n_gpus} processes per node (torchrun --nproc_per_node={n_gpus})")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: launch with torchrun")
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"device_id": dev} if chosen == "nccl" else {}
        dist.init_process_group(chosen, rank=rank, world_size=world_size, **kwargs)
        logger.debug("process group initialised: backend %s, rank %d/%d", chosen, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: Union[torch.Tensor, Number]) -> Union[torch.Tensor, float]:
    """Sum of ``value`` over all processes; a tensor gives a tensor (on its device), a number a float."""
    if isinstance(value, torch.Tensor):
        t = value.detach().clone()
        if is_initialized():
            orig_device = t.device
            t = t.to(_collective_device(), torch.float64 if t.is_floating_point() else t.dtype)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t.to(orig_device, value.dtype)
        return t
    t = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not is_initialized():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup(wait: bool = False) -> None:
    """Destroy the process group if one was created; with ``wait``, once every rank has got here.

    The DistributedDataParallel wrapper goes first (``gc.collect()`` frees it from the reference
    cycles of a finished run): one that outlives the group is destroyed during interpreter
    shutdown, and gloo then aborted the process now and then ("terminate called without an active
    exception"; docs/distributed.md, "Several GPUs"). ``wait`` keeps a rank that finished first from tearing
    down its connections while a peer still completes its last collective; after an error the
    other ranks may never arrive, so no barrier then.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def process_group_closed(together: Tuple[type, ...] = ()) -> Iterator[None]:
    """Run a tool's body, then :func:`cleanup`: waiting for the other ranks after a normal exit or
    one of the exceptions ``together`` (those every rank raises at the same step), not after others.
    An exception's finished frames lose their locals first (the model among them, see cleanup)."""
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        cleanup(wait=isinstance(e, together))
        raise
    cleanup(wait=True)


class ShardSampler(torch.utils.data.Sampler):
    """Indices ``rank, rank + world_size, ...`` of a dataset, in order and without padding.

    For evaluation: every sample is seen exactly once over all processes (unlike
    ``DistributedSampler``, which repeats samples to equalise shard sizes), so sums of correct
    counts reduced with :func:`all_reduce_sum` are exact.
    """

    def __init__(self, length: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.length = int(length)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                              torch.nn.DataParallel)) else model
