"""What the project asks of an accelerator, behind one small interface.

Code that must act differently for tensors on a GPU — copies to pinned host memory that
do not wait for the device, the events that say when they landed, the process's current
device, the device's random generator, the process-group backend — asks
:func:`accelerator_for` instead of testing ``device.type == "cuda"``. CUDA is the one
accelerator registered. Tests register a stand-in for CPU tensors (copies made later on
a thread of its own, events that wait for them), so every line behind this interface
runs on machines without a GPU; only :class:`Cuda`'s own methods cannot, and they are
listed in ``tests/gpu_only_lines.txt``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist


class CopyEvent(Protocol):
    def synchronize(self) -> None:
        """Wait until every copy recorded before the event has landed."""


class Accelerator(Protocol):
    """A device type whose tensors are copied to the host asynchronously."""

    def set_device(self, device: torch.device) -> None:
        """Make ``device`` this process's current device (streams, events, pinned memory)."""

    def init_process_group(self, device: torch.device, timeout: timedelta) -> None:
        """Join torchrun's process group with this device type's backend."""

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Zeroed host memory that device copies can land in without blocking."""

    def copy_to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        """Queue a copy of ``tensor`` into ``host`` on the current stream; do not wait."""

    def record(self, device: torch.device) -> CopyEvent:
        """An event after everything queued so far on ``device``'s current stream."""

    def synchronize(self, device: torch.device) -> None:
        """Wait for everything queued so far on ``device``, on every stream."""

    def rng_state(self) -> torch.Tensor | None:
        """The current device's generator state, or None while the device is unused."""

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore the current device's generator."""


class Cuda:
    """NVIDIA GPUs: pinned host buffers, non-blocking copies, CUDA events, NCCL."""

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def init_process_group(self, device: torch.device, timeout: timedelta) -> None:
        dist.init_process_group("nccl", timeout=timeout, device_id=device)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def copy_to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        host.copy_(tensor, non_blocking=True)

    def record(self, device: torch.device) -> CopyEvent:
        event = torch.cuda.Event(blocking=True)  # its waiter sleeps in the driver instead of spinning a core
        event.record(torch.cuda.current_stream(device))
        return event

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def rng_state(self) -> torch.Tensor | None:
        return torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.cuda.set_rng_state(state)  # onto the current device, whichever it is now


# device type -> accelerator; a device type not listed lives in host memory
ACCELERATORS: dict[str, Accelerator] = {"cuda": Cuda()}


def accelerator_for(device: torch.device | str) -> Accelerator | None:
    """The accelerator of ``device``'s type, or None for host memory (the CPU)."""
    return ACCELERATORS.get(device.type if isinstance(device, torch.device) else torch.device(device).type)
