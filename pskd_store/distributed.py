"""The process group of a torchrun launch, or a stand-in for one process.

``torchrun --nproc-per-node N --no-python pskd-store train ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE; :func:`setup` reads them, picks NCCL on GPUs and gloo
on CPUs, and gives each process its own device. Without torchrun it is one process and
no process group. The training loop synchronises only at epoch boundaries (no
per-batch exchange of predictions): barriers around the seal and the teacher's decode,
and one gather of the test predictions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .accelerator import accelerator_for

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """Where this process stands among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def spans_nodes(self) -> bool:
        """Whether the processes run on more than one machine (node-local caches differ)."""
        return self.local_world_size < self.world_size

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the one process per node that decodes the teacher for the node."""
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP copies them
        to the others at each training forward, before that rank's own batch updates its
        copy, so after an epoch's last step every rank holds its own; each rank evaluates its
        shard with rank 0's model, the one checkpointed."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on the main process (None elsewhere)."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered


def local_main_first(env: Distributed, action: Callable[[], T], *, shared_between_nodes: bool = False) -> T:
    """Run ``action`` on each node's local rank 0, then, once it is done, on the node's other
    ranks, and return what it returned: the first downloads the data set or decodes the
    teacher into the node's files, the others read those. With ``shared_between_nodes`` (a
    data folder that several nodes may see, on a network file system) rank 0 runs it alone
    before the other nodes' first ranks, so that one process downloads into the folder and
    the others find it whole; a node-local folder is still filled by its node's first rank."""
    done = False
    if shared_between_nodes and env.spans_nodes:
        if env.is_main:
            result, done = action(), True
        env.barrier()
    if env.is_local_main and not done:
        result = action()
    env.barrier()
    if not env.is_local_main:
        result = action()
    return result


def select_device(name: str) -> torch.device:
    """The device the user asked for ("auto": a GPU when one is visible), refusing a GPU
    this process cannot see."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible to this process; use --device cpu (or auto)")
    return device


def use_device(name: str) -> torch.device:
    """The device the user asked for (:func:`select_device`), made this process's current
    one where it is an accelerator, so that streams, events, pinned memory and the
    DataLoader's pin thread use it rather than device 0; named with its index."""
    chosen = select_device(name)
    accelerator = accelerator_for(chosen)
    if accelerator is not None:
        if chosen.index is None:  # "cuda": torch.cuda.set_device refuses a device without its index
            chosen = torch.device(chosen.type, 0)
        accelerator.set_device(chosen)
    return chosen


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_environment() -> Distributed | None:
    """This process's place as torchrun's environment variables give it; None without torchrun."""
    if not launched_by_torchrun():
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return Distributed(rank=int(os.environ["RANK"]), world_size=world_size,
                       local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def setup(device: str, timeout: timedelta) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group (if launched by it) and choose this process's device.

    ``device`` is the user's choice ("auto", "cpu", "cuda", "cuda:N"); under torchrun an
    accelerator choice becomes this process's own device, ``cuda:LOCAL_RANK``. ``timeout``
    bounds every collective, the barriers at which ranks wait for rank 0's seal included
    (``--dist-timeout``; recipe.DIST_TIMEOUT_S says why an hour).
    """
    env = torchrun_environment()
    if env is None:
        return Distributed(), use_device(device)
    chosen = select_device(device)
    accelerator = accelerator_for(chosen)
    if accelerator is not None:
        chosen = torch.device(chosen.type, env.local_rank)
        accelerator.set_device(chosen)
    if not dist.is_initialized():
        if accelerator is None:
            dist.init_process_group("gloo", timeout=timeout)
        else:
            accelerator.init_process_group(chosen, timeout)
    return env, chosen


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
