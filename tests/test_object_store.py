"""A store on an object store: a real S3 API (moto's server on 127.0.0.1, started and
stopped by the test), reached through zarr's fsspec support and s3fs, as a cluster
without a shared file system would use it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch
from conftest import exit_code, pskd_forked, pskd_in_process

from pskd_store.errors import StoreDamagedError, StoreError
from pskd_store.store import SoftTargetStore
from pskd_store.verify import verify_path

pytestmark = pytest.mark.slow  # torchrun, object-store servers, kills: the full suite only

pytest.importorskip("s3fs", reason="pip install -e '.[test]' installs s3fs")
moto_server = pytest.importorskip("moto.server", reason="pip install -e '.[test]' installs moto[server]")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> dict[str, str]:
    """An S3 endpoint on loopback with a bucket 'runs'; the environment that points s3fs at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "pskd-test", "AWS_SECRET_ACCESS_KEY": "pskd-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("node-cache"))}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # this process's s3fs clients (the API checks) read it too
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("runs")
    yield {**os.environ}
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_train_kill_resume_into_s3_matches_a_local_run(tmp_path, s3, data_dir):
    args = ["train", "--epochs", "3", "--steps-per-epoch", "10", "--workers", "0", "--data-dir", str(data_dir), "-q",
            "--seed", "5"]
    reference = pskd_forked(*args, "-o", str(tmp_path / "local"))  # beside the killed run: 2 cores

    url = "s3://runs/remote/store"  # the s3 fixture's environment is this process's, and its children's
    run = tmp_path / "remote"
    killed = pskd_forked(*args, "-o", str(run), "--store", url)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file()
                                          and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    assert exit_code(killed, timeout=60) == -signal.SIGKILL
    assert SoftTargetStore.open(url).sealed_epochs in ([1], [1, 2]), "killed part-way through the run"
    pskd_in_process("train", "--resume", str(run), "-q", check=True)  # s3: this process's environment too
    assert exit_code(reference) == 0

    remote, local = SoftTargetStore.open(url, read_only=True), SoftTargetStore.open(tmp_path / "local" / "store")
    assert remote.sealed_epochs == local.sealed_epochs == [1, 2, 3]
    for epoch in remote.teacher_epochs:
        np.testing.assert_array_equal(remote.read_epoch(epoch), local.read_epoch(epoch))
    for field, values in local.trajectory().items():
        np.testing.assert_array_equal(remote.trajectory()[field], values)
    assert not (run / "store").exists()  # the store lives in the bucket only
    config = (run / "config.json").read_text()
    assert json.loads(config)["store"] == url and "pskd-secret-key" not in config
    assert "pskd-secret-key" not in (run / "train.log").read_text()

    info = pskd_in_process("info", str(run))  # the s3 fixture's environment is this process's too
    assert f"store        {url}" in info.stdout and "sealed       [1, 2, 3]" in info.stdout
    pskd_in_process("verify", str(run), check=True)
    report = json.loads(pskd_in_process("inspect", str(run), "--json", "--out", str(tmp_path / "plots")).stdout)
    assert report["runs"][0]["epochs"] == 3


def test_a_damaged_object_is_an_error_naming_the_rows(s3):
    import s3fs

    url = "s3://runs/damaged/store"
    labels = np.arange(64) % 4
    store = SoftTargetStore.create(url, labels, 4, chunk_rows=16)
    with store.writer(1, from_logits=False) as writer:
        writer.write(torch.arange(64), torch.full((64, 4), 0.25))
    store.seal(1)
    fs = s3fs.S3FileSystem()
    key = "runs/damaged/store/teacher/epoch_0001/c.2.0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(key, bytes(data))
    damaged = r"teacher of epoch 1 in s3://runs/damaged/store is damaged: rows 32-47"
    with pytest.raises(StoreDamagedError, match=damaged):
        SoftTargetStore.open(url).read_epoch(1)
    fs.rm_file("runs/damaged/store/teacher/epoch_0001/c.3.0")
    findings = {str(f) for f in verify_path(url).findings}
    assert any("rows 48-63 are missing" in f for f in findings)
    assert any("rows 32-47 do not match" in f for f in findings)


def test_a_store_is_made_in_a_folder_that_s3s_console_made_and_never_at_an_objects_key(s3):
    """S3's console makes a folder as an empty object named ``prefix/``, which the prefix's
    listing names as it names the key of an object: the store is made in the folder, and
    still refused at an object's key."""
    import boto3

    from pskd_store.errors import StoreError

    boto3.client("s3").put_object(Bucket="runs", Key="console-folder/", Body=b"")
    boto3.client("s3").put_object(Bucket="runs", Key="an-object", Body=b"data")
    labels = np.arange(64) % 4
    for overwrite in (False, True):
        store = SoftTargetStore.create("s3://runs/console-folder", labels, 4, overwrite=overwrite)
        with store.writer(1) as writer:
            writer.write(torch.arange(64), torch.randn(64, 4))
        store.seal(1)
        assert verify_path(store.url).ok and SoftTargetStore.open(store.url).sealed_epochs == [1]
    with pytest.raises(StoreError, match="s3://runs/an-object is an object, not a prefix"):
        SoftTargetStore.create("s3://runs/an-object", labels, 4)


def test_a_claim_on_s3_is_a_conditional_put_that_a_second_writer_cannot_overwrite(s3, monkeypatch):
    """If-None-Match: * on the PUT: the server keeps the first record of a key even when the
    second writer looked before the first one's PUT landed (zarr's own check-then-write
    would then overwrite it: the race in which both writers won)."""
    from pskd_store import staging

    store = SoftTargetStore.create("s3://runs/claims/store", np.arange(20) % 4, 4)
    zstore = store._group.store
    key = "staging/epoch_0001/owners/writer_0000.0"
    staging._store_set_if_absent(zstore, key, b"first")

    async def looked_too_early(key: str) -> bool:
        return False

    monkeypatch.setattr(zstore, "exists", looked_too_early)
    staging._store_set_if_absent(zstore, key, b"second")
    assert staging._store_get(zstore, key) == b"first"


def test_two_writers_racing_for_one_part_on_s3_never_both_win(s3):
    import threading

    from pskd_store.errors import StoreError

    outcomes = []
    for trial in range(10):
        store = SoftTargetStore.create(f"s3://runs/race-{trial}/store", np.arange(20) % 4, 4)
        start, done = threading.Barrier(2), threading.Barrier(2)
        results: list[str] = []

        def claim() -> None:
            start.wait()
            writer = None
            try:
                writer = store.writer(1)
                results.append("won")
            except StoreError as err:
                results.append("refused" if "rank 0 of epoch 1" in str(err) else str(err))
            done.wait()  # the winner holds its claim until both have tried
            if writer is not None:
                writer.abandon()

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        outcomes.append(sorted(results))
    assert outcomes == [["refused", "won"]] * 10


def test_a_teacher_object_lost_during_the_seal_stops_the_seal_not_the_next_epoch(s3, monkeypatch):
    """The seal reads every object of the epoch back before it publishes: a chunk deleted
    between its write and the root metadata's PUT leaves the previous teacher in place."""
    import s3fs
    from store_helpers import write_epoch

    from pskd_store import store as store_module

    store = SoftTargetStore.create("s3://runs/lost/store", np.arange(200) % 4, 4, chunk_rows=32)
    write_epoch(store, 1)
    write_epoch(store, 2, seal=False)
    merge_epoch = store_module.merge_epoch

    def then_lose_a_chunk(*args, **kwargs):
        merged = merge_epoch(*args, **kwargs)
        s3fs.S3FileSystem().rm_file("runs/lost/store/teacher/epoch_0002/c.3.0")  # lost on the way
        return merged

    monkeypatch.setattr(store_module, "merge_epoch", then_lose_a_chunk)
    with pytest.raises(StoreDamagedError, match=r"the teacher of epoch 2 .* rows 96-127 are missing"):
        store.seal(2)
    assert SoftTargetStore.open("s3://runs/lost/store").sealed_epochs == [1]


def test_a_sequence_store_on_s3_seals_serves_rolls_back_and_verifies(s3, tmp_path):
    from test_sequences import Sequences, expected_rows, padded_labels, sequence_rows_store_on, write_tokens

    from pskd_store.token_dataset import TokenTargetDataset

    labels = padded_labels()
    store = sequence_rows_store_on("s3://runs/sequences/store", labels)
    logits = torch.randn(*labels.shape, 50, generator=torch.Generator().manual_seed(9))
    write_tokens(store, 1, logits, labels)
    write_tokens(store, 2, logits * 2, labels)
    reopened = SoftTargetStore.open("s3://runs/sequences/store", labels=store.labels,
                                    lengths=store.token_rows.lengths)
    np.testing.assert_array_equal(reopened.teacher_array(2)[:], expected_rows(logits * 2, labels, 4))
    assert reopened.trajectory()["token_accuracy"].shape == (2, len(labels))
    assert verify_path("s3://runs/sequences/store").ok
    assert reopened.rollback(1) == [2]
    data = TokenTargetDataset(Sequences(labels), reopened, 0.8, 4, cache_dir=str(tmp_path / "cache"))
    data.set_epoch(2)  # served from epoch 1, decoded from S3
    _, item_labels, probs, classes, alpha, _ = data[5]
    values, stored_classes = reopened.encoding.sparse(expected_rows(logits, labels, 4)[store.token_rows.rows([5])])
    np.testing.assert_array_equal(probs[item_labels != -100].numpy(), values)
    np.testing.assert_array_equal(classes[item_labels != -100].numpy(), stored_classes)


def test_the_integrations_open_the_store_with_the_storage_options_they_create_it_with(s3, monkeypatch):
    """Credentials given only as storage_options (none in the environment): the session's
    store is created and opened with them, and opened again on a resume."""
    from torch.utils.data import TensorDataset

    from pskd_store.distributed import Distributed
    from pskd_store.integrations.session import StoreSession

    options = {"key": s3["AWS_ACCESS_KEY_ID"], "secret": s3["AWS_SECRET_ACCESS_KEY"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    labels = np.arange(32) % 4
    base = TensorDataset(torch.zeros(32, 2), torch.from_numpy(labels))
    for resuming in (False, True):
        session = StoreSession.open("s3://runs/options/store", base, labels, num_classes=4, alpha_T=0.8,
                                    total_epochs=2, env=Distributed(), resuming=resuming, storage_options=options)
        assert session.store.num_samples == 32



def test_a_client_without_credentials_or_a_protocol_without_its_package_is_one_line(s3, tmp_path, data_dir,
                                                                                   monkeypatch):
    """botocore's NoCredentialsError, fsspec's unknown protocol and missing package: one line
    each naming where the fix goes, from the API and from each command, before a run starts."""
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance to ask either
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        url = "s3://runs/no-credentials/store"
        for make in (SoftTargetStore.open, lambda url: SoftTargetStore.create(url, np.arange(4), 4)):
            with pytest.raises(StoreError, match=f"cannot reach the store at {url} \\(NoCredentialsError: .*\\): give "
                                                 "the object store's client its credentials"):
                make(url)
        for command in (["info", url], ["verify", url],
                        ["train", "--epochs", "1", "--data-dir", str(data_dir), "-o", str(tmp_path / "run"), "--store",
                         url]):
            result = pskd_in_process(*command)
            error = result.stderr.strip().splitlines()[-1]  # after train's "run directory" log line
            assert result.returncode == 1 and error.startswith(f"Error: cannot reach the store at {url}"), error
            assert "AWS_ACCESS_KEY_ID" in error and "Traceback" not in result.stderr
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # the next test's client has credentials
    result = pskd_in_process("info", "foo://bucket/store")
    assert result.returncode == 1 and "cannot open foo://bucket/store: Protocol not known: foo" in result.stderr
