"""A stand-in accelerator for CPU tensors: the paths that run only on a GPU, run here.

Registered for the "cpu" device type (``pskd_store.accelerator.ACCELERATORS``), it makes
CPU tensors take every accelerator path. Its copies are queued on a "stream" — one
thread — and land only after a delay, in order; an event recorded after them waits for
them, as a CUDA event does. Code that read its host buffers before waiting for the
event would find zeros or stale rows, so tests that compare stored rows see it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist


class StandInEvent:
    def __init__(self, landed: Future):
        self._landed = landed

    def synchronize(self) -> None:
        self._landed.result()


class StandInAccelerator:
    def __init__(self, delay: float = 0.002):
        self.delay = delay  # seconds before each copy lands
        self.stream = ThreadPoolExecutor(1, thread_name_prefix="stand-in-stream")
        self.devices: list[torch.device] = []  # set_device calls, in order
        self.threads_setting_devices: list[str] = []  # and the names of the threads that made them
        self.process_groups: list[tuple[torch.device, timedelta]] = []
        self.generator = torch.Generator().manual_seed(0)  # the "device's" random generator
        self.copies = 0
        self.synchronizations = 0

    def set_device(self, device: torch.device) -> None:
        self.devices.append(device)
        self.threads_setting_devices.append(threading.current_thread().name)

    def init_process_group(self, device: torch.device, timeout: timedelta) -> None:
        self.process_groups.append((device, timeout))
        dist.init_process_group("gloo", timeout=timeout)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    def copy_to_host(self, host: torch.Tensor, tensor: torch.Tensor) -> None:
        def land() -> None:
            time.sleep(self.delay)
            host.copy_(tensor)

        self.copies += 1
        self.stream.submit(land)

    def record(self, device: torch.device) -> StandInEvent:
        return StandInEvent(self.stream.submit(lambda: None))

    def synchronize(self, device: torch.device) -> None:
        self.stream.submit(lambda: None).result()
        self.synchronizations += 1

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
