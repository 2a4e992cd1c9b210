"""SoftTargetStore and PredictionWriter on a real Zarr store on disk."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import FORK, exit_code, forked
from store_helpers import chunk_file, chunk_files, epoch_probs, make_labels, write_epoch, write_trajectory_per_field

from pskd_store.errors import StoreDamagedError
from pskd_store.staging import PartWriter
from pskd_store.store import EpochNotSealedError, SoftTargetStore, StoreError

N, K, CHUNK_ROWS = 300, 7, 32


def test_round_trip_float16_and_float32(tmp_path, labels):
    for dtype, tol in (("float16", 1e-3), ("float32", 0.0)):
        store = SoftTargetStore.create(tmp_path / dtype, labels, K, dtype=dtype, chunk_rows=64)
        probs = write_epoch(store, 1)
        back = SoftTargetStore.open(tmp_path / dtype, labels=labels).read_epoch(1)
        assert back.dtype == np.dtype(dtype) and back.shape == (N, K)
        np.testing.assert_allclose(back, probs, atol=tol, rtol=0)


def test_logits_are_stored_as_softmax(store):
    logits = torch.randn(N, K)
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    np.testing.assert_allclose(store.read_epoch(1), logits.softmax(1).numpy(), atol=1e-3)


def test_low_precision_logits_are_upcast_before_the_softmax(tmp_path, labels):
    # What --amp hands the writer: bfloat16 logits. The teacher is softmax(fp32(logits)),
    # exactly; a softmax taken in bfloat16 would be off by up to ~4e-3 per probability.
    store = SoftTargetStore.create(tmp_path / "f32", labels, K, dtype="float32")
    logits = (torch.randn(N, K) * 6).bfloat16()
    with store.writer(1) as writer:
        writer.write(torch.arange(N), logits)
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), logits.float().softmax(1).numpy())
    assert not np.array_equal(store.read_epoch(1), logits.softmax(1).float().numpy())


def test_a_chunk_holds_about_1_mib_of_rows_or_all_of_them_when_they_take_less(tmp_path):
    """A chunk is written whole: one larger than N would write its padding every epoch."""
    small = SoftTargetStore.create(tmp_path / "small", make_labels(3000, 10), 10)
    assert small.chunk_rows == 3000  # 60 KB of float16 rows: one chunk of exactly N
    write_epoch(small, 1, batch=500)
    assert json.loads((Path(small.url) / "teacher/epoch_0001/zarr.json").read_text())[
        "chunk_grid"]["configuration"]["chunk_shape"] == [3000, 10]
    large = SoftTargetStore.create(tmp_path / "large", make_labels(60000, 10), 10)
    assert large.chunk_rows == 32768  # ~1 MiB (a power of two) of 20-byte rows


def test_layout_attributes_and_compression(store, labels):
    write_epoch(store, 1)
    document = (Path(store.url) / "zarr.json").read_text()
    assert "\n" not in document  # written again at every seal: compact, not indented
    assert zarr.open_group(store.url, mode="r").attrs["pskd_store"]["sealed"] == [1]  # zarr reads it as ever
    root = json.loads(document)["attributes"]["pskd_store"]
    assert root["num_samples"] == N and root["num_classes"] == K and root["dtype"] == "float16"
    assert root["sealed"] == [1] and root["fingerprint"]["num_samples"] == N
    teacher = json.loads((Path(store.url) / "teacher/epoch_0001/zarr.json").read_text())
    assert teacher["shape"] == [N, K] and teacher["chunk_grid"]["configuration"]["chunk_shape"] == [32, K]
    assert [c["name"] for c in teacher["codecs"]][-2:] == ["blosc", "crc32c"]  # checksum of the compressed bytes
    assert teacher["fill_value"] == 0.0 and root["schema_version"] == 3
    for array in ("labels", "trajectory/epoch_0001"):
        codecs = json.loads((Path(store.url) / array / "zarr.json").read_text())["codecs"]
        assert codecs[-1]["name"] == "crc32c", array
    # the epoch's trajectory record: one array of one chunk, a row's 9 bytes and 7 zeros shuffled as one item
    trajectory = json.loads((Path(store.url) / "trajectory/epoch_0001/zarr.json").read_text())
    assert trajectory["shape"] == [N, 16] and trajectory["data_type"] == "uint8"
    assert trajectory["codecs"][1]["configuration"]["typesize"] == 16
    assert sorted(p.name for p in (Path(store.url) / "trajectory/epoch_0001").iterdir()) == ["c.0.0", "zarr.json"]
    # chunks beside their array's document: no directory made per chunk
    assert sorted(p.name for p in (Path(store.url) / "teacher/epoch_0001").iterdir()) == \
        sorted([f"c.{i}.0" for i in range(-(-N // 32))] + ["zarr.json"])
    assert sorted(p.name for p in (Path(store.url) / "labels").iterdir()) == ["c.0", "zarr.json"]
    np.testing.assert_array_equal(store.labels, labels)


def test_a_store_with_zarrs_default_chunk_keys_keeps_working(tmp_path, labels, monkeypatch):
    """A store whose arrays keep their chunks as ``c/3/0`` (zarr's default, what stores made
    before ``CHUNK_KEYS`` have) is read, carried forward and verified as any other; its next
    epochs get ``c.3.0``."""
    import pskd_store.array_files as array_files
    import pskd_store.store as store_module
    from pskd_store.verify import verify_path

    for module in (array_files, store_module):
        monkeypatch.setattr(module, "CHUNK_KEYS", {"name": "default", "separator": "/"})
    monkeypatch.setattr(array_files, "_MADE", {})  # no document of this process's arrays reused
    first = write_epoch(SoftTargetStore.create(tmp_path / "s", labels, K, dtype="float32", chunk_rows=CHUNK_ROWS), 1)
    monkeypatch.undo()
    assert (tmp_path / "s" / "labels" / "c" / "0").is_file()
    assert (tmp_path / "s" / "teacher" / "epoch_0001" / "c" / "3" / "0").is_file()
    half = np.arange(N // 2)
    second = write_epoch(SoftTargetStore.open(tmp_path / "s"), 2, ids=half)  # the rest carried forward from epoch 1
    assert (tmp_path / "s" / "teacher" / "epoch_0002" / "c.3.0").is_file()
    store = SoftTargetStore.open(tmp_path / "s", labels=labels)
    np.testing.assert_array_equal(store.read_epoch(1), first)
    np.testing.assert_array_equal(store.read_epoch(2), np.concatenate([second[half], first[N // 2:]]))
    assert store.trajectory()["written"][1].tolist() == [True] * (N // 2) + [False] * (N - N // 2)
    assert verify_path(store.url).ok


def test_a_schema_2_store_with_a_trajectory_array_per_field_keeps_working(tmp_path, labels, monkeypatch):
    """A store made by schema 2 (an epoch's trajectory a group of an array per field) is read,
    verified and written on; its next seal makes it schema 3, and its older epochs read as
    they are: trajectories equal to a new store's of the same epochs."""
    import pskd_store.store as store_module
    from pskd_store.verify import verify_path

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(SoftTargetStore, "_write_trajectory", write_trajectory_per_field)
    old = SoftTargetStore.create(tmp_path / "old", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(old, 1)
    monkeypatch.undo()
    assert old.summary()["schema_version"] == 2
    assert (tmp_path / "old" / "trajectory" / "epoch_0001" / "argmax" / "zarr.json").is_file()
    assert verify_path(old.url).ok
    half = np.arange(N // 2)
    write_epoch(SoftTargetStore.open(old.url), 2, ids=half)
    new = SoftTargetStore.create(tmp_path / "new", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(new, 1)
    write_epoch(new, 2, ids=half)
    reopened = SoftTargetStore.open(old.url)
    assert reopened.summary()["schema_version"] == 3
    assert [len(reopened.trajectory_arrays(epoch)) for epoch in (1, 2)] == [4, 1]
    for field, values in new.trajectory().items():
        np.testing.assert_array_equal(reopened.trajectory()[field], values)
    assert reopened.stored_digest(1, "trajectory") == reopened.summary()["epochs"][1]["digests"]["trajectory"]
    assert verify_path(old.url).ok


def test_trajectory_tier_records_every_epoch(store, labels):
    probs = {e: write_epoch(store, e) for e in (1, 2, 3)}
    traj = store.trajectory()
    assert traj["epochs"].tolist() == [1, 2, 3]
    rows = np.arange(N)
    for i, e in enumerate((1, 2, 3)):
        p16 = probs[e].astype(np.float16)
        np.testing.assert_allclose(traj["true_prob"][i], p16[rows, labels], atol=1e-3)
        np.testing.assert_allclose(traj["max_prob"][i], p16.max(1), atol=1e-3)
        np.testing.assert_array_equal(traj["argmax"][i], p16.argmax(1))


def test_retention_prunes_teachers_but_keeps_trajectories(tmp_path, labels):
    store = SoftTargetStore.create(tmp_path / "s", labels, K, keep_epochs=2, chunk_rows=64)
    for e in (1, 2, 3, 4):
        write_epoch(store, e)
    assert store.sealed_epochs == [1, 2, 3, 4] and store.teacher_epochs == [3, 4]
    assert sorted(os.listdir(tmp_path / "s" / "teacher")) == ["epoch_0003", "epoch_0004", "zarr.json"]
    assert store.trajectory()["true_prob"].shape == (4, N)
    with pytest.raises(EpochNotSealedError, match="pruned"):
        store.read_epoch(2)


def test_full_chunks_are_written_in_the_background_and_a_last_one_by_close(store):
    """A writer starts its background thread once rows come after a full chunk: an epoch
    that fits in one chunk, to its last row, has no thread to start and join; a full chunk
    followed by more is written before close."""
    def writer_threads():
        return [t for t in threading.enumerate() if t.name.startswith("pskd-writer-")]

    writer = store.writer(1)
    first_chunk = chunk_file(Path(store.url) / "staging" / "epoch_0001" / "writer_0000" / "encoded")
    writer.write(torch.arange(CHUNK_ROWS - 1), torch.randn(CHUNK_ROWS - 1, K))
    writer.write(torch.tensor([CHUNK_ROWS - 1]), torch.randn(1, K))  # the chunk is full
    assert writer_threads() == [] and not first_chunk.exists()
    writer.write(torch.arange(CHUNK_ROWS, N), torch.randn(N - CHUNK_ROWS, K))
    assert len(writer_threads()) == 1
    deadline = time.monotonic() + 30
    while not first_chunk.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first_chunk.exists()  # before close
    writer.close()
    assert writer_threads() == []
    store.seal(1)
    assert store.epoch_info(1)["ids_written"] == N


def test_duplicate_ids_keep_the_last_write(store):
    first = np.full((N, K), 1.0 / K, dtype=np.float32)
    second = epoch_probs(9, N, K)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.from_numpy(first))
        writer.write(torch.arange(10), torch.from_numpy(second[:10]))  # padded ids, as DistributedSampler does
    info = store.seal(1)
    assert info["duplicates"] == 10 and info["ids_written"] == N
    back = store.read_epoch(1)
    np.testing.assert_allclose(back[:10], second[:10], atol=1e-3)
    np.testing.assert_allclose(back[10:], first[10:], atol=1e-3)


def test_unwritten_ids_carry_forward_or_get_one_hot(store, labels):
    # epoch 1 skips ids 0-9 (never predicted: one-hot); epoch 2 skips 5-14 (drop_last)
    p1 = write_epoch(store, 1, ids=np.arange(10, N))
    p2 = write_epoch(store, 2, ids=np.concatenate([np.arange(5), np.arange(15, N)]))
    assert store.epoch_info(1)["carried_forward"] == 10 and store.epoch_info(2)["carried_forward"] == 10
    one_hot = np.eye(K, dtype=np.float32)[labels]
    e1, e2 = store.read_epoch(1), store.read_epoch(2)
    np.testing.assert_array_equal(e1[:10], one_hot[:10])
    np.testing.assert_allclose(e2[5:10], one_hot[5:10])          # never predicted yet
    np.testing.assert_allclose(e2[10:15], p1[10:15], atol=1e-3)  # carried from epoch 1
    np.testing.assert_allclose(e2[:5], p2[:5], atol=1e-3)
    np.testing.assert_allclose(e2[15:], p2[15:], atol=1e-3)


def test_several_writer_processes_fill_one_epoch(store, labels):
    """Two real processes write interleaved (disjoint) ids of one epoch at the same time."""
    writers = [forked(_write_shard, store.url, rank) for rank in (0, 1)]
    assert [exit_code(writer) for writer in writers] == [0, 0]
    info = store.seal(1)
    assert info["ids_written"] == N and info["duplicates"] == 0 and info["carried_forward"] == 0
    np.testing.assert_allclose(store.read_epoch(1), epoch_probs(1, N, K), atol=1e-3)


def _write_shard(url: str, rank: int) -> None:
    """Rank ``rank`` of two writes its half of epoch 1, a few rows a call, from its own store object."""
    store = SoftTargetStore.open(url)
    probs = epoch_probs(1, store.num_samples, store.num_classes)
    ids = np.random.default_rng(5).permutation(store.num_samples)[rank::2]
    with store.writer(1, rank=rank, from_logits=False) as writer:
        for s in range(0, len(ids), 8):
            writer.write(torch.from_numpy(ids[s:s + 8]), torch.from_numpy(probs[ids[s:s + 8]]))


# -- the streaming seal: coverage rules, exactly, over many chunks, buckets and parts ---------


def _writes(epoch: int, rank: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float16 rows (what a float16 store keeps) that differ per epoch, rank and write."""
    rng = np.random.default_rng(100 * epoch + rank)
    probs = rng.dirichlet(np.ones(K), size=len(ids)).astype(np.float32)
    return ids, torch.from_numpy(probs).to(torch.float16).numpy()


def _write_ranks(store, epoch: int, shards: dict[int, np.ndarray]) -> None:
    """Every rank's writer open at once; batches go round-robin from the highest rank down,
    so a lower rank often writes an id after a higher one did: the rank decides, not time."""
    writers = {rank: store.writer(epoch, rank=rank, from_logits=False) for rank in shards}
    batches = {rank: [(ids[s:s + 5], probs[s:s + 5]) for s in range(0, len(ids), 5)]
               for rank, (ids, probs) in shards.items()}
    for step in range(max(len(b) for b in batches.values())):
        for rank in sorted(batches, reverse=True):
            if step < len(batches[rank]):
                ids, probs = batches[rank][step]
                writers[rank].write(torch.from_numpy(ids), torch.from_numpy(probs))
    for writer in writers.values():
        writer.close()


def _by_hand(previous: np.ndarray, shards: dict[int, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """README "Coverage": ranks in order, rows in write order, each write replacing the last."""
    table = previous.copy()
    for rank in sorted(shards):
        for i, row in zip(*shards[rank]):
            table[i] = row
    return table


@pytest.mark.parametrize("small_buckets", [False, True], ids=["one-bucket", "many-buckets"])
def test_streaming_seal_follows_the_coverage_rules(tmp_path, labels, monkeypatch, small_buckets):
    from pskd_store import merge, store_keys

    if small_buckets:  # 2 chunks a bucket, 1 chunk a slice: ~19 buckets, every part in many slices
        monkeypatch.setattr(merge, "BUCKET_BYTES", 2 * 8 * K * 2)
        monkeypatch.setattr(store_keys, "SLICE_BYTES", 8 * K * 2)
    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=8)
    rng = np.random.default_rng(7)
    table = np.eye(K, dtype=np.float16)[labels]  # what an id never written holds: its one-hot label
    ids_everywhere = np.arange(N)
    for epoch in (1, 2, 3):
        order = rng.permutation(N)
        shards = {  # overlapping shards; each repeats some of its own ids; some ids in none
            0: np.concatenate([order[:120], order[:10]]),
            1: np.concatenate([order[100:200], order[150:160], order[5:15]]),
            2: np.concatenate([order[190:260], order[0:3]]),
        }
        if epoch == 3:  # ids written in epochs 1 and 2 but not 3 carry epoch 2's rows
            shards = {rank: ids[np.isin(ids, ids_everywhere[:40], invert=True)] for rank, ids in shards.items()}
        shards = {rank: _writes(epoch, rank, ids) for rank, ids in shards.items()}
        _write_ranks(store, epoch, shards)
        info = store.seal(epoch)

        table = _by_hand(table, shards)
        np.testing.assert_array_equal(store.read_epoch(epoch), table)
        rows = sum(len(ids) for ids, _ in shards.values())
        unique = len(np.unique(np.concatenate([ids for ids, _ in shards.values()])))
        assert (info["rows_written"], info["ids_written"], info["duplicates"], info["carried_forward"]) == (
            rows, unique, rows - unique, N - unique)
        trajectory = store.trajectory([epoch])
        written = np.isin(np.arange(N), np.concatenate([ids for ids, _ in shards.values()]))
        np.testing.assert_array_equal(trajectory["written"][0], written)
        np.testing.assert_array_equal(trajectory["argmax"][0], np.where(written, table.argmax(1), -1))
        np.testing.assert_array_equal(trajectory["max_prob"][0], np.where(written, table.max(1), np.nan))
        np.testing.assert_array_equal(trajectory["true_prob"][0],
                                      np.where(written, table[np.arange(N), labels], np.nan))
    assert not (Path(store.url) / "staging" / "epoch_0003").exists()


def test_argmax_takes_the_first_maximum_and_sees_signs():
    from pskd_store.row_encoding import _argmax

    rows = np.array([[0.1, 0.7, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0], [-0.5, -0.25, -0.0, -1.0]], np.float16)
    assert _argmax(rows).tolist() == rows.astype(np.float32).argmax(1).tolist() == [1, 0, 2]


@pytest.mark.parametrize("buckets", [1, 3])
def test_only_an_epoch_of_several_buckets_uses_a_scratch_file(tmp_path, labels, monkeypatch, buckets):
    """An epoch that fits one bucket is merged in memory; a larger one through the scratch
    file (the same sealed rows either way: test_streaming_seal_follows_the_coverage_rules)."""
    from pskd_store import merge

    monkeypatch.setattr(merge, "BUCKET_BYTES", -(-N // buckets) * K * 2)
    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=-(-N // buckets))
    opened = []
    scratch_file = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **kw: opened.append(kw) or scratch_file(**kw))
    write_epoch(store, 1)
    assert len(opened) == (buckets > 1)


def test_seal_leaves_no_scratch_file(store, tmp_path, monkeypatch):
    from pskd_store import merge

    monkeypatch.setattr(merge, "BUCKET_BYTES", CHUNK_ROWS * K * 2)  # a bucket a chunk: a scratch file made
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    write_epoch(store, 1, seal=False)
    store.seal(1, scratch_dir=scratch)
    assert list(scratch.iterdir()) == []


# -- one owner per staging part ------------------------------------------------------------------


def test_a_second_writer_of_a_part_is_refused_in_process(store):
    first = store.writer(1, from_logits=False)
    first.write(torch.arange(N), torch.full((N, K), 1.0 / K))
    with pytest.raises(StoreError, match=rf"rank 0 of epoch 1 already has a writer: process {os.getpid()} "
                                         r"on .* \(this process\) is writing it now. Give this writer another rank"):
        store.writer(1, from_logits=False)
    store.writer(1, rank=1, from_logits=False).close()  # another rank is free
    first.close()
    with pytest.raises(StoreError, match=r"rank 0 of epoch 1 already closed its staging part \(300 rows.*"
                                         r"store.discard_staging\(1, rank=0\)"):
        store.writer(1, from_logits=False)
    assert store.seal(1)["rows_written"] == N
    np.testing.assert_allclose(store.read_epoch(1), 1.0 / K, atol=1e-3)  # the first writer's rows


def test_a_closed_part_is_written_again_only_after_discard(store):
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.full((N, K), 1.0 / K))
    store.discard_staging(1, rank=0)
    p1 = write_epoch(store, 1, seal=False)
    store.seal(1)
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def test_an_abandoned_or_failed_writer_gives_its_part_up(store):
    with pytest.raises(RuntimeError, match="training diverged"), store.writer(1) as writer:
        writer.write(torch.arange(4), torch.randn(4, K))
        raise RuntimeError("training diverged")
    failed = store.writer(1)
    failed.write(torch.arange(4), torch.full((4, K), float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        failed.close()
    with pytest.raises(StoreError, match="never closed"):
        store.seal(1)  # the given-up rows are never sealed
    p1 = write_epoch(store, 1)  # and the same rank, in the same process, redoes the epoch
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def test_an_abandoned_writer_refuses_to_close(store):
    """A loop's ``except: writer.abandon()`` then ``finally: writer.close()`` must not seal
    the epoch short of the rows the abandon dropped, nor close a part a new writer took over."""
    logits = torch.randn(N, K)
    writer = store.writer(1)
    writer.write(torch.arange(N - 4), logits[:N - 4])
    writer.abandon()
    with pytest.raises(StoreError, match="this writer of epoch 1 was abandoned: the rows it was given are not kept"):
        writer.close()
    with pytest.raises(StoreError, match="never closed"):
        store.seal(1)
    again = store.writer(1)
    again.write(torch.arange(N), logits)
    again.close()
    with pytest.raises(StoreError, match="was abandoned"):
        writer.close()  # the stale writer, closed late
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), logits.softmax(1).to(torch.float16).numpy())
    part = store.staging(2).claim(0)
    part.create(N, K, store.chunk_rows, np.dtype(np.float16))
    part.release()
    with pytest.raises(StoreError, match="was given up by this writer; a new writer writes it again"):
        part.close()


def test_a_writer_dropped_unclosed_gives_its_part_up(store):
    """A loop whose write raised and that made a new writer without closing the old one:
    the dropped writer's claim goes with it, so the rank is written again; a writer whose
    background thread had started (more than a chunk written) stops that thread too."""
    threads = []

    def a_loop_that_fails(rows: int) -> None:
        writer = store.writer(1)
        try:
            for start in range(0, rows, 11):
                writer.write(torch.arange(start, min(start + 11, rows)), torch.randn(min(11, rows - start), K))
            while rows > CHUNK_ROWS and writer._free.empty():  # the thread wrote the chunk and waits for more
                time.sleep(0.001)
            threads.append(writer._thread)
            writer.write(torch.arange(4), torch.zeros(4, K, dtype=torch.int64))  # not logits
        except TypeError:
            return  # the writer is dropped, neither closed nor abandoned

    for rows in (0, CHUNK_ROWS + 1):
        a_loop_that_fails(rows)
    assert threads[0] is None  # no chunk handed over: no thread
    threads[1].join(30)  # the dropped writer's finalizer stops its thread
    assert not threads[1].is_alive()
    gc.disable()  # a failed writer is held by its error's traceback till a collection: its part is given up first
    try:
        failed = store.writer(1)
        failed.write(torch.arange(N, N + CHUNK_ROWS), torch.randn(CHUNK_ROWS, K))  # ids out of range: the thread's
        with pytest.raises(StoreError, match="ids out of range"):
            while True:
                failed.write(torch.arange(4), torch.randn(4, K))
        del failed
        p1 = write_epoch(store, 1)
    finally:
        gc.enable()
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def test_a_writer_whose_thread_cannot_start_is_abandoned_and_its_part_claimed_again(store, monkeypatch):
    def cannot_start(thread) -> None:
        raise RuntimeError("can't start new thread")

    writer = store.writer(1)
    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        writer.write(torch.arange(CHUNK_ROWS + 1), torch.randn(CHUNK_ROWS + 1, K))  # a chunk for the thread
    monkeypatch.undo()
    writer.abandon()
    p1 = write_epoch(store, 1)
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def _hold_part(url: str, held, release) -> None:
    """Hold rank 0's part of epoch 1 from ``held`` until ``release``, then close it."""
    writer = SoftTargetStore.open(url).writer(1, rank=0)
    held.set()
    release.wait(60)
    writer.close()


def test_a_part_held_by_another_process_is_refused(store):
    held, release = (FORK.Event() for _ in range(2))
    holder = forked(_hold_part, store.url, held, release)
    try:
        assert held.wait(60)
        with pytest.raises(StoreError, match=rf"rank 0 of epoch 1 already has a writer: process {holder.pid} on "):
            store.writer(1, rank=0)
        with pytest.raises(StoreError, match=rf"cannot discard rank 0 of epoch 1: process {holder.pid}"):
            store.discard_staging(1)
    finally:
        release.set()
    assert exit_code(holder) == 0
    with pytest.raises(StoreError, match="already closed its staging part"):
        store.writer(1, rank=0)


def test_processes_racing_for_one_part_leave_one_owner(store):
    go = Path(store.url).parent / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pskd_store.store import SoftTargetStore, StoreError
        staging = SoftTargetStore.open({store.url!r}).staging(1)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        try:
            part = staging.claim(0)
            print("owner", flush=True)
        except StoreError as err:
            print("refused", err, flush=True)
        sys.stdin.readline()  # the owner stays alive until every racer has answered
    """)
    racers = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    answers = [racer.stdout.readline() for racer in racers]
    for racer in racers:
        racer.communicate("\n", timeout=60)
    assert sorted(a.split()[0] for a in answers) == ["owner", "refused", "refused", "refused"], answers


def test_an_owner_on_another_machine_is_refused_until_discarded(store, monkeypatch):
    from pskd_store import staging

    real_machine = staging._machine
    monkeypatch.setattr(staging, "_machine", lambda: "other-host|boot|pid:[1]")
    store.staging(1).claim(0).create(N, K, store.chunk_rows, store.dtype)  # as a process elsewhere would
    monkeypatch.setattr(staging, "_machine", real_machine)
    with pytest.raises(StoreError, match=r"held by process \d+ on .*, which cannot be checked from .*"
                                         r"store.discard_staging\(1, rank=0\)"):
        store.writer(1)
    store.discard_staging(1, rank=0)
    p1 = write_epoch(store, 1)
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def test_a_reused_pid_is_not_taken_for_the_owner(store, monkeypatch):
    from pskd_store import staging

    real_start = staging._process_start
    monkeypatch.setattr(staging, "_process_start", lambda pid: "1")  # this pid, another process's start
    store.staging(1).claim(0).create(N, K, store.chunk_rows, store.dtype)
    monkeypatch.setattr(staging, "_process_start", real_start)
    p1 = write_epoch(store, 1)  # the claim names a process that no longer runs: taken over
    np.testing.assert_allclose(store.read_epoch(1), p1, atol=1e-3)


def test_rollback_discards_the_staged_rows_of_later_epochs(store):
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)  # closed, never sealed: a crash during the seal
    with pytest.raises(StoreError, match="already closed"):
        store.writer(2)
    assert store.rollback(1) == []
    p2 = write_epoch(store, 2)
    np.testing.assert_allclose(store.read_epoch(2), p2, atol=1e-3)


# -- the writer's device copies ------------------------------------------------------------------


def test_each_chunk_waits_for_the_device_copies_into_it(store, monkeypatch):
    """Logits on an accelerator: every copy into a chunk buffer records an event on the
    current stream of the logits' device, and the background thread waits on exactly the
    events of that chunk's copies before it reads the chunk (and close, the last one's). Driven on the CPU: the tensor
    reports device cuda:1, events and streams are stand-ins that log what happens, and
    pinning (which needs a driver) is skipped; the writer's code runs as it is."""
    log = []

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device)

    class Event:
        made = 0

        def __init__(self, blocking=False):
            assert blocking, "the background thread would spin a core while it waits"
            Event.made += 1
            self.number = Event.made

        def record(self, stream):
            log.append(("record", self.number, stream.device))

        def synchronize(self):
            log.append(("wait", self.number))

    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    real_numpy, real_zeros = torch.Tensor.numpy, torch.zeros

    def numpy(tensor, *args, **kwargs):
        log.append(("read",))  # the writer's, on its background thread (the last chunk: on the closing one)
        return real_numpy(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: log.append(
        ("set_device", torch.device(device), threading.current_thread().name)))
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: real_zeros(*a, **k))
    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    real_append = PartWriter.append
    monkeypatch.setattr(PartWriter, "append", lambda part, *a: (log.append(("append",)), real_append(part, *a)))

    logits = torch.randn(100, K)
    writer = store.writer(1)  # chunks of 32 rows: batches 0-20, 20-50, 50-64, 64-100 straddle them
    for lo, hi in ((0, 20), (20, 50), (50, 64), (64, 100)):
        writer.write(torch.arange(lo, hi), logits[lo:hi].as_subclass(OnDevice))
    writer.close()

    records = [entry for entry in log if entry[0] == "record"]
    assert records == [("record", n, torch.device("cuda", 1)) for n in range(1, 7)]  # one per copy
    # the background thread makes the logits' device its current one before it waits on any
    # event (CUDA's current device is a thread's: from device 0, a wait makes a context there)
    set_device = ("set_device", torch.device("cuda", 1), "pskd-writer-1")
    assert [entry for entry in log if entry[0] == "set_device"] == [set_device]
    assert log.index(set_device) < log.index(("wait", 1))
    log.remove(set_device)
    chunks, entries = [], []  # what the background thread did for each chunk, up to its append
    for entry in log:
        if entry[0] == "append":
            chunks.append(entries)
            entries = []
        elif entry[0] != "record":
            entries.append(entry)
    # copies into chunk 0: batches 1 and 2; chunk 1: batches 2 and 3; chunks 2 and 3: batch 4
    expected = [[1, 2], [3, 4], [5], [6]]
    assert [[entry[1] for entry in chunk if entry[0] == "wait"] for chunk in chunks] == expected
    for chunk, waits in zip(chunks, expected):  # the waits, then the reads of the rows
        assert chunk == [("wait", n) for n in waits] + [("read",)] * (len(chunk) - len(waits))
        assert len(chunk) > len(waits)
    assert all(log.index(records[n - 1]) < log.index(("wait", n)) for n in range(1, 7))
    store.seal(1)
    np.testing.assert_allclose(store.read_epoch(1)[:100], logits.softmax(1).numpy(), atol=1e-3)


def _write_until_killed(url: str, writing) -> None:
    """Write epoch 3, 10 rows a millisecond, forever; ``writing`` once 41 writes are in."""
    store = SoftTargetStore.open(url)
    writer = store.writer(3)
    for step in range(10**6):
        ids = torch.arange(step * 10, step * 10 + 10) % store.num_samples
        writer.write(ids, torch.randn(10, store.num_classes))
        if step == 40:
            writing.set()
        time.sleep(0.001)


def test_crash_before_seal_leaves_last_sealed_epoch_intact(store, labels):
    write_epoch(store, 1)
    write_epoch(store, 2)
    before = store.read_epoch(2).copy()
    writing = FORK.Event()
    writer = forked(_write_until_killed, store.url, writing)
    assert writing.wait(60)
    time.sleep(0.2)
    writer.kill()
    assert exit_code(writer, timeout=30) == -signal.SIGKILL
    assert (Path(store.url) / "staging" / "epoch_0003").exists()  # it did write rows

    reopened = SoftTargetStore.open(store.url, labels=labels)
    assert reopened.sealed_epochs == [1, 2]
    np.testing.assert_array_equal(reopened.read_epoch(2), before)
    with pytest.raises(EpochNotSealedError, match="epoch 3 was never sealed"):
        reopened.read_epoch(3)
    with pytest.raises(StoreError, match="never closed"):
        reopened.seal(3)  # the crashed writer's rows are not sealed by accident
    p3 = write_epoch(reopened, 3)  # the dead writer's part is taken over: the rerun replaces its rows
    np.testing.assert_allclose(reopened.read_epoch(3), p3, atol=1e-3)
    assert reopened.epoch_info(3)["rows_written"] == N


def test_rollback_unseals_later_epochs(store):
    for e in (1, 2, 3):
        write_epoch(store, e)
    assert store.rollback(2) == [3]
    assert store.sealed_epochs == [1, 2]
    p3 = write_epoch(store, 3)
    np.testing.assert_allclose(store.read_epoch(3), p3, atol=1e-3)
    assert store.trajectory()["epochs"].tolist() == [1, 2, 3]


def test_fsspec_url_store(labels):
    url = f"memory://pskd-test-{os.getpid()}-{time.time_ns()}"
    store = SoftTargetStore.create(url, labels, K, chunk_rows=64)
    probs = write_epoch(store, 1)
    np.testing.assert_allclose(SoftTargetStore.open(url, labels=labels).read_epoch(1), probs, atol=1e-3)
    writer = store.writer(2)
    with pytest.raises(StoreError, match="rank 0 of epoch 2 already has a writer"):
        SoftTargetStore.open(url).writer(2)
    writer.abandon()
    write_epoch(store, 2)


# -- a large epoch in bounded memory ---------------------------------------------------------------

_MEASURE = """
import json, sys
from pathlib import Path
from pskd_store import merge, store_keys
from pskd_store.store import SoftTargetStore
merge.BUCKET_BYTES, store_keys.SLICE_BYTES = 8 << 20, 4 << 20
step, url, epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
if step == "prepare":  # torch comes with the service: imported before the baseline
    from pskd_store import service
store = SoftTargetStore.open(url)
def status(field):
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from here: the baseline
baseline = status("VmRSS")
if step == "seal":
    store.seal(epoch)
else:
    service.PredictionService(store).prepare(epoch)
print(json.dumps(status("VmHWM") - baseline))
"""


def _peak_above_baseline(store, step: str, epoch: int) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE, step, store.url, str(epoch)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through /proc")
@pytest.mark.slow
def test_seal_and_prepare_of_a_large_epoch_stay_in_bounded_memory(tmp_path):
    """A 375 MiB epoch (196,608 x 1000 float16), sealed twice (the second carries a quarter of
    its rows forward) and decoded, each in a fresh process: the peak RSS above the process's
    baseline is set by the merge's buckets (scaled down here to 8 MiB, as for a ~40 GB epoch
    at the default 64 MiB), far below the dense epoch that the seal used to hold twice."""
    n, k = 196_608, 1000
    dense = n * k * 2
    store = SoftTargetStore.create(tmp_path / "big", np.random.default_rng(0).integers(0, k, n), k)
    pool = torch.from_numpy(np.random.default_rng(1).dirichlet(np.full(k, 0.05), 4096)).half()
    written = {}
    for epoch, count in ((1, n), (2, 3 * n // 4)):
        ids = torch.from_numpy(np.random.default_rng(epoch).permutation(n)[:count])
        rows = (ids * 7 + epoch) % len(pool)  # the row of an id depends on the id and the epoch
        with store.writer(epoch, from_logits=False) as writer:
            for lo in range(0, count, 1024):
                writer.write(ids[lo:lo + 1024], pool[rows[lo:lo + 1024]])
        written[epoch] = np.zeros(n, bool)
        written[epoch][ids.numpy()] = True
        assert _peak_above_baseline(store, "seal", epoch) < dense / 3
    assert _peak_above_baseline(store, "prepare", 2) < dense / 6
    served = np.load(next((tmp_path / "big.mmap").glob("epoch_0002-*.npy")), mmap_mode="r")
    sample = np.sort(np.random.default_rng(3).choice(n, 2000, replace=False))
    epoch_of = np.where(written[2][sample], 2, 1)  # an id missing in epoch 2 carries epoch 1's row
    np.testing.assert_array_equal(served[sample], pool[(sample * 7 + epoch_of) % len(pool)].numpy())


# -- bad input: a clear error naming the problem, and nothing sealed is lost -------------------


def test_wrong_number_of_classes(store):
    writer = store.writer(1)
    with pytest.raises(ValueError, match=r"shape \(batch, K=7\)"):
        writer.write(torch.arange(4), torch.randn(4, K + 1))


def test_ids_of_wrong_dtype_or_shape(store):
    writer = store.writer(1)
    with pytest.raises(TypeError, match="ids must be integer dataset indices"):
        writer.write(torch.arange(4).float(), torch.randn(4, K))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        writer.write(torch.arange(3), torch.randn(4, K))


@pytest.mark.parametrize("bad", [[0, 1, N], [-1, 0, 1]])
def test_ids_out_of_range(store, bad):
    write_epoch(store, 1)
    writer = store.writer(2)
    writer.write(torch.tensor(bad), torch.randn(3, K))
    with pytest.raises(ValueError, match=r"ids out of range: \[-?\d+\] not in \[0, N=300\)"):
        writer.close()
    assert store.sealed_epochs == [1] and store.read_epoch(1).shape == (N, K)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions(store, bad):
    logits = torch.randn(4, K)
    logits[1, 2] = bad
    writer = store.writer(1)
    writer.write(torch.arange(4), logits)
    with pytest.raises(ValueError, match="NaN or inf"):
        writer.close()
    with pytest.raises(ValueError, match="NaN or inf"):
        writer.write(torch.arange(4), torch.randn(4, K))  # later calls keep reporting it
    assert store.sealed_epochs == []


def test_writing_a_sealed_epoch_is_refused(store):
    write_epoch(store, 1)
    before = store.read_epoch(1).copy()
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        store.writer(1)
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), before)


def test_reading_an_unsealed_epoch_is_refused(store):
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    with pytest.raises(EpochNotSealedError, match=r"epoch 2 was never sealed .*sealed epochs: \[1\]"):
        store.read_epoch(2)
    with pytest.raises(EpochNotSealedError, match="epoch 5 was never sealed"):
        store.trajectory([5])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda labels: labels[:-1], "the store holds N=300 samples, the data set has 299"),
        (lambda labels: (labels + 1) % K, "labels differ"),
    ],
)
def test_store_of_another_data_set_is_refused(store, labels, change, message):
    with pytest.raises(StoreError, match=message):
        SoftTargetStore.open(store.url, labels=change(labels.copy()))


def test_store_with_other_number_of_classes_is_refused(store, labels):
    with pytest.raises(StoreError, match="K=7 classes, the data set has 8"):
        SoftTargetStore.open(store.url, labels=labels, num_classes=K + 1)


def test_read_only_store_refuses_writes(store):
    write_epoch(store, 1)
    ro = SoftTargetStore.open(store.url, read_only=True)
    assert ro.read_epoch(1).shape == (N, K)
    with pytest.raises(StoreError, match="opened read-only"):
        ro.writer(2)
    with pytest.raises(StoreError, match="opened read-only"):
        ro.seal(2)


def test_a_zarr_group_at_a_url_is_named_no_store_not_a_part_of_a_local_one(tmp_path, monkeypatch):
    import zarr

    zarr.open_group("memory://bucket/group", mode="w")
    write_epoch(SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K), 1)
    monkeypatch.chdir(tmp_path / "store" / "teacher")  # a local store around the working directory
    with pytest.raises(StoreError, match="memory://bucket/group is a Zarr group but not a pskd-store"):
        SoftTargetStore.open("memory://bucket/group")


@pytest.mark.parametrize("url", ["s3://bucket", "s3://bucket/", "gs://bucket"])
def test_overwriting_a_store_at_a_buckets_root_is_refused(url):
    """zarr's overwrite deletes the store's folder: at a bucket's root, s3fs deletes the bucket."""
    with pytest.raises(StoreError, match=r"is the root of a bucket: overwriting a store there would delete the "
                                         r"bucket .* keep the store under a prefix, e.g. .*bucket/run/store"):
        SoftTargetStore.create(url, make_labels(N, K), K, overwrite=True)


def test_a_store_is_not_made_at_an_object_stores_key_that_is_an_object():
    import fsspec

    fsspec.filesystem("memory").pipe("/bucket/an-object", b"data")
    with pytest.raises(StoreError, match="memory://bucket/an-object is an object, not a prefix"):
        SoftTargetStore.create("memory://bucket/an-object", make_labels(N, K), K)


def test_a_store_at_the_top_of_a_file_system_without_buckets_is_overwritten():
    for _ in range(2):
        SoftTargetStore.create("memory://top-store", make_labels(N, K), K, overwrite=True)
    assert SoftTargetStore.open("memory://top-store").sealed_epochs == []


def test_overwrite_deletes_a_store_and_nothing_else(tmp_path):
    """overwrite=True given a run directory or a data folder instead of the store in it
    refuses, naming what is there, and deletes nothing; a store, a half-made one (its
    creation killed before its attributes) and a publication's leftover are overwritten."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train.csv").write_text("id,label\n")
    for overwrite in (True, False):  # without: not "a store already exists" (and overwrite=True named)
        with pytest.raises(StoreError, match=r"run holds checkpoints, train.csv, which is no part of a pskd-store: "
                                             r"give the store a path of its own, new or empty .* overwrite=True\) "
                                             r"deletes only a store, not these"):
            SoftTargetStore.create(run, make_labels(N, K), K, overwrite=overwrite)
        with pytest.raises(StoreError, match="which is no part of a pskd-store"):
            SoftTargetStore.open_or_create(run, make_labels(N, K), K)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "train.csv"]
    store = SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K)
    write_epoch(store, 1)
    store.claim_run("a-run")
    (tmp_path / "store" / "zarr.json.0123456789abcdef.partial").write_text("{}")
    (tmp_path / "store" / ".DS_Store").write_bytes(b"a copy on a Mac")
    assert SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K, overwrite=True).sealed_epochs == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / ".gitkeep").write_text("")  # hidden files alone: a store is made beside them
    assert SoftTargetStore.open_or_create(tmp_path / "kept", make_labels(N, K), K).sealed_epochs == []
    half_made = zarr.open_group(tmp_path / "half", mode="w")
    half_made.create_array("labels", data=make_labels(N, K))
    assert SoftTargetStore.create(tmp_path / "half", make_labels(N, K), K, overwrite=True).sealed_epochs == []


def test_numpy_integers_make_a_store_and_refused_options_leave_nothing_behind(tmp_path):
    labels = make_labels(N, K)
    for options in ({}, {"keep_epochs": np.int64(3), "chunk_rows": np.int64(16)}, {"topk": np.int64(2)}):
        store = SoftTargetStore.create(tmp_path / str(len(options)) / "store", labels, labels.max() + 1, **options)
        write_epoch(store, 1)
        attributes = json.loads((tmp_path / str(len(options)) / "store" / "zarr.json").read_text())
        assert attributes["attributes"]["pskd_store"]["num_classes"] == K
    for blosc in ({"cname": "nope"}, {"clevel": 99}, {"cname": "snappy"}):  # zarr takes the last two, then fails
        with pytest.raises(StoreError, match="bad Blosc options"):
            SoftTargetStore.create(tmp_path / "refused", labels, K, blosc=blosc)
    SoftTargetStore.create(tmp_path / "refused", labels, K)  # nothing was made there


def test_open_or_create_refuses_a_store_that_keeps_rows_otherwise(tmp_path):
    """An existing store is not silently used in another dtype, top-k or retention than asked."""
    labels, url = make_labels(N, K), tmp_path / "store"
    SoftTargetStore.create(url, labels, K, topk=2, chunk_rows=CHUNK_ROWS)
    same = SoftTargetStore.open_or_create(url, labels, K, dtype="float16", topk=2, keep_epochs=2, chunk_rows=None)
    assert same.topk == 2 and same.chunk_rows == CHUNK_ROWS
    with pytest.raises(StoreError, match=r"keeps its rows otherwise than asked: topk=None \(it has 2\); ask for"):
        SoftTargetStore.open_or_create(url, labels, K, topk=None)
    with pytest.raises(StoreError, match=r"dtype='float32' \(it has 'float16'\), keep_epochs=3 \(it has 2\), "
                                         r"chunk_rows=8 \(it has 32\)"):
        SoftTargetStore.open_or_create(url, labels, K, dtype="float32", topk=2, keep_epochs=3, chunk_rows=8)


def test_missing_store_path(tmp_path):
    with pytest.raises(StoreError, match=r"no pskd-store at .*missing: check the path \(pskd-store train makes one"):
        SoftTargetStore.open(tmp_path / "missing")


def test_create_over_existing_store_is_refused(store, labels):
    write_epoch(store, 1)
    with pytest.raises(StoreError, match="already exists"):
        SoftTargetStore.create(store.url, labels, K)
    assert SoftTargetStore.open(store.url).sealed_epochs == [1]


def test_bad_labels_at_create(tmp_path):
    with pytest.raises(StoreError, match=r"labels must lie in \[0, num_classes=3\)"):
        SoftTargetStore.create(tmp_path / "s", np.array([0, 1, 5]), 3)


def test_an_epoch_is_abandoned_only_when_every_writer_of_it_is_gone(store, monkeypatch):
    """What a fresh run may take over (integrations/session.py): not a part being written here
    or on another machine, nor one closed and waiting for its seal."""
    from pskd_store import staging

    assert store.staging(1).abandoned()  # nothing staged
    live = store.writer(1)
    assert not store.staging(1).abandoned()
    live.abandon()
    assert store.staging(1).abandoned()
    with store.writer(1, from_logits=False) as closed:
        closed.write(torch.arange(N), torch.full((N, K), 1.0 / K))
    assert not store.staging(1).abandoned()
    store.discard_staging(1)
    assert exit_code(forked(_write_until_killed_at_once, store.url)) == -signal.SIGKILL
    assert store.staging(1).abandoned()  # its writer's process is gone
    store.discard_staging(1)
    real_machine = staging._machine
    monkeypatch.setattr(staging, "_machine", lambda: "other-host|boot|pid:[1]")
    store.staging(1).claim(0).create(N, K, store.chunk_rows, store.dtype)  # as a process elsewhere would
    monkeypatch.setattr(staging, "_machine", real_machine)
    assert not store.staging(1).abandoned()


def _write_until_killed_at_once(url: str) -> None:
    writer = SoftTargetStore.open(url).writer(1)
    writer.write(torch.arange(4), torch.randn(4, K))
    os.kill(os.getpid(), signal.SIGKILL)


# -- claims racing with other processes (the moments a real race would hit, made to happen) ----


def test_a_claim_taken_at_the_same_moment_by_another_writer_is_refused(store, monkeypatch):
    from dataclasses import asdict

    from pskd_store import staging

    other = staging.Owner(pid=1, host="elsewhere", machine="another machine", started=None, token="0" * 16)
    real = staging._store_set_if_absent

    def raced(zstore, key, data):  # the other writer's claim lands first
        real(zstore, key, json.dumps(asdict(other)).encode())
        real(zstore, key, data)

    monkeypatch.setattr(staging, "_store_set_if_absent", raced)
    with pytest.raises(StoreError, match="another writer .*process 1 on elsewhere.* claimed rank 0 of epoch 1 "
                                         "at the same moment"):
        store.writer(1)


def test_a_part_closed_by_its_owner_while_claiming_is_refused_and_the_claim_withdrawn(store, monkeypatch):
    from dataclasses import asdict

    from pskd_store import staging

    real = staging._store_set_if_absent

    def closed_meanwhile(zstore, key, data):
        real(zstore, key, data)
        if "/owners/" in key:  # the previous owner closes its part right after our check
            part = store._group.require_group("staging/epoch_0001/writer_0000")
            part.attrs.update(closed=True, rows=3, owner=asdict(staging.Owner.this_process()))

    monkeypatch.setattr(staging, "_store_set_if_absent", closed_meanwhile)
    with pytest.raises(StoreError, match="rank 0 of epoch 1 already closed its staging part"):
        store.writer(1)
    assert store.staging(1)._claims(0) == []  # our claim was withdrawn


def test_a_claim_made_from_a_listing_that_stalled_loses_to_the_writer_claiming_meanwhile(store, monkeypatch):
    from pskd_store import staging

    killed = ("import os, sys; from pskd_store.store import SoftTargetStore; "
              "SoftTargetStore.open(sys.argv[1]).writer(1); os._exit(0)")
    subprocess.run([sys.executable, "-c", killed, store.url], check=True)  # leaves claim 0, its owner gone
    real, writers = staging._store_set_if_absent, []

    def stalled(zstore, key, data):  # this writer listed claim 0 (gone) and stalls before making claim 1
        if not writers:
            writers.append(None)
            store.writer(1).abandon()  # meanwhile: another writer claims 1 and releases it...
            writers.append(store.writer(1))  # ...and a third, listing no claim, makes claim 0 and writes
        real(zstore, key, data)

    monkeypatch.setattr(staging, "_store_set_if_absent", stalled)
    with pytest.raises(StoreError, match=r"process \d+ on .* \(this process\) claimed rank 0 of epoch 1 while "
                                         r"this writer did \(claims 0 and 1\)"):
        store.writer(1)
    assert store.staging(1)._claims(0) == [0]  # the losing claim is withdrawn; the writer of claim 0 owns the part
    owner = writers[1]
    owner.write(np.arange(N), torch.randn(N, K))
    owner.close()
    store.seal(1)
    assert store.sealed_epochs == [1]


def _gloo_writer_counts(url: str, init: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        store = SoftTargetStore.open(url)
        store.writer(2).close()
        queue.put(store.staging(2)._part_attrs(0)["world_size"])
    finally:
        torch.distributed.destroy_process_group()


def test_an_epoch_missing_a_ranks_part_is_refused_at_the_seal(store):
    """Rank 0 of two wrote its shard; rank 1's process died before it made its writer. Sealed,
    rank 1's ids would carry their earlier predictions (or one-hot labels) forward."""
    with store.writer(1, rank=0, world_size=2) as writer:
        writer.write(np.arange(0, N, 2), torch.randn(N // 2, K))
    with pytest.raises(StoreError, match=r"epoch 1 was written by 2 writers, but ranks \[1\] staged nothing.*"
                                         r"discard_staging\(1\)"):
        store.seal(1)
    assert store.sealed_epochs == [] and store.staging(1)._ranks() == [0]  # nothing sealed, nothing lost
    with store.writer(1, rank=1, world_size=2) as writer:  # rank 1 runs the epoch again
        writer.write(np.arange(1, N, 2), torch.randn(N // 2, K))
    assert store.seal(1)["ids_written"] == N
    with store.writer(2, rank=0, world_size=2) as writer:  # rank 0 writes every rank's rows, gathered
        writer.write(np.arange(N), torch.randn(N, K))
    assert store.seal(2)["ids_written"] == N


def test_the_parts_of_a_try_of_the_epoch_on_more_processes_are_refused_at_the_seal(store, tmp_path):
    """A DDP run crashed in epoch 1 after rank 1 closed its part, and the epoch was run again
    on one process: rank 1's old rows would win every id over the new ones (higher rank)."""
    old = store.writer(1, rank=1, world_size=2)
    old.write(np.arange(N), torch.full((N, K), 5.0))
    old.close()
    store.writer(1, rank=0, world_size=2).abandon()  # rank 0 died in that try
    again = store.writer(1)  # one process, no torch.distributed: how many writers is not known
    again.write(np.arange(N), torch.zeros(N, K))
    again.close()
    with pytest.raises(StoreError, match=r"counted different numbers of writers \(rank 0 of an unknown number of, "
                                         r"rank 1 of 2\): some are left from an earlier try.*discard_staging\(1\)"):
        store.seal(1)
    assert store.sealed_epochs == [] and store.staging(1)._ranks() == [0, 1]  # nothing sealed, nothing lost
    store.discard_staging(1, rank=1)
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), np.full((N, K), 1 / K, dtype=np.float16))
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size=2\), got 2"):
        store.writer(2, rank=2, world_size=2)

    queue = FORK.SimpleQueue()  # a loop under torch.distributed: its world size by default
    child = FORK.Process(target=_gloo_writer_counts, args=(store.url, f"file://{tmp_path}/rendezvous", queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get() == 1


def test_a_group_made_by_another_process_at_the_same_moment_is_used(store, monkeypatch):
    import zarr

    real = zarr.Group.require_group

    def made_meanwhile(group, path, **kwargs):
        real(group, path, **kwargs)  # the other process wins the race to create it
        raise zarr.errors.ContainsGroupError(path)

    monkeypatch.setattr(zarr.Group, "require_group", made_meanwhile)
    write_epoch(store, 1)
    assert store.sealed_epochs == [1]


def test_owners_are_checked_with_signals_where_proc_is_missing(monkeypatch):
    from pskd_store import staging

    monkeypatch.setattr(staging, "_proc_stat", lambda pid: None)  # not Linux: no start times
    assert staging._running(os.getpid(), None)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not staging._running(child.pid, None)

    def not_permitted(pid, sig):
        raise PermissionError(pid)

    monkeypatch.setattr(os, "kill", not_permitted)  # another user's live process
    assert staging._running(1, None)


def test_a_store_never_written_rolls_back_to_nothing(tmp_path):
    store = SoftTargetStore.create(tmp_path / "store", make_labels(N, K), K)
    assert store.rollback(0) == []


def test_a_part_that_cannot_be_made_fails_the_writer_naming_the_store(store, monkeypatch):
    import errno

    def no_room(part, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartWriter, "create", no_room)
    with pytest.raises(StoreError, match="the prediction writer of epoch 1 failed: No space left on device"):
        with store.writer(1) as writer:
            writer.write(torch.arange(N), torch.randn(N, K))
    monkeypatch.undo()
    write_epoch(store, 1)  # the failed writer gave its part up
    assert store.sealed_epochs == [1]


def test_a_seal_whose_clean_up_fails_is_sealed_and_says_what_is_left(tmp_path, labels, monkeypatch):
    """Removing the staged rows and the expired teacher comes after the epoch is published:
    a disk error there leaves files behind, not an unsealed epoch, and the message says so
    (not "nothing of it was published", whose fix, sealing again, would be refused)."""
    import errno

    from pskd_store.staging import EpochStaging

    store = SoftTargetStore.create(tmp_path / "s", labels, K, keep_epochs=1, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1)

    def read_only(staging):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "s" / staging.path))

    monkeypatch.setattr(EpochStaging, "remove", read_only)
    with pytest.warns(RuntimeWarning, match=r"epoch 2 is sealed, but removing what it no longer needs failed: "
                                            r"Read-only file system .*staging/epoch_0002.* Training can go on") as said:
        second = write_epoch(store, 2)
    assert Path(said[0].filename).name == "store_helpers.py"  # the caller of seal() is named
    monkeypatch.undo()
    reopened = SoftTargetStore.open(tmp_path / "s")
    assert reopened.sealed_epochs == [1, 2] and reopened.teacher_epochs == [2]
    np.testing.assert_array_equal(reopened.read_epoch(2), second.astype(np.float16))
    assert (tmp_path / "s" / "staging" / "epoch_0002").is_dir()  # what the warning names, left behind
    write_epoch(reopened, 3)  # the run goes on
    assert reopened.sealed_epochs == [1, 2, 3]


def test_staging_chunks_written_directly_are_the_bytes_zarr_writes(store, tmp_path):
    """A part's whole chunks skip zarr (one writev of the bytes and their crc32c); a part
    appended at other offsets goes through zarr: both leave the same chunk files, which zarr
    reads back as the rows appended."""
    rows = epoch_probs(1, N, K).astype(np.float16)
    ids = np.arange(N, dtype=np.int64)
    direct, through_zarr = (store.staging(1).claim(rank) for rank in (0, 1))
    for part in (direct, through_zarr):
        part.create(N, K, store.chunk_rows, np.dtype(np.float16))
    for start in range(0, N, store.chunk_rows):  # whole chunks from their starts: the writer's way
        direct.append(ids[start:start + store.chunk_rows], rows[start:start + store.chunk_rows])
    for start, stop in ((0, 5), (5, 30), (30, 100), (100, N)):  # other offsets and spans: zarr's way
        through_zarr.append(ids[start:stop], rows[start:stop])
    for array in ("ids", "encoded"):
        written = [chunk_files(Path(store.url) / part._path / array) for part in (direct, through_zarr)]
        assert written[0] == written[1] and len(written[0]) == -(-N // store.chunk_rows)
    np.testing.assert_array_equal(direct._encoded[:N], rows)
    np.testing.assert_array_equal(direct._ids[:N], ids)


def _seal_and_die_once_published(url: str, epoch: int) -> None:
    store = SoftTargetStore.open(url)
    publish = store._publish

    def published_then_killed(meta: dict) -> None:
        publish(meta)
        os.kill(os.getpid(), signal.SIGKILL)  # before the seal removes the staged rows and prunes

    store._publish = published_then_killed
    store.seal(epoch)


def test_the_next_seal_removes_what_a_seal_killed_after_publishing_left(tmp_path, labels):
    """A seal killed between its publication and its clean-up leaves its epoch's staged rows
    and the teacher it was to prune; the next seal removes them."""
    store = SoftTargetStore.create(tmp_path / "store", labels, K, keep_epochs=1)
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    assert exit_code(forked(_seal_and_die_once_published, store.url, 2)) == -signal.SIGKILL
    store = SoftTargetStore.open(store.url)
    assert store.sealed_epochs == [1, 2] and store.teacher_epochs == [2]
    def on_disk(tier: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / "store" / tier).iterdir() if p.name != "zarr.json")

    assert on_disk("staging") == ["epoch_0002"] and on_disk("teacher") == ["epoch_0001", "epoch_0002"]
    write_epoch(store, 3)
    assert on_disk("teacher") == ["epoch_0003"] and on_disk("staging") == []


def test_a_file_a_kill_left_in_the_staging_area_raises_no_zarr_warning(store):
    """zarr warns about objects under a group that are no nodes; a `.partial` file a killed
    write left is expected here, and the seal says nothing about it."""
    write_epoch(store, 1, seal=False)
    staging = Path(store.url) / "staging"
    for folder in (staging, staging / "epoch_0001"):
        (folder / "zarr.json.3f2a.partial").write_bytes(b"{")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.seal(1)
        assert store.sealed_epochs == [1]


def test_a_store_object_sees_what_another_sealed_and_refuses_a_damaged_root(store):
    other = SoftTargetStore.open(store.url)  # another process's view, opened before the seal
    write_epoch(store, 1)
    assert other.sealed_epochs == []  # read when opened
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        other.writer(1)  # the writer re-reads the root metadata first
    assert other.sealed_epochs == [1] and other.epoch_info(1) == store.epoch_info(1)
    root = Path(store.url) / "zarr.json"
    document = json.loads(root.read_text())
    document["attributes"]["pskd_store"]["sealed"] = [1, 2]  # an edit that stays JSON
    root.write_text(json.dumps(document))
    with pytest.raises(StoreDamagedError, match="do not match their checksum"):
        other.refresh()
    root.write_text("{not json")
    with pytest.raises(StoreDamagedError, match=r"root metadata .*zarr.json.* is damaged"):
        other.refresh()
    root.write_text(json.dumps({**document, "attributes": {}}))  # a zarr group, no longer a store
    with pytest.raises(StoreDamagedError, match=r"zarr.json\) is damaged \(its 'pskd_store' attributes are gone\)"):
        other.refresh()


def test_a_seal_in_buckets_of_one_chunk_writes_each_chunk_in_its_place(store, monkeypatch):
    """Blocks of one chunk are written by ChunkFiles (merge._block_writer), the others by
    zarr: with one chunk a bucket, every chunk of the epoch, the last partial one too, goes
    the first way, and each lands at its own index."""
    from pskd_store import merge

    monkeypatch.setattr(merge, "BUCKET_BYTES", CHUNK_ROWS * K * 2)
    first = write_epoch(store, 1)
    ids = np.random.default_rng(5).permutation(N)[:200]  # the other 100 carry epoch 1's rows
    second = write_epoch(store, 2, ids=ids)
    expected = first.astype(np.float16)
    expected[ids] = second[ids].astype(np.float16)
    np.testing.assert_array_equal(store.read_epoch(2), expected)
    assert store.epoch_info(2)["carried_forward"] == 100


def test_a_part_killed_while_it_was_made_stops_the_seal(store):
    """A writer killed between making its part's directory and writing its document leaves a
    part with no document: the seal refuses the epoch as unclosed, not seals it without it."""
    write_epoch(store, 1, seal=False)
    (Path(store.url) / "staging" / "epoch_0001" / "writer_0001").mkdir()
    with pytest.raises(StoreError, match=r"writer 1 of epoch 1 was never closed .* the part of a writer that is "
                                         r"gone stays until store.discard_staging\(1, rank=1\) removes it"):
        store.seal(1)
    store.discard_staging(1, rank=1)
    store.seal(1)
    assert store.sealed_epochs == [1]


def test_a_second_seal_of_an_epoch_at_the_same_time_is_refused_before_it_writes(tmp_path, labels, monkeypatch):
    """Each rank of a hand-written loop sealing: the second seal's arrays would replace the
    teacher the first published. It is refused while the first holds the epoch, and once the
    first published, as sealed; the first's teacher is whole."""
    import pskd_store.store as store_module
    from pskd_store.verify import verify_path

    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    written = write_epoch(store, 1, seal=False)
    other = SoftTargetStore.open(tmp_path / "s")  # another process's
    create, refusals = store_module.create_array, []

    def the_other_seals_meanwhile(group, path, **options):
        if path.startswith("teacher/") and not refusals:
            with pytest.raises(StoreError, match="epoch 1 is being sealed by process .* at the same time: seal each "
                                                 "epoch in one process") as refused:
                other.seal(1)
            refusals.append(refused)
        return create(group, path, **options)

    monkeypatch.setattr(store_module, "create_array", the_other_seals_meanwhile)
    store.seal(1)
    monkeypatch.undo()
    assert refusals
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        other.seal(1)
    np.testing.assert_array_equal(SoftTargetStore.open(tmp_path / "s").read_epoch(1), written.astype(np.float16))
    assert verify_path(store.url).ok


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_a_rollback_after_a_seal_was_killed_discards_its_claim(tmp_path, labels, where):
    """A resume after a seal was killed rolls its epoch back, on this machine or another (a
    new container is another pid namespace): the dead seal's claim does not stop it."""
    import dataclasses

    from pskd_store.staging import Owner

    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    me = Owner.this_process()
    killed = (dataclasses.replace(me, pid=2 ** 22 + 1, started="1") if where == "here"
              else dataclasses.replace(me, machine="another machine", host="node7"))
    (tmp_path / "s" / "staging" / "epoch_0002" / "owners" / "seal.0").write_text(json.dumps(dataclasses.asdict(killed)))
    assert store.rollback(1) == [] and not (tmp_path / "s" / "staging" / "epoch_0002").exists()
    write_epoch(store, 2)
    assert store.sealed_epochs == [1, 2]


def test_the_seal_of_a_process_that_is_gone_is_taken_over_and_one_elsewhere_named(tmp_path, labels):
    import dataclasses

    from pskd_store.staging import Owner

    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1, seal=False)
    claims = tmp_path / "s" / "staging" / "epoch_0001" / "owners"
    me = Owner.this_process()
    elsewhere = dataclasses.replace(me, machine="another machine", host="node7")
    (claims / "seal.0").write_text(json.dumps(dataclasses.asdict(elsewhere)))
    with pytest.raises(StoreError, match=f"being sealed by process {me.pid} on node7 at the same time: .*; if that "
                                         f"process is gone, delete {tmp_path / 's'}/staging/epoch_0001/owners/seal.0"):
        store.seal(1)
    gone = dataclasses.replace(me, pid=2 ** 22 + 1, started="1")  # no such process
    (claims / "seal.0").write_text(json.dumps(dataclasses.asdict(gone)))  # a seal killed
    store.seal(1)
    assert store.sealed_epochs == [1] and not claims.exists()


def test_a_store_made_anew_under_an_open_one_is_refused_not_taken_for_it(tmp_path, labels):
    """Made again with overwrite=True while this process had it open: its labels, its
    teachers' cache and the data sets reading it are the old store's."""
    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1)
    SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS, overwrite=True)
    with pytest.raises(StoreError, match="was made anew \\(overwrite=True\\) since this process opened it"):
        store.refresh()
    with pytest.raises(StoreError, match="was made anew"):
        store.writer(2)


def test_a_seal_checks_again_once_it_holds_the_epoch_and_refuses_a_claim_it_lost(tmp_path, labels, monkeypatch):
    """Another process sealed the epoch between this seal's first look and its claim: refused
    as sealed. A claim another process made under the same number at the same moment: refused."""
    import dataclasses

    import pskd_store.staging as staging_module
    from pskd_store.staging import EpochStaging, Owner, _machine, _process_start

    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1, seal=False)
    other, sealing = SoftTargetStore.open(tmp_path / "s"), EpochStaging.sealing

    def sealed_first_by_the_other(staging):
        monkeypatch.setattr(EpochStaging, "sealing", sealing)
        other.seal(1)
        return sealing(staging)

    monkeypatch.setattr(EpochStaging, "sealing", sealed_first_by_the_other)
    with pytest.raises(StoreError, match="epoch 1 is already sealed"):
        store.seal(1)
    assert store.sealed_epochs == [1]

    def discarded_first_by_the_other(staging):
        monkeypatch.setattr(EpochStaging, "sealing", sealing)
        other.discard_staging(2)
        return sealing(staging)

    write_epoch(store, 2, seal=False)
    monkeypatch.setattr(EpochStaging, "sealing", discarded_first_by_the_other)
    with pytest.raises(StoreError, match="nothing was written for epoch 2"):
        store.seal(2, allow_empty=True)
    assert store.sealed_epochs == [1] and not (tmp_path / "s" / "teacher" / "epoch_0002").exists()
    write_epoch(store, 2, seal=False)
    parent = os.getppid()  # a process that runs, on this machine
    winner = dataclasses.replace(Owner.this_process(), pid=parent, machine=_machine(), started=_process_start(parent))
    put = staging_module._store_set_if_absent

    def beaten_to_it(zstore, key, data):
        put(zstore, key, json.dumps(dataclasses.asdict(winner)).encode())
        put(zstore, key, data)

    monkeypatch.setattr(staging_module, "_store_set_if_absent", beaten_to_it)
    with pytest.raises(StoreError, match="another process claimed the seal of epoch 2 at the same moment"):
        store.seal(2)
    monkeypatch.undo()
    claims = tmp_path / "s" / "staging" / "epoch_0002" / "owners"
    assert [path.name for path in claims.glob("seal.*")] == ["seal.0"]  # the winner's, left to it


def test_a_failed_seal_lets_its_claim_go_and_a_sealed_one_leaves_none(tmp_path, labels, monkeypatch):
    """The claim of a seal that failed is removed (or reads as gone), so the next seal goes on;
    rows are not discarded while a seal holds the epoch; a seal that published never tries
    to remove its claim again (the staging's removal took it, and an error then would report
    a sealed epoch as unpublished)."""
    import pskd_store.staging as staging_module
    import pskd_store.store as store_module

    store = SoftTargetStore.create(tmp_path / "s", labels, K, chunk_rows=CHUNK_ROWS)
    written = write_epoch(store, 1, seal=False)
    merge, discards = store_module.merge_epoch, []

    def failing_merge(*args, **kwargs):
        with pytest.raises(StoreError, match="cannot discard epoch 1's rows: the epoch is being sealed by process"):
            SoftTargetStore.open(tmp_path / "s").discard_staging(1)
        discards.append(True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "merge_epoch", failing_merge)
    with pytest.raises(StoreError, match="cannot seal epoch 1: No space left on device"):
        store.seal(1)
    assert discards and not list((tmp_path / "s" / "staging" / "epoch_0001" / "owners").glob("seal.*"))
    monkeypatch.setattr(store_module, "merge_epoch", merge)
    delete = staging_module.store_io.delete

    def unreachable_claims(zstore, key):
        if "/seal." in key:
            raise OSError(104, "Connection reset by peer")
        delete(zstore, key)

    monkeypatch.setattr(staging_module.store_io, "delete", unreachable_claims)
    store.seal(1)
    np.testing.assert_array_equal(store.read_epoch(1), written.astype(np.float16))
