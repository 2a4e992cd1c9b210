"""batch_transfer: a batch's small tensors cross from a worker to the training process in
the message itself, larger ones through shared memory, and arrive exactly as they left."""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reducers: tensors pickle as shared memory)

from pskd_store.batch_transfer import BY_VALUE_BYTES, ByValueBatch

SMALL = [  # every dtype a batch carries, and the shapes it has
    torch.tensor([0.5, 0.25, 0.125], dtype=torch.float16),
    torch.tensor([7, -3], dtype=torch.int64),
    torch.tensor([True, False, True]),
    torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
    torch.tensor(41, dtype=torch.int64),  # 0-d
    torch.empty(0, 4),
]


def _handed_over(batch: ByValueBatch) -> tuple:
    """What a worker's result queue does to a batch: ForkingPickler at one end, pickle at the other."""
    return pickle.loads(ForkingPickler.dumps(batch))


def test_a_batch_is_a_tuple_until_it_is_handed_over():
    inputs = torch.ones(2, 3)
    batch = ByValueBatch((inputs, *SMALL))
    first, *rest = batch  # a collate_fn that wraps collate_soft_targets unpacks it like any batch
    assert len(batch) == 1 + len(SMALL) and first is inputs and rest[1] is SMALL[1]

    received = _handed_over(batch)
    assert type(received) is tuple and len(received) == len(batch)
    assert isinstance(_handed_over(ByValueBatch((inputs, np.arange(3))))[1], np.ndarray)  # not made a tensor
    assert torch.equal(received[0], inputs)
    for sent, got in zip(SMALL, received[1:], strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)
    # by value: none of the small tensors went to shared memory; the inputs did, as in any batch
    assert inputs.untyped_storage().is_shared() and not any(t.untyped_storage().is_shared() for t in SMALL)
    torch.save(received, io.BytesIO())  # each owns its memory


def test_the_smallest_travel_by_value_up_to_the_budget_the_rest_through_shared_memory():
    kb = 1024
    big = torch.rand((BY_VALUE_BYTES - 512) // 4)  # fits alone, not after the 1.25 KB of the two small ones
    small = torch.arange(kb // 8)  # 1 KB each
    smaller = torch.rand(kb // 8).half()  # 256 bytes
    bfloat = torch.rand(3).bfloat16()  # no NumPy dtype: shared, whatever its size
    at_budget = torch.rand(BY_VALUE_BYTES // 4)
    received = _handed_over(ByValueBatch((torch.zeros(1), big, small, bfloat, smaller)))
    assert [t.untyped_storage().is_shared() for t in (big, small, bfloat, smaller)] == [True, False, True, False]
    for sent, got in zip((big, small, bfloat, smaller), received[1:], strict=True):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    _handed_over(ByValueBatch((torch.zeros(1), at_budget)))
    assert not at_budget.untyped_storage().is_shared()  # the budget is inclusive
