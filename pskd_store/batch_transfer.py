"""A batch's small tensors handed from a DataLoader worker to the training process by value.

Every tensor a worker returns crosses to the training process in a shared-memory file of
its own, whose descriptor the training process fetches from the worker over a socket
(torch's default ``file_descriptor`` sharing): ~0.3-0.6 ms per tensor on the 2-core
reference VM, whatever its size, of the thread that receives it — the training thread, or
with ``pin_memory`` the DataLoader's pin-memory thread, which holds the same GIL. A
soft-target batch carries two more than CE's (targets and ids besides inputs and labels),
so receiving it took ~0.5-0.7 ms a batch more than CE's (``benchmarks/loader_transfer.py``).
A small tensor costs less copied into the message itself, until the message outgrows the
pipe it is written through (64 KiB on Linux) and the two processes take turns filling and
draining it: on the reference VM copying one tensor won up to 16 KB, broke even at 32 KB
and lost from 64 KB (``one_tensor_us`` in the same benchmark). So the batch's small
tensors, the smallest first, travel by value up to ``BY_VALUE_BYTES`` in all, the rest
through shared memory as before: all of an MNIST-1D or CIFAR-10 batch's (targets 5 KB,
labels and ids 1 KB each), a CIFAR-100 batch's labels and ids (its targets, 51 KB, as before).
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

BY_VALUE_BYTES = 16 << 10  # a batch's tensors copied into its message, in all
_NUMPY_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.float16, torch.float32, torch.float64}


class ByValueBatch(tuple):
    """``(inputs, *rest)``, a tuple like any batch in the process that made it; pickled (a
    worker handing it over), the CPU tensors of ``rest`` travel in the message, the smallest
    first, up to ``BY_VALUE_BYTES`` in all, and the receiving process gets back a plain tuple
    of the same tensors."""

    def __reduce__(self):
        inputs, *rest = self
        budget, parts, copied = BY_VALUE_BYTES, list(rest), []
        for i in sorted((i for i, part in enumerate(rest) if _copyable(part)), key=lambda i: rest[i].nbytes):
            if rest[i].nbytes > budget:
                break
            budget -= rest[i].nbytes
            parts[i] = rest[i].numpy()  # pickled with its bytes, where a tensor is pickled as a shared-memory file
            copied.append(i)
        return _received, (inputs, parts, copied)


def handed_over_by_value(collated: tuple | list) -> tuple | list:
    """What a ``collate_fn`` returns for ``(inputs, *rest)``: in a worker process a
    :class:`ByValueBatch`, in the training process (``num_workers=0``) ``collated`` as it is."""
    return collated if get_worker_info() is None else ByValueBatch(collated)


def _copyable(part: object) -> bool:
    return (isinstance(part, torch.Tensor) and part.device.type == "cpu" and part.dtype in _NUMPY_DTYPES
            and not part.requires_grad)


def _received(inputs: object, rest: list, copied: list[int]) -> tuple:
    for i in copied:
        rest[i] = torch.from_numpy(rest[i])
    return (inputs, *rest)
