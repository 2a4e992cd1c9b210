"""Damage on disk is an error naming what and which rows, never a value: checksums,
missing chunks, edited metadata, the memory-map cache, and `pskd-store verify`.

Every test damages a real store the way a disk or a person would (a flipped byte, a
deleted file, an edited zarr.json) and reads it back through the public API or the CLI.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import lengthen_run, pskd, pskd_in_process
from store_helpers import chunk_file, epoch_probs, write_epoch

from pskd_store.array_files import ARRAY_CONFIG, codecs_with_checksum
from pskd_store.errors import EpochNotSealedError, StoreDamagedError, StoreError
from pskd_store.integrity import CheckedArray, row_ranges
from pskd_store.service import PredictionService, cache_folder
from pskd_store.staging import EpochStaging
from pskd_store.store import SoftTargetStore
from pskd_store.store_keys import epoch_key
from pskd_store.verify import verify_path, verify_store

N, K, CHUNK_ROWS = 96, 7, 16


@pytest.fixture
def store(store) -> SoftTargetStore:
    """Three sealed epochs (teachers 2 and 3 kept), six chunks of 16 rows each."""
    for epoch in (1, 2, 3):
        write_epoch(store, epoch)
    return store


def _edit_root(store: SoftTargetStore, edit, checksum: bool = True) -> None:
    """Edit the store's attributes in its root zarr.json, rewriting their checksum too
    (an editor who knows the format) or not."""
    from pskd_store.store import _with_checksum

    root_path = Path(store.url) / "zarr.json"
    root = json.loads(root_path.read_text())
    edit(root["attributes"]["pskd_store"])
    if checksum:
        root["attributes"]["pskd_store"] = _with_checksum(root["attributes"]["pskd_store"])
    root_path.write_text(json.dumps(root))


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def chunk(store: SoftTargetStore, array: str, index: int = 0) -> Path:
    return chunk_file(Path(store.url) / array, index)


def reopen(store: SoftTargetStore) -> SoftTargetStore:
    return SoftTargetStore.open(store.url)


def test_chunks_equal_to_the_fill_value_are_written_too(tmp_path):
    """Labels all 0 and predictions all of class 0: chunks full of zeros must still be
    written, or they would read back as 'missing'."""
    store = SoftTargetStore.create(tmp_path / "zeros", np.zeros(N, dtype=np.int64), 2, chunk_rows=CHUNK_ROWS)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.tensor([[1.0, 0.0]]).repeat(N, 1))
    store.seal(1)
    reopened = reopen(store)
    assert reopened.labels.tolist() == [0] * N
    assert reopened.trajectory()["argmax"].tolist() == [[0] * N]
    assert verify_path(store.url).ok


def test_a_flipped_byte_in_a_teacher_chunk_names_epoch_rows_and_verify(store):
    flip_byte(chunk(store, "teacher/epoch_0003", 2))
    with pytest.raises(StoreDamagedError) as caught:
        reopen(store).read_epoch(3)
    message = str(caught.value)
    assert "the teacher of epoch 3" in message and "rows 32-47 do not match their checksum" in message
    assert f"pskd-store verify {store.url}" in message
    np.testing.assert_array_equal(reopen(store).teacher_array(3)[:32], epoch_probs(3, N, K)[:32].astype(np.float16))


def test_a_missing_teacher_chunk_is_an_error_not_zeros(store):
    chunk(store, "teacher/epoch_0003", 5).unlink()
    with pytest.raises(StoreDamagedError, match=r"rows 80-95 are missing"):
        reopen(store).read_epoch(3)
    with pytest.raises(StoreDamagedError, match=r"teacher of epoch 3 .* rows 80-95 are missing"):
        PredictionService(reopen(store)).prepare(3)


@pytest.mark.parametrize("where", ["local disk", "object store"])
def test_a_chunk_deleted_after_its_array_was_listed_is_an_error_not_zeros(tmp_path, labels, where):
    """Another process's prune, rollback or discard can delete a chunk between the listing
    that a read starts with and the read: zarr would read it as its fill value, zeros."""
    from pskd_store import store_io

    url = tmp_path / "store" if where == "local disk" else f"memory://{tmp_path.name}/store"
    store = SoftTargetStore.create(url, labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1)
    teacher = store.teacher_array(1)
    np.testing.assert_array_equal(teacher[:16], epoch_probs(1, N, K)[:16].astype(np.float16))  # listed
    store_io.delete(teacher.array.store, f"{teacher.array.path}/{teacher.array.metadata.encode_chunk_key((1, 0))}")
    with pytest.raises(StoreDamagedError, match=r"teacher of epoch 1 .* rows 16-31 are missing"):
        teacher[16:32]


def test_edited_or_deleted_array_metadata_is_refused(store):
    meta_path = Path(store.url) / "teacher/epoch_0003/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = meta["codecs"][:-1]  # the checksum codec removed: chunks would decode as garbage
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreDamagedError, match="metadata of teacher/epoch_0003 was changed: its codecs are "
                       "bytes -> blosc, expected bytes"):
        reopen(store).read_epoch(3)
    meta_path.unlink()
    with pytest.raises(StoreDamagedError, match="teacher of epoch 3 .* its array teacher/epoch_0003 cannot be opened"):
        reopen(store).read_epoch(3)


def test_the_digests_read_back_refuses_a_chunk_whose_bytes_changed(store):
    """The digest covers the chunks' keys and stored checksums, not their bytes: a byte
    flipped under an intact checksum is caught by the read-back's checksum check."""
    flip_byte(chunk(store, "teacher/epoch_0003", 2))
    with pytest.raises(StoreDamagedError, match="teacher of epoch 3 .* rows 32-47 do not match their checksum"):
        reopen(store).stored_digest(3, "teacher")


def test_damaged_labels_and_trajectory_are_refused(store):
    flip_byte(chunk(store, "trajectory/epoch_0002"))
    with pytest.raises(StoreDamagedError, match=r"the trajectory of epoch 2 .* rows 0-95"):
        reopen(store).trajectory()
    flip_byte(chunk(store, "labels"))
    with pytest.raises(StoreDamagedError, match="the labels array .* is damaged"):
        reopen(store).labels


def test_labels_rewritten_with_a_valid_checksum_fail_the_fingerprint(store, labels):
    array = zarr.open_array(Path(store.url) / "labels", mode="r+")
    array[0] = (labels[0] + 1) % K  # zarr writes a valid checksum: only the fingerprint can tell
    with pytest.raises(StoreDamagedError, match="no longer matches the store's fingerprint"):
        reopen(store).labels


def test_a_damaged_previous_epoch_stops_the_seal_that_carries_rows_forward(store):
    flip_byte(chunk(store, "teacher/epoch_0003", 1))
    reopened = reopen(store)
    write_epoch(reopened, 4, ids=np.arange(20, N), seal=False)  # rows 0-19 are carried from epoch 3
    with pytest.raises(StoreDamagedError, match="teacher of epoch 3 .* rows 16-31"):
        reopened.seal(4)
    assert reopen(store).sealed_epochs == [1, 2, 3]


def test_damaged_staged_rows_stop_the_seal(store):
    write_epoch(store, 4, seal=False)
    flip_byte(chunk(store, "staging/epoch_0004/writer_0000/encoded", 3))
    with pytest.raises(StoreDamagedError, match="staged rows of writer 0, epoch 4, .* rows 48-63"):
        reopen(store).seal(4)
    assert reopen(store).sealed_epochs == [1, 2, 3]


@pytest.mark.parametrize("move", ["swapped", "copied"])
def test_teacher_chunks_moved_after_the_seal_are_refused_where_training_reads_them(tmp_path, store, move):
    """Chunk files swapped, or one copied over another: each keeps a valid checksum, so
    every chunk passes its own check, and without the seal's digest of their keys and
    checksums samples 0-15 would get the rows of samples 16-31. ``prepare`` (what
    ``set_epoch`` runs) publishes no cache file, and ``read_epoch`` refuses too."""
    first, second = chunk(store, "teacher/epoch_0003", 0), chunk(store, "teacher/epoch_0003", 1)
    moved = second.read_bytes()
    if move == "swapped":
        second.write_bytes(first.read_bytes())
    first.write_bytes(moved)
    not_sealed = r"the teacher of epoch 3 .* its chunks are not the ones sealed"
    with pytest.raises(StoreDamagedError, match=not_sealed):
        PredictionService(reopen(store), cache_dir=tmp_path / "cache").prepare(3)
    assert list(cache_folder(store, tmp_path / "cache").iterdir()) == []  # nothing published, no temporary file
    with pytest.raises(StoreDamagedError, match=not_sealed):
        reopen(store).read_epoch(3)


def test_runs_sharing_a_cache_folder_keep_each_others_decoded_teachers(tmp_path, labels):
    """Two runs of one node given one --cache-dir: the second's prepare dropped every cached
    epoch its store does not keep, the first run's among them, and the first run's workers
    (a pickled service) found no file to map."""
    import pickle

    stores = [SoftTargetStore.create(tmp_path / name, labels, K, chunk_rows=CHUNK_ROWS) for name in ("a", "b")]
    probs = [write_epoch(store, 1) for store in stores]
    services = [PredictionService(store, cache_dir=tmp_path / "cache") for store in stores]
    tokens = [service.prepare(1) for service in services]  # b's after a's
    ids = np.arange(N)
    for service, token, expected in zip(services, tokens, probs):
        worker = pickle.loads(pickle.dumps(service))
        np.testing.assert_array_equal(worker.lookup(1, token, ids).numpy(), expected.astype(np.float16))
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == sorted(
        cache_folder(s, tmp_path / "cache").name for s in stores)
    shutil.copytree(tmp_path / "a", tmp_path / "fork")  # a run forked by copying its store: the same store id
    fork = SoftTargetStore.open(tmp_path / "fork")
    assert fork.store_id == stores[0].store_id
    assert cache_folder(fork, tmp_path / "cache") != cache_folder(stores[0], tmp_path / "cache")


def test_a_damaged_cache_file_is_decoded_again(store, caplog):
    service = PredictionService(store)
    token = service.prepare(3)
    service.lookup(3, token, np.arange(N))  # mapped in this process
    cached = service.path(3, token)
    flip_byte(cached, at=0.9)
    expected = epoch_probs(3, N, K).astype(np.float16).astype(np.float32)
    fresh = PredictionService(reopen(store))  # another process: nothing mapped yet
    with caplog.at_level(logging.WARNING, logger="pskd_store.service"):
        assert fresh.prepare(3) == token
    assert "does not match its checksum: decoding it again" in caplog.text
    np.testing.assert_array_equal(fresh.lookup(3, token, np.arange(N)).numpy(), expected)
    flip_byte(cached, at=0.9)
    assert service.prepare(3) == token  # decoded again: this process's map of the damaged file is dropped
    np.testing.assert_array_equal(service.lookup(3, token, np.arange(N)).numpy(), expected)
    cached.with_name(cached.name + ".crc32c").unlink()  # no checksum: not trusted either
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pskd_store.service"):
        PredictionService(reopen(store)).prepare(3)
    assert "decoding it again" in caplog.text and cached.with_name(cached.name + ".crc32c").exists()


def test_a_cache_file_that_rots_while_mapped_is_not_served_after_it_is_decoded_again(store, labels):
    """The cache file damaged in place after ``set_epoch`` checked it, before the first batch
    mapped it: that batch's targets come from the damage. The next ``set_epoch`` finds the
    file fails its checksum and decodes it again; this process must then serve the new
    file, neither its map of the old one nor the targets blended from that map."""
    from torch.utils.data import TensorDataset

    from pskd_store.dataset import SoftTargetDataset
    from pskd_store.loss import soft_target

    data = SoftTargetDataset(TensorDataset(torch.zeros(N, 1), torch.from_numpy(labels)), store, 0.8, 4)
    data.set_epoch(4)  # the teacher: epoch 3
    cached = data.service.path(3, store.epoch_info(3)["seal_token"])
    with open(cached, "r+b") as file:  # in place: the same file, which the next map reads
        file.seek(-N * K * 2, 2)
        file.write(bytes(N * K * 2))
    ids = list(range(N))
    assert data.__getitems__(ids).targets.max() <= 0.2 + 1e-6  # (1 - a_t)·onehot, and zeros for p_3
    data.set_epoch(4)
    past = torch.from_numpy(epoch_probs(3, N, K).astype(np.float16).astype(np.float32))
    assert torch.equal(data.__getitems__(ids).targets, soft_target(torch.from_numpy(labels), past, 0.8))


@pytest.mark.slow
def test_a_persistent_worker_maps_the_file_decoded_again_for_the_same_epoch(store, labels):
    """The same as above with a persistent DataLoader worker, which mapped the damaged file
    in the first pass: after ``set_epoch`` decoded it again (a new file in its place), the
    worker must map the new file, not keep serving its map of the damaged one."""
    from torch.utils.data import DataLoader, TensorDataset

    from pskd_store.dataset import SoftTargetDataset, collate_soft_targets
    from pskd_store.loss import soft_target

    data = SoftTargetDataset(TensorDataset(torch.zeros(N, 1), torch.from_numpy(labels)), store, 0.8, 4)
    loader = DataLoader(data, batch_size=N, num_workers=1, persistent_workers=True, collate_fn=collate_soft_targets,
                        multiprocessing_context="fork")
    data.set_epoch(4)  # the teacher: epoch 3
    cached = data.service.path(3, store.epoch_info(3)["seal_token"])
    with open(cached, "r+b") as file:  # in place: the same file, which the worker then maps
        file.seek(-N * K * 2, 2)
        file.write(bytes(N * K * 2))
    (_, targets, _, _), = loader
    assert targets.max() <= 0.2 + 1e-6  # (1 - a_t)·onehot, and zeros for p_3: the worker read the damage
    data.set_epoch(4)
    (_, targets, _, _), = loader
    past = torch.from_numpy(epoch_probs(3, N, K).astype(np.float16).astype(np.float32))
    assert torch.equal(targets, soft_target(torch.from_numpy(labels), past, 0.8))


def _prune_epoch_2(store: SoftTargetStore) -> None:
    write_epoch(store, 4)  # keeps the teachers of 3 and 4


def _roll_epoch_3_back(store: SoftTargetStore) -> None:
    store.rollback(2)


def _seal_epoch_3_again(store: SoftTargetStore) -> None:
    store.rollback(2)
    with store.writer(3, from_logits=False) as writer:  # the same epoch, sealed anew with other rows
        writer.write(torch.arange(N), torch.from_numpy(epoch_probs(9, N, K)))
    store.seal(3)


@pytest.mark.parametrize("change, epoch, reads", [
    (_prune_epoch_2, 2, ["rows", "whole", "read_epoch"]),  # prepare() reads the store anew: "pruned"
    (_roll_epoch_3_back, 3, ["rows", "whole", "read_epoch", "trajectory"]),
    # rows read a chunk at a time may be the new seal's; a whole epoch's read never mixes them
    (_seal_epoch_3_again, 3, ["whole", "read_epoch"]),  # prepare() reads the store anew: the new seal
])
def test_rows_another_process_pruned_or_sealed_again_while_they_were_read_are_no_damage(store, change, epoch, reads):
    """A read-only reader (inspect, verify, another run's service) opened an epoch; a
    training process then pruned it, rolled it back, or sealed it anew. Its rows are gone,
    not damaged: the reader is told so, and to read again, whichever read finds it."""
    reader = reopen(store)
    teacher, trajectory = reader.teacher_array(epoch), reader.trajectory_arrays(epoch)
    stale = reopen(store)  # still listing the epoch as it was
    change(store)
    moved = fr"epoch {epoch} of .* was pruned, rolled back or sealed again by another process while this one read"
    for read in reads:
        with pytest.raises(EpochNotSealedError, match=moved):
            {"rows": lambda: teacher[0:16], "whole": lambda: list(teacher.whole()),
             "read_epoch": lambda: stale.read_epoch(epoch),
             "trajectory": lambda: reader.trajectory_values(trajectory)}[read]()
    kept = store.teacher_epochs[-1]
    flip_byte(chunk(store, f"teacher/{epoch_key(kept)}", 2))  # damage is still damage
    with pytest.raises(StoreDamagedError, match=f"the teacher of epoch {kept} .* is damaged"):
        reopen(store).read_epoch(kept)


@pytest.mark.parametrize("change, gone, kept", [(_prune_epoch_2, 2, 3), (_roll_epoch_3_back, 3, 2)])
def test_verify_skips_an_epoch_pruned_while_it_ran_and_finds_no_damage(store, change, gone, kept):
    """verify of a store a training run is sealing or rolling back: an epoch whose teacher
    or trajectory went after verify listed it is no damage (the report stays ok) and is
    named as not checked."""
    listed = reopen(store)  # what verify read before the training run changed the store
    change(store)
    report = verify_store(listed)
    assert report.ok, report.findings
    assert len(report.skipped) == 1 and report.skipped[0].startswith(f"epoch {gone}: epoch {gone} of ")
    assert f"teacher of epoch {kept}" in report.checked and f"teacher of epoch {gone}" not in report.checked


def test_verify_a_clean_store(store):
    report = verify_path(store.url)
    assert report.ok, report.findings
    assert "teacher of epoch 3" in report.checked and "trajectory of epoch 1" in report.checked


@pytest.mark.parametrize("from_logits", [True, False])
def test_a_vocabularys_float32_rows_are_probability_vectors_to_the_writer_and_to_verify(tmp_path, from_logits):
    """A float32 softmax row of 128,000 classes sums to 1 within 1.2e-5, beyond the 1e-5
    that rounding alone allows: its denominator sums K terms. The writer takes such rows
    as probabilities, verify finds no damage in them, and still names a row that is none."""
    classes, samples = 128_000, 6
    logits = torch.randn(samples, classes, generator=torch.Generator().manual_seed(0)) * 5
    store = SoftTargetStore.create(tmp_path / "store", np.arange(samples), classes, dtype="float32")
    with store.writer(1, from_logits=from_logits) as writer:
        writer.write(torch.arange(samples), logits if from_logits else logits.softmax(1))
    store.seal(1)
    assert verify_path(store.url).ok
    teacher = zarr.open_array(Path(store.url) / "teacher/epoch_0001", mode="r+")
    teacher[3] = teacher[3] * 1.1
    assert str(verify_path(store.url).findings[0]).startswith("teacher of epoch 1: rows 3-3 are not probability")


def test_rows_carried_forward_keep_the_allowance_their_sums_were_given(tmp_path):
    """bfloat16 probabilities may sum to 1 within 2^-6; an epoch that predicts half of them
    anew from logits carries the others forward with their sums, which verify allows them."""
    store = SoftTargetStore.create(tmp_path / "store", np.arange(64) % 4, 4)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(64), torch.tensor([[0.5, 0.2, 0.2, 0.11]] * 64, dtype=torch.bfloat16))
    store.seal(1)
    with store.writer(2) as writer:
        writer.write(torch.arange(32), torch.randn(32, 4))
    store.seal(2)
    assert store.epoch_info(2)["sum_tolerance"] == store.epoch_info(1)["sum_tolerance"] == 2 * 2**-7 + 4 * 2**-24
    assert verify_path(store.url).ok


def test_verify_names_every_damage_by_epoch_and_rows(store, labels):
    PredictionService(store).prepare(3)
    flip_byte(chunk(store, "teacher/epoch_0003", 2))
    chunk(store, "teacher/epoch_0002", 4).unlink()
    flip_byte(chunk(store, "trajectory/epoch_0001"))
    cached = next((Path(store.url).parent / "store.mmap").glob("*.npy"))
    flip_byte(cached, at=0.95)
    findings = {str(f) for f in verify_path(store.url).findings}
    assert findings == {
        "teacher of epoch 3: rows 32-47 do not match their checksum (their bytes changed after they were written)",
        "teacher of epoch 2: rows 64-79 are missing (their chunk file was deleted)",
        "trajectory of epoch 1: rows 0-95 do not match their checksum (their bytes changed after they were written)",
        f"memory-map cache {cached}: does not match its checksum (a cache: it is decoded again on the next "
        "epoch; deleting it is safe)",
    }


def test_verify_finds_values_rewritten_with_valid_checksums(store, labels):
    teacher = zarr.open_array(Path(store.url) / "teacher/epoch_0003", mode="r+")
    rows = teacher[40:43]
    teacher[40] = np.full(K, 0.5, dtype=np.float16)  # not a probability vector
    teacher[41:43] = rows[::-1]  # probability vectors, but not the ones the trajectory recorded
    findings = [str(f) for f in verify_path(store.url).findings]
    assert findings[0].startswith("teacher of epoch 3: rows 40-40 are not probability vectors")
    assert findings[1] == "trajectory of epoch 3: rows 40-42 disagree with the teacher rows"
    assert findings[2].startswith("teacher of epoch 3: its stored chunks are not the ones sealed")
    assert len(findings) == 3


def test_verify_checks_the_sealed_list(tmp_path, store):
    def drop_epoch_2(meta):
        meta["sealed"] = [1, 3]

    _edit_root(store, drop_epoch_2, checksum=False)  # an edit: the attributes' checksum catches it
    with pytest.raises(StoreDamagedError, match="pskd_store attributes do not match their checksum"):
        reopen(store)
    _edit_root(store, lambda meta: meta.pop("crc32c"), checksum=False)  # the same edit, its checksum taken out
    with pytest.raises(StoreDamagedError, match="pskd_store attributes lost their checksum"):
        reopen(store)
    _edit_root(store, drop_epoch_2)  # an editor that also rewrote the checksum: verify reads on
    findings = [str(f) for f in verify_path(store.url).findings]
    assert "sealed list: epochs [1, 3] are not 1..2 in order: the root metadata was edited" in findings


@pytest.mark.slow
def test_training_resumed_on_a_damaged_teacher_stops_with_one_line(tmp_path, data_dir):
    """A real run killed after epoch 2's checkpoint; its teacher of epoch 2 then loses a
    byte: the resumed run must stop at set_epoch(3), naming the epoch, rows and verify."""
    run = tmp_path / "run"
    pskd_in_process("train", "-o", str(run), "--epochs", "2", "--workers", "0", "--steps-per-epoch", "3", "-q",
                    "--data-dir", str(data_dir), check=True)
    lengthen_run(run, 4)  # as if the run had been killed after epoch 2 of 4
    shutil.rmtree(run / "store.mmap")
    flip_byte(run / "store/teacher/epoch_0002/c.0.0")
    done = pskd("train", "--resume", str(run), "--workers", "0", "-q", check=False)  # what a user sees
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the teacher of epoch 2" in done.stderr and "rows 0-" in done.stderr
    assert f"pskd-store verify {run / 'store'}" in done.stderr
    verify = pskd_in_process("verify", str(run))
    assert verify.returncode == 1 and "DAMAGED  teacher of epoch 2: rows 0-" in verify.stdout
    assert json.loads(pskd_in_process("verify", str(run), "--json").stdout)["ok"] is False


@pytest.mark.parametrize("edit, problem", [
    (lambda meta: meta.update(shape=[N + 1, K]), f"shape ({N + 1}, {K}), expected ({N}, {K})"),
    (lambda meta: meta.update(data_type="float32"), "dtype float32, expected float16"),
    (lambda meta: meta["chunk_grid"]["configuration"].update(chunk_shape=[CHUNK_ROWS // 2, K]),
     f"{CHUNK_ROWS // 2} rows per chunk, expected {CHUNK_ROWS}"),
    (lambda meta: meta["chunk_grid"]["configuration"].update(chunk_shape=[CHUNK_ROWS, K - 1]),
     f"chunks ({CHUNK_ROWS}, {K - 1}), expected whole rows"),
    # codecs that decode the same bytes, checksums intact, into other values
    (lambda meta: meta["codecs"][0]["configuration"].update(endian="big"),
     "its codecs are bytes (big-endian) -> blosc -> crc32c, expected bytes (little-endian) -> blosc (or none) -> "
     "crc32c"),
    (lambda meta: meta["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}}),
     "its codecs are transpose -> bytes -> blosc -> crc32c, expected"),
])
def test_each_edit_of_an_arrays_metadata_is_named(store, edit, problem):
    meta_path = Path(store.url) / "teacher/epoch_0003/zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    changed = "the metadata of teacher/epoch_0003 was changed: " + re.escape(problem)
    with pytest.raises(StoreDamagedError, match=changed):
        reopen(store).read_epoch(3)
    with pytest.raises(StoreDamagedError, match=changed):  # what a training run's next epoch reads
        PredictionService(reopen(store)).prepare(3)


def test_staged_rows_whose_codecs_were_edited_stop_the_seal(store):
    write_epoch(store, 4, seal=False)
    meta_path = Path(store.url) / "staging/epoch_0004/writer_0000/encoded/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["endian"] = "big"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreDamagedError, match="staged rows of writer 0, epoch 4, .* the metadata of "
                       r"staging/epoch_0004/writer_0000/encoded was changed: its codecs are bytes \(big-endian\)"):
        reopen(store).seal(4)
    assert reopen(store).sealed_epochs == [1, 2, 3]


def test_a_chunk_that_does_not_decode_is_named_apart_from_a_checksum(store):
    """A chunk file whose checksum matches but whose bytes do not decompress: an array
    written without the checksum codec's protection would read as garbage otherwise."""
    import google_crc32c

    path = chunk(store, "teacher/epoch_0003", 1)
    payload = b"not blosc at all" * 4
    path.write_bytes(payload + google_crc32c.Checksum(payload).digest()[::-1])  # zarr's crc32c: little-endian
    with pytest.raises(StoreDamagedError, match=r"teacher of epoch 3 .* rows 16-31 cannot be decoded"):
        reopen(store).read_epoch(3)


def test_row_ranges_merge_adjacent_chunks():
    assert row_ranges([(32, 48), (0, 16), (16, 32), (64, 80)]) == ["0-47", "64-79"]


def test_a_store_of_another_schema_is_refused(store):
    _edit_root(store, lambda meta: meta.update(schema_version=1))
    with pytest.raises(StoreError, match="has store schema 1, this pskd-store reads schemas 2, 3"):
        reopen(store)


def test_a_seal_refuses_to_publish_onto_a_store_another_process_rolled_back(tmp_path, labels, monkeypatch):
    """Epoch 3 is merged onto epochs [1, 2]; before it is published, another process rolls
    the store back to epoch 1 (a resume from an earlier checkpoint). Publishing would bring
    epoch 2 back into the sealed list without its teacher, which the rollback deleted, and
    prune epoch 1's, the one that rollback kept."""
    import pskd_store.store as store_module

    sealing = SoftTargetStore.create(tmp_path / "store", labels, K, chunk_rows=CHUNK_ROWS)
    for epoch in (1, 2):
        write_epoch(sealing, epoch)
    write_epoch(sealing, 3, ids=np.arange(20, N), seal=False)  # rows 0-19 carried from epoch 2
    merge = store_module.merge_epoch

    def merged_then_rolled_back(*args, **kwargs):
        result = merge(*args, **kwargs)
        with monkeypatch.context() as before_the_claim:  # its discard ran before this seal claimed the epoch
            before_the_claim.setattr(EpochStaging, "sealing_by", lambda staging: None)
            assert reopen(sealing).rollback(1) == [2]  # the other process
        return result

    monkeypatch.setattr(store_module, "merge_epoch", merged_then_rolled_back)
    with pytest.raises(StoreError, match=r"changed while epoch 3 was being sealed \(sealed epochs \[1, 2\] then, "
                                         r"\[1\] now: .*epoch 3 was not published"):
        sealing.seal(3)
    after = reopen(sealing)
    assert after.sealed_epochs == [1] and after.teacher_epochs == [1]
    np.testing.assert_array_equal(after.read_epoch(1), epoch_probs(1, N, K).astype(np.float16))
    assert verify_path(after.url).ok


def test_after_a_rollback_a_pruned_teacher_is_not_counted_kept(store):
    """Epochs 1-4 sealed (teachers 3 and 4 kept); a resume from epoch 3's checkpoint rolls
    back to 3. Epoch 2 is among the last two sealed again, but its teacher was pruned when
    epoch 4 was sealed: it is pruned, not damage, and cannot be rolled back to."""
    write_epoch(store, 4)
    assert store.rollback(3) == [4] and store.teacher_epochs == [3]
    assert verify_path(store.url).ok
    with pytest.raises(EpochNotSealedError, match="the predictions of epoch 2 were pruned"):
        reopen(store).read_epoch(2)
    with pytest.raises(StoreError, match="cannot roll back to epoch 2: its predictions were pruned"):
        store.rollback(2)
    write_epoch(store, 4)
    assert reopen(store).teacher_epochs == [3, 4] and verify_path(store.url).ok


def test_a_run_started_over_after_a_prune_seals_and_serves_its_epochs_again(store):
    """rollback(0), what a resume without a checkpoint does, after epoch 1's teacher was
    pruned: the epochs sealed again have teachers of their own, not counted as pruned."""
    assert store.teacher_epochs == [2, 3] and store.rollback(0) == [1, 2, 3]
    for epoch in (1, 2, 3):
        written = write_epoch(store, epoch)
        np.testing.assert_array_equal(reopen(store).read_epoch(epoch), written.astype(np.float16))
    assert reopen(store).teacher_epochs == [2, 3] and verify_path(store.url).ok


def test_a_rollback_that_cannot_write_names_the_store_and_changes_nothing(store, monkeypatch):
    def full_disk(self, meta):
        raise OSError(27, "File too large")  # what a write to an open file on a full disk carries: no name

    monkeypatch.setattr(SoftTargetStore, "_publish", full_disk)
    named = re.escape(f"cannot roll the store back to epoch 2: File too large ({store.url})")
    with pytest.raises(StoreError, match=named):
        store.rollback(2)
    monkeypatch.undo()
    assert reopen(store).sealed_epochs == [1, 2, 3] and verify_path(store.url).ok


def test_rolling_back_past_the_kept_teachers_is_refused(store):
    pruned = r"cannot roll back to epoch 1: its predictions were pruned \(kept: \[2, 3\]\)"
    with pytest.raises(StoreError, match=pruned):
        store.rollback(1)
    assert reopen(store).sealed_epochs == [1, 2, 3]


def test_verify_reports_edited_statistics_damaged_labels_and_a_lost_trajectory_array(store):
    _edit_root(store, lambda meta: meta["epochs"].pop("2"))
    flip_byte(chunk(store, "labels"))
    (Path(store.url) / "trajectory/epoch_0001/zarr.json").unlink()
    findings = {str(f) for f in verify_path(store.url).findings}
    assert "epoch 2: is sealed but has no statistics or seal token: the root metadata was edited" in findings
    assert any(f.startswith("labels: the labels array") for f in findings)
    assert any(f.startswith("trajectory of epoch 1: ") and "its array trajectory/epoch_0001 cannot be opened" in f
               for f in findings), findings


def test_verify_of_a_run_whose_checkpointed_epoch_lost_its_statistics(tmp_path, trained_run):
    """The checkpoint's seal token is compared with the store's only where the store still
    has it: edited statistics are one finding, not a crash."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _edit_root(SoftTargetStore.open(run / "store"), lambda meta: meta["epochs"].pop("2"))
    findings = [str(f) for f in verify_path(run).findings]
    assert findings == ["epoch 2: is sealed but has no statistics or seal token: the root metadata was edited"]


def _rewrite_cache(path: Path, array: np.ndarray) -> None:
    """Replace a cached teacher file, with a matching checksum beside it (a cache that
    passes its own check but no longer holds what the store holds)."""
    from pskd_store.service import _file_crc32c

    np.save(path, array)
    path.with_name(path.name + ".crc32c").write_text(_file_crc32c(path) + "\n")


def test_verify_compares_a_cache_with_a_valid_checksum_against_the_store(store):
    service = PredictionService(store)
    cached = service.path(3, service.prepare(3))
    rows = np.load(cached)
    rows[::2] = rows[::2][:, ::-1]  # every other row changed: more row ranges than a line lists
    _rewrite_cache(cached, rows)
    findings = [str(f) for f in verify_path(store.url).findings]
    assert findings == [f"memory-map cache of epoch 3: rows 0-0, 2-2, 4-4, 6-6, 8-8 and {N // 2 - 5} more ranges "
                        "differ from the store (a cache: it is decoded again when deleted)"]
    _rewrite_cache(cached, rows[:10])
    findings = [str(f) for f in verify_path(store.url).findings]
    assert findings == [f"memory-map cache {cached}: holds a float16 array of shape (10, {K})"]


def test_verify_compares_the_cache_in_a_cache_folder_given(store, tmp_path):
    """A run's --cache-dir: the store decodes into its own subfolder there, which verify reads."""
    service = PredictionService(store, cache_dir=tmp_path / "cache")
    cached = service.path(3, service.prepare(3))
    assert cached.parent == cache_folder(store, tmp_path / "cache") and cached.parent.parent == tmp_path / "cache"
    rows = np.load(cached)
    rows[4] = rows[4][::-1]
    _rewrite_cache(cached, rows)
    findings = [str(f) for f in verify_store(reopen(store), cache_dir=tmp_path / "cache").findings]
    assert findings == ["memory-map cache of epoch 3: rows 4-4 differ from the store (a cache: it is decoded "
                        "again when deleted)"]


def test_verify_checks_a_run_directorys_files(tmp_path, labels):
    from pskd_store.checkpoint import save_checkpoint

    run = tmp_path / "run"
    store = SoftTargetStore.create(run / "store", labels, K, chunk_rows=CHUNK_ROWS)
    write_epoch(store, 1)
    (run / "config.json").write_text("{\"dataset\": ")
    (run / "metrics.jsonl").write_text("{\"epoch\": 1}\n{oops\n")
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": {}, "config": {}, "epoch": 2, "rng": []})
    findings = {str(f) for f in verify_path(run).findings}
    assert any(f.startswith(f"{run / 'config.json'}: is not valid JSON") for f in findings)
    assert any(f.startswith(f"{run / 'metrics.jsonl'}: ") and "line 2" in f for f in findings)
    assert f"{run / 'checkpoints' / 'last.pt'}: was written after epoch 2, which the store has not sealed " \
           "(sealed: [1]): the store lost epochs the model trained on" in findings
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 cut short")  # a zip's start, no more
    findings = {str(f) for f in verify_path(run).findings}
    assert any(f.startswith(f"{run / 'checkpoints' / 'last.pt'}: ") and "not a readable checkpoint" in f
               for f in findings)


def test_verify_names_the_run_files_that_are_missing_or_not_a_config(tmp_path, labels):
    """A run made by train whose config.json, last checkpoint or metrics rows were deleted:
    each named, as a resume would refuse them; config.json not text, or not an object."""
    from pskd_store.checkpoint import save_checkpoint

    run = tmp_path / "run"
    store = SoftTargetStore.create(run / "store", labels, K, chunk_rows=CHUNK_ROWS)
    for epoch in (1, 2):
        write_epoch(store, epoch)
    (run / "metrics.jsonl").write_text('{"epoch": 2}\n')
    save_checkpoint(run / "checkpoints" / "last.pt", {"model": {}, "config": {}, "epoch": 2, "rng": []})
    findings = {str(f) for f in verify_path(run).findings}
    assert f"{run / 'config.json'}: is missing: restore it from a backup" in findings
    assert f"{run / 'metrics.jsonl'}: lacks the rows of epochs [1], which the checkpoint of epoch 2 trained: " \
           "restore it from a backup" in findings
    (run / "checkpoints" / "last.pt").unlink()
    (run / "config.json").write_text("{}")  # train's run; with neither, the store alone is verified (a loop's)
    findings = {str(f) for f in verify_path(run).findings}
    assert f"{run / 'checkpoints' / 'last.pt'}: is missing, but the store has sealed epochs [1, 2]: the run cannot " \
           "be resumed; restore its checkpoints from a backup" in findings
    for written, problem in ((b"\xac\xed\x00", "is not valid JSON ('utf-8' codec can't decode"),
                             (b"[]", "holds a JSON list, not a config's object")):
        (run / "config.json").write_bytes(written)
        assert any(f.startswith(f"{run / 'config.json'}: {problem}") for f in map(str, verify_path(run).findings))
        inspected = pskd_in_process("inspect", str(run), "--out", str(tmp_path / "out"))
        assert inspected.returncode == 1 and problem in inspected.stderr and "Traceback" not in inspected.stderr


def test_staged_ids_rewritten_out_of_range_stop_the_seal(store):
    write_epoch(store, 4, seal=False)
    ids = zarr.open_array(Path(store.url) / "staging/epoch_0004/writer_0000/ids", mode="r+")
    ids[5] = N + 3  # with a valid checksum
    with pytest.raises(StoreError, match=f"staged ids of writer 0 fall outside \\[0, {N}\\)"):
        reopen(store).seal(4)
    assert reopen(store).sealed_epochs == [1, 2, 3]


def test_a_scratch_file_shorter_than_written_stops_the_seal(store, monkeypatch):
    from pskd_store import merge

    write_epoch(store, 4, seal=False)
    monkeypatch.setattr(merge, "BUCKET_BYTES", CHUNK_ROWS * K * 2)  # a bucket a chunk: the scratch file in use
    monkeypatch.setattr(merge, "_pwrite", lambda fd, rows, offset: None)  # writes that never reached the disk
    with pytest.raises(StoreError, match="the seal's scratch file ended early: is its disk full?"):
        reopen(store).seal(4)
    assert reopen(store).sealed_epochs == [1, 2, 3]


def test_verify_finds_a_row_summing_to_a_few_epsilons_over_1(store, labels):
    """float16 rows sum to 1 within two epsilons (~2e-3): a row rewritten to sum to 1.006,
    its checksum valid and its largest and true-class values untouched, is found."""
    teacher = zarr.open_array(Path(store.url) / "teacher/epoch_0003", mode="r+")
    row = teacher[50].astype(np.float32)
    k = next(k for k in np.argsort(row) if k != labels[50])  # the smallest other value stays small
    row[k] += 0.006
    teacher[50] = row.astype(np.float16)
    findings = [str(f) for f in verify_path(store.url).findings]
    assert any(f.startswith("teacher of epoch 3: rows 50-50 are not probability vectors") for f in findings)
    assert not any("disagree with the teacher rows" in f for f in findings)


@pytest.mark.parametrize("given, stored", [("bfloat16", "float32"), ("float32", "float16")])
def test_probability_rows_the_writer_accepted_pass_verify(tmp_path, given, stored):
    """bfloat16 probabilities sum to 1 within 2·2⁻⁷, which the writer allows; float32 ones
    close to its float16 limit end past it once rounded to float16. verify allows the stored
    rows what the writer allowed the rows given, plus the rounding, and no more."""
    n, k = 64, 10
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(n, k, generator=generator).to(getattr(torch, given))
    probs = probs / probs.float().sum(1, keepdim=True).to(probs.dtype)  # rounded to the dtype: sums off by ~eps
    if given == "float32":  # the writer's limit, 2·2⁻¹¹, nearly reached
        probs = probs * (1 + 0.97 * 2 * float(np.finfo(np.float16).eps))
    store = SoftTargetStore.create(tmp_path / "store", np.arange(n) % k, k, dtype=stored)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(n), probs)
    store.seal(1)
    stored_sums = store.read_epoch(1).astype(np.float32).sum(1)
    assert np.abs(stored_sums - 1).max() > 2 * float(np.finfo(stored).eps)  # past the store's own rounding
    assert verify_path(store.url).ok
    _rewrite_rows(store, 1, lambda rows: rows.__setitem__((5, 0), rows[5, 0] + 0.05))
    assert "rows 5-5 are not probability vectors" in " ".join(str(f) for f in verify_path(store.url).findings)


@pytest.mark.parametrize("off, taken", [(8e-6, True), (3e-5, False)])
def test_float32_rows_are_allowed_the_stores_1e_5_and_no_more(tmp_path, off, taken):
    """Below float16, twice the dtype's epsilon is tighter than the 1e-5 every store has
    allowed a row's sum (float32: 2.4e-7): rows within it, which stores sealed before took,
    are still probabilities to the writer and to verify; rows past it are refused."""
    n, k = 32, 10
    probs = torch.rand(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = (probs / probs.sum(1, keepdim=True) * (1 + off)).float()
    store = SoftTargetStore.create(tmp_path / "store", np.arange(n) % k, k, dtype="float32")
    if not taken:
        with pytest.raises(ValueError, match="rows written for epoch 1 are not"):
            with store.writer(1, from_logits=False) as writer:
                writer.write(torch.arange(n), probs)
        return
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(n), probs)
    store.seal(1)
    assert verify_path(store.url).ok


def _rewrite_rows(store: SoftTargetStore, epoch: int, edit) -> None:
    """Rewrite teacher rows through zarr (valid checksums), as an editor with the right tools would."""
    teacher = zarr.open_array(Path(store.url) / f"teacher/{epoch_key(epoch)}", mode="r+")
    rows = teacher[:]
    edit(rows)
    teacher[:] = rows


def _sealed_store(path: Path, labels: np.ndarray, topk: int | None = None) -> SoftTargetStore:
    store = SoftTargetStore.create(path, labels, K, topk=topk, chunk_rows=CHUNK_ROWS)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(N), torch.from_numpy(epoch_probs(1, N, K)))
    store.seal(1)
    return store


def _edit_top_k(store: SoftTargetStore, change):
    def edit(rows):
        values, classes = store.encoding.unpack(rows)
        values, classes = values.copy(), classes.copy()
        change(values, classes)
        rows[:] = store.encoding.pack(values, classes)
    return edit


def _move_mass_between_minor_classes(labels):
    def edit(rows):
        row = rows[7].astype(np.float32)
        minor = [k for k in np.argsort(row) if k != labels[7]][:2]
        row[minor[0]], row[minor[1]] = row[minor[1]], row[minor[0]]  # same sum, max and true class
        rows[7] = row.astype(np.float16)
    return edit


def _halve_a_minor_value(labels):
    def change(values, classes):  # in a row whose true class is kept above it: its record stays
        row = next(i for i in range(N) if labels[i] in classes[i, :2])
        values[row, 2] = values[row, 2] / 2
    return change


def _swap_two_minor_classes(labels):
    def change(values, classes):  # neither is the true class: its record stays
        row = next(i for i in range(N) if labels[i] not in classes[i, 1:])
        classes[row, [1, 2]] = classes[row, [2, 1]]
    return change


def _replace_an_absent_class(labels):
    def change(values, classes):
        row = next(i for i in range(N) if labels[i] != classes[i, 2])
        classes[row, 2] = next(k for k in range(K) if k not in classes[row] and k != labels[row])
    return change


@pytest.mark.parametrize("topk, edit", [
    (None, lambda store, labels: _move_mass_between_minor_classes(labels)),
    (3, lambda store, labels: _edit_top_k(store, _halve_a_minor_value(labels))),
    (3, lambda store, labels: _edit_top_k(store, _swap_two_minor_classes(labels))),
    (3, lambda store, labels: _edit_top_k(store, _replace_an_absent_class(labels))),
], ids=["dense: mass moved between minor classes", "top-k: a minor value halved", "top-k: two classes swapped",
        "top-k: a class replaced by an absent one"])
def test_verify_finds_plausible_rows_rewritten_after_the_seal_by_the_seals_digest(tmp_path, labels, topk, edit):
    """Edits that keep a row a valid probability vector with the same trajectory record,
    and every checksum valid: only the digest recorded at the seal can tell."""
    store = _sealed_store(tmp_path / "store", labels, topk)
    _rewrite_rows(store, 1, lambda rows: None)  # the same rows written again: the same bytes
    assert verify_path(store.url).ok
    _rewrite_rows(store, 1, edit(store, labels))
    findings = [str(f) for f in verify_path(store.url).findings]
    assert findings == ["teacher of epoch 1: its stored chunks are not the ones sealed (their digest differs from "
                        "the one recorded at the seal): they were rewritten after it"]


def test_a_top_k_class_id_beyond_k_is_damage_not_an_index_error(tmp_path, labels):
    store = _sealed_store(tmp_path / "topk", labels, topk=3)

    def beyond_k(values, classes):
        classes[40, 1] = K + 3

    _rewrite_rows(store, 1, _edit_top_k(store, beyond_k))
    with pytest.raises(StoreDamagedError, match=r"teacher of epoch 1 .* rows 40-40 name class ids outside \[0, K\)"):
        reopen(store).read_epoch(1)
    with pytest.raises(StoreDamagedError, match=r"rows 40-40 name class ids outside \[0, K\)"):
        PredictionService(reopen(store)).prepare(1)


@pytest.mark.parametrize("compressor", [zarr.codecs.BloscCodec(cname="zstd"), None], ids=["blosc", "none"])
def test_checked_rows_of_a_local_array_are_what_zarr_reads(tmp_path, compressor):
    """Chunks of this store's arrays are read straight from their files: the rows zarr reads,
    and damage is an error."""
    values = np.arange(90, dtype=np.int64).reshape(30, 3)
    root = zarr.open_group(tmp_path, mode="w")
    array = root.create_array("a", shape=values.shape, chunks=(8, 3), dtype=values.dtype, config=ARRAY_CONFIG,
                              compressors=codecs_with_checksum(compressor))
    array[:] = values
    checked = CheckedArray(array, "the test array", str(tmp_path))
    np.testing.assert_array_equal(checked[5:27], values[5:27])
    flip_byte(chunk_file(tmp_path / "a", 1))
    with pytest.raises(StoreDamagedError, match=r"the test array .* rows 8-15 do not match their checksum"):
        checked[5:27]


def test_an_array_of_other_codecs_is_refused_before_a_chunk_is_read(tmp_path):
    root = zarr.open_group(tmp_path, mode="w")
    array = root.create_array("a", shape=(30, 3), chunks=(8, 3), dtype=np.int64, config=ARRAY_CONFIG,
                              compressors=(zarr.codecs.GzipCodec(), zarr.codecs.Crc32cCodec()))
    with pytest.raises(StoreDamagedError, match=r"the test array .* the metadata of a was changed: its codecs are "
                       r"bytes -> gzip -> crc32c, expected bytes \(little-endian\) -> blosc \(or none\) -> crc32c"):
        CheckedArray(array, "the test array", str(tmp_path))



@pytest.mark.slow
def test_verify_of_a_run_that_trains_on_while_it_reads_finds_no_damage(tmp_path, trained_run, monkeypatch):
    """Training seals an epoch, then checkpoints it: a checkpoint read after verify's pass
    over the store may be of an epoch sealed during it, which the store is read again for."""
    import pskd_store.verify

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lengthen_run(run, 3)
    pass_over_the_store = pskd_store.verify.verify_store

    def training_goes_on(*args, **kwargs):
        report = pass_over_the_store(*args, **kwargs)
        pskd_in_process("train", "--resume", str(run), "-q", check=True)  # seals epoch 3, then checkpoints it
        return report

    monkeypatch.setattr(pskd_store.verify, "verify_store", training_goes_on)
    report = verify_path(run)
    assert report.ok, report.findings
    assert SoftTargetStore.open(run / "store").sealed_epochs == [1, 2, 3]
