"""PS-KD in a real Lightning Trainer (tests/lightning_run.py): served targets are Eq. 6 of
the logits the steps produced, under one process, DDP with two gloo processes, and a run
killed mid-epoch and resumed from its checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning", reason="the Lightning integration needs pip install -e '.[lightning]'")

import lightning.pytorch as pl  # noqa: E402
import lightning_run  # noqa: E402  (tests/ is on the path)
from conftest import exit_code, forked  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint  # noqa: E402
from lightning_run import K, fit  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pskd_store import SoftTargetStore, StoreError, collate_soft_targets  # noqa: E402
from pskd_store.integrations.lightning import PSKD  # noqa: E402
from pskd_store.loss import token_soft_cross_entropy  # noqa: E402
from pskd_store.row_encoding import row_encoding  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_state_kept")
SCRIPT = Path(__file__).with_name("lightning_run.py")
ALPHA_T, EPOCHS = 0.8, 4


def run_script(root: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root), *args], capture_output=True, text=True,
                          timeout=timeout)


def last_predictions(seen: list[tuple], epoch: int) -> dict[int, torch.Tensor]:
    """Each id's softmax as its last step of ``epoch`` produced it, float16 as stored."""
    rows = {}
    for step_epoch, ids, logits, _ in seen:
        if step_epoch == epoch:
            for i, row in zip(ids.tolist(), logits.float().softmax(dim=1).half().float()):
                rows[i] = row
    return rows


def assert_targets_are_eq6(seen: list[tuple], written: list[tuple] | None = None) -> int:
    """Every target served in epoch t >= 2 is (1 - a_t)·onehot + a_t·p_{t-1}, p_{t-1} from
    the logits ``written`` (every rank's steps) in epoch t - 1; epoch 1's are one-hot."""
    written = seen if written is None else written
    checked = 0
    for epoch, ids, _, targets in seen:
        labels = torch.as_tensor([i % K for i in ids.tolist()])  # blobs(): label = id mod K
        onehot = torch.nn.functional.one_hot(labels, K).float()
        if epoch == 1:
            torch.testing.assert_close(targets, onehot, rtol=0, atol=0)
            continue
        alpha = ALPHA_T * epoch / EPOCHS
        past = last_predictions(written, epoch - 1)
        expected = (1 - alpha) * onehot + alpha * torch.stack([past[i] for i in ids.tolist()])
        torch.testing.assert_close(targets, expected, rtol=0, atol=1e-6)
        checked += len(ids)
    return checked


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_one_process_with_workers_serves_eq6_and_checkpoints_the_store(tmp_path, precision):
    """Under bf16 autocast the logits are bfloat16: the store keeps the softmax of them upcast."""
    module = fit(tmp_path, epochs=EPOCHS, workers=2, precision=precision)
    assert {logits.dtype for *_, logits, _ in module.seen} == {torch.float32 if precision == "32-true" else
                                                                torch.bfloat16}
    assert assert_targets_are_eq6(module.seen) == 3 * lightning_run.N  # every sample of epochs 2-4
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2, 3, 4]
    torch.testing.assert_close(torch.from_numpy(store.read_epoch(4)).float(),
                               torch.stack([v for _, v in sorted(last_predictions(module.seen, 4).items())]),
                               rtol=0, atol=0)
    for epoch in range(EPOCHS):  # Lightning's checkpoint of each epoch carries the callback's state
        state = torch.load(tmp_path / "checkpoints" / f"epoch={epoch}.ckpt", weights_only=False)["callbacks"]
        assert state["PSKD"] == {"store": str(tmp_path / "store"), "sealed": epoch + 1, "writing": False,
                                 "seal_token": store.epoch_info(epoch + 1)["seal_token"]}


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_writes_each_ranks_shard(tmp_path):
    result = run_script(tmp_path, "--devices", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [torch.load(tmp_path / f"seen_rank{rank}.pt") for rank in (0, 1)]
    assert {len(ids) for s in seen for _, ids, _, _ in s} == {16}
    shards = [{i for epoch, ids, _, _ in s if epoch == 1 for i in ids.tolist()} for s in seen]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == lightning_run.N
    both = seen[0] + seen[1]
    assert sum(assert_targets_are_eq6(s, both) for s in seen) == 3 * lightning_run.N
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, sealed", [("mid-epoch", [1, 2]), ("after-seal", [1, 2, 3])])
def test_a_killed_run_resumes_into_an_uninterrupted_run(tmp_path, kill_at, sealed):
    """Killed while epoch 3 was being written, or after its seal and before its checkpoint:
    the resume from epoch 2's checkpoint rolls the store back and repeats epoch 3 exactly."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    fit(whole, epochs=EPOCHS)
    assert exit_code(forked(fit, killed, epochs=EPOCHS, kill_in_epoch=3, kill_at=kill_at)) == -signal.SIGKILL
    assert SoftTargetStore.open(killed / "store").sealed_epochs == sealed
    resumed = fit(killed, epochs=EPOCHS, resume=True)
    assert [epoch for epoch, *_ in resumed.seen][0] == 3
    assert_targets_are_eq6(resumed.seen, torch.load(whole / "seen_rank0.pt"))
    for name, value in torch.load(whole / "final.pt").items():
        torch.testing.assert_close(torch.load(killed / "final.pt")[name], value, rtol=0, atol=0)
    stores = [SoftTargetStore.open(root / "store") for root in (whole, killed)]
    for epoch in (3, 4):
        assert (stores[0].read_epoch(epoch) == stores[1].read_epoch(epoch)).all()
    for field, values in stores[0].trajectory().items():
        assert (stores[1].trajectory()[field] == values).all(), field


def test_misuse_is_refused_naming_the_fix(tmp_path):
    fit(tmp_path, epochs=1)
    with pytest.raises(StoreError, match="already exists.*resume from the run's checkpoint.*overwrite=True"):
        fit(tmp_path, epochs=1)
    fit(tmp_path, epochs=1, overwrite=True)  # what the message offers
    with pytest.raises(ValueError, match="must return a dict with the batch's logits under 'probs'"):
        fit(tmp_path / "other", epochs=1, logits_key="probs")
    data = PSKD(tmp_path / "s", num_classes=K).wrap(lightning_run.blobs())
    with pytest.raises(RuntimeError, match="pass that callback to the Trainer"):
        data[0]


def quiet_trainer(root: Path, callbacks: list, **options) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=callbacks, **options)


def wrapped(root: Path, **options) -> tuple[PSKD, DataLoader]:
    pskd = PSKD(root / "store", num_classes=K, chunk_rows=16, **options)
    return pskd, DataLoader(pskd.wrap(lightning_run.blobs()), batch_size=16)


class StopsIn(lightning_run.Classifier):
    """Fails (``fail``) or asks the Trainer to stop (``stop``) at the third step of ``epoch``."""

    def __init__(self, how: str, epoch: int = 2):
        super().__init__()
        self.how, self.epoch = how, epoch

    def training_step(self, batch, batch_idx):
        if self.current_epoch + 1 == self.epoch and batch_idx == 2:
            if self.how == "fail":
                raise RuntimeError("a failing step")
            self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


def test_a_failed_step_gives_its_part_up_unsealed(tmp_path):
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(RuntimeError, match="a failing step"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(StopsIn("fail"), loader)
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1]
    store.writer(2).close()  # the failed writer's part is free: epoch 2 can be written again
    assert store.seal(2, allow_empty=True)["ids_written"] == 0  # none of the failed writer's rows


def test_the_checkpoint_lightning_saves_on_an_exception_is_refused_as_mid_epoch(tmp_path):
    """OnExceptionCheckpoint saves after this callback gave the epoch's part up: resumed, the
    epoch would be sealed with the rows trained after the resume, the rest carried forward
    from the epoch before, as if they were this epoch's."""
    pskd, loader = wrapped(tmp_path)
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "exception")
    with pytest.raises(RuntimeError, match="a failing step"):
        quiet_trainer(tmp_path, [pskd, on_exception], max_epochs=3).fit(StopsIn("fail"), loader)
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="taken during epoch 2: PS-KD resumes from a checkpoint taken at an epoch"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(lightning_run.Classifier(), loader,
                                                          ckpt_path=tmp_path / "exception" / "on_exception.ckpt")
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1]


def test_a_fresh_start_takes_over_a_store_its_first_try_sealed_nothing_into(tmp_path):
    """A job that dies in epoch 1, before any checkpoint, is launched again as it was: there
    is nothing to resume, and the store it made is its own; not while another run's part of
    epoch 1 waits for its seal."""
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(RuntimeError, match="a failing step"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(StopsIn("fail", epoch=1), loader)
    assert exit_code(forked(_close_a_part_of_epoch_1, tmp_path / "store")) == 0  # another run's ranks, closed
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="already exists .*\\(if a run is writing its first epoch there now, it is "
                                         "that run's"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader)
    assert SoftTargetStore.open(tmp_path / "store").staging(1).parts()[0].rows == 4  # left as it was
    SoftTargetStore.open(tmp_path / "store").discard_staging(1)
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(RuntimeError, match="a failing step"):  # the job dies in its first epoch
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(StopsIn("fail", epoch=1), loader)
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == []
    pskd, loader = wrapped(tmp_path)  # and is launched again
    quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader)
    assert SoftTargetStore.open(tmp_path / "store").epoch_info(1)["ids_written"] == lightning_run.N


def _close_a_part_of_epoch_1(url: Path) -> None:
    with SoftTargetStore.open(url).writer(1) as writer:
        writer.write(torch.arange(4), torch.randn(4, K))


def test_a_resume_refuses_a_store_another_run_sealed_into_since(tmp_path):
    """Run A checkpoints epoch 2; run B trains into the same store (overwrite=True); A's
    resume would serve B's predictions as its teachers."""
    pskd, loader = wrapped(tmp_path)
    epochs = ModelCheckpoint(dirpath=tmp_path / "a", filename="{epoch}", save_top_k=-1)
    quiet_trainer(tmp_path, [pskd, epochs], max_epochs=3).fit(StopsIn("stop", epoch=3), loader)
    pskd, loader = wrapped(tmp_path, overwrite=True)
    quiet_trainer(tmp_path / "b", [pskd], max_epochs=3).fit(lightning_run.Classifier(), loader)
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="holds an epoch 2 that another run sealed .* Resume with the run's own store"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(lightning_run.Classifier(), loader,
                                                          ckpt_path=tmp_path / "a" / "epoch=1.ckpt")
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]  # B's, not rolled back


def test_an_epoch_stopped_early_is_sealed_with_the_rows_it_trained(tmp_path):
    pskd, loader = wrapped(tmp_path)
    quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(StopsIn("stop"), loader)
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2]
    assert store.epoch_info(2)["ids_written"] == 3 * 16  # the rest carried forward


def test_resuming_what_cannot_be_resumed_is_refused(tmp_path):
    pskd, loader = wrapped(tmp_path)
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    quiet_trainer(tmp_path, [pskd, steps], max_epochs=1).fit(lightning_run.Classifier(), loader)
    mid_epoch = tmp_path / "steps" / "step=2.ckpt"
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="taken during epoch 1: PS-KD resumes from a checkpoint taken at an epoch"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader, ckpt_path=mid_epoch)
    pskd, loader = wrapped(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="kept its predictions in .*: resume with PSKD"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader, ckpt_path=mid_epoch)
    state = torch.load(mid_epoch, weights_only=False)
    del state["callbacks"]["PSKD"]
    torch.save(state, tmp_path / "without.ckpt")
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="holds no PSKD state"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader,
                                                          ckpt_path=tmp_path / "without.ckpt")


def test_a_resume_with_another_alpha_T_or_number_of_epochs_is_refused_before_the_store_changes(tmp_path):
    pskd, loader = wrapped(tmp_path, keep_epochs=3)
    epochs = ModelCheckpoint(dirpath=tmp_path / "epochs", filename="{epoch}", save_top_k=-1)
    quiet_trainer(tmp_path, [pskd, epochs], max_epochs=3).fit(lightning_run.Classifier(), loader)
    after_epoch_2 = tmp_path / "epochs" / "epoch=1.ckpt"
    for alpha_T, max_epochs in ((0.8, 6), (0.3, 3)):  # max_epochs raised on a resume: T changes
        pskd, loader = wrapped(tmp_path, alpha_T=alpha_T, keep_epochs=3)
        with pytest.raises(StoreError, match=rf"trained with alpha_T=0.8 over 3 epochs, this one with "
                                             rf"alpha_T={alpha_T} over {max_epochs}: .* from epoch 3 on"):
            quiet_trainer(tmp_path, [pskd], max_epochs=max_epochs).fit(lightning_run.Classifier(), loader,
                                                                       ckpt_path=after_epoch_2)
        assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]  # not rolled back
    pskd, loader = wrapped(tmp_path, keep_epochs=3)
    quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(lightning_run.Classifier(), loader, ckpt_path=after_epoch_2)
    assert SoftTargetStore.open(tmp_path / "store").epoch_info(3)["schedule"] == {"alpha_T": 0.8, "total_epochs": 3}


def test_a_numpy_alpha_T_is_recorded_as_a_number(tmp_path):
    pskd, loader = wrapped(tmp_path, alpha_T=np.float32(0.5))
    quiet_trainer(tmp_path, [pskd], max_epochs=1).fit(lightning_run.Classifier(), loader)
    assert SoftTargetStore.open(tmp_path / "store").epoch_info(1)["schedule"] == {"alpha_T": 0.5, "total_epochs": 1}


def test_a_checkpoint_of_an_epochs_last_step_resumes_into_the_next_epoch(tmp_path):
    """``ModelCheckpoint(every_n_train_steps=...)`` runs after this callback, so a step that
    ends an epoch is saved after its seal: epoch 1 sealed, nothing being written. Lightning
    resumes such a checkpoint into epoch 2 without ``on_train_epoch_start``; the writer of
    epoch 2 is opened all the same, and epoch 2 trains on epoch 1's predictions."""
    pskd, loader = wrapped(tmp_path, keep_epochs=EPOCHS)  # epoch 1's teacher kept for the resume
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = lightning_run.Classifier()
    quiet_trainer(tmp_path, [pskd, steps], max_epochs=EPOCHS).fit(first, loader)  # 96 samples: 6 steps an epoch
    last_step_of_epoch_1 = tmp_path / "steps" / "step=6.ckpt"
    assert torch.load(last_step_of_epoch_1, weights_only=False)["callbacks"]["PSKD"]["writing"] is False
    pskd, loader = wrapped(tmp_path, keep_epochs=EPOCHS)
    resumed = lightning_run.Classifier()
    quiet_trainer(tmp_path, [pskd], max_epochs=EPOCHS).fit(resumed, loader, ckpt_path=last_step_of_epoch_1)
    assert sorted({epoch for epoch, *_ in resumed.seen}) == [2, 3, 4]
    assert assert_targets_are_eq6(resumed.seen, first.seen + resumed.seen) == 3 * lightning_run.N
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3, 4]


def test_a_store_behind_its_checkpoint_is_refused(tmp_path):
    fit(tmp_path, epochs=2)
    SoftTargetStore.open(tmp_path / "store").rollback(1)
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(StoreError, match="has sealed epochs \\[1\\] but the checkpoint being resumed was taken "
                                         "after epoch 2"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(lightning_run.Classifier(), loader,
                                                          ckpt_path=tmp_path / "checkpoints" / "epoch=1.ckpt")


def test_a_callback_without_its_data_set_or_epochs_is_refused(tmp_path):
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(RuntimeError, match="one callback per data set"):
        pskd.wrap(lightning_run.blobs())
    with pytest.raises(ValueError, match="set L.Trainer\\(max_epochs=T\\)"):
        quiet_trainer(tmp_path, [pskd], max_epochs=-1, max_steps=4).fit(lightning_run.Classifier(), loader)
    with pytest.warns(UserWarning, match="Setting it to 1000"):  # Lightning's T when max_epochs is not given
        with pytest.raises(ValueError, match="max_epochs is 1000, what Lightning sets when max_epochs is not given: "
                                             ".* also PSKD\\(..., epochs=1000\\)"):
            quiet_trainer(tmp_path, [pskd]).fit(lightning_run.Classifier(), loader)
    with pytest.raises(ValueError, match="max_steps=5 may stop the run before max_epochs"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3, max_steps=5).fit(lightning_run.Classifier(), loader)
    with pytest.raises(ValueError, match="max_steps=1 may stop .*\\(fast_dev_run and Tuner.lr_find set it: run those "
                                         "without the PSKD callback"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3, fast_dev_run=True).fit(lightning_run.Classifier(), loader)
    pskd, loader = wrapped(tmp_path / "two", epochs=3)
    with pytest.raises(ValueError, match="PSKD\\(epochs=3\\) but L.Trainer\\(max_epochs=2\\)"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader)
    pskd, loader = wrapped(tmp_path / "three", epochs=2)
    quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(lightning_run.Classifier(), loader)
    assert SoftTargetStore.open(tmp_path / "three" / "store").epoch_info(2)["schedule"]["total_epochs"] == 2
    bare = PSKD(tmp_path / "bare", num_classes=K)
    with pytest.raises(RuntimeError, match="wrap the training data set"):
        quiet_trainer(tmp_path, [bare], max_epochs=1).fit(lightning_run.Classifier(), loader)


def test_gradient_accumulation_records_every_micro_batch_and_serves_eq6(tmp_path):
    pskd, loader = wrapped(tmp_path)
    module = lightning_run.Classifier()
    quiet_trainer(tmp_path, [pskd], max_epochs=EPOCHS, accumulate_grad_batches=2).fit(module, loader)
    assert assert_targets_are_eq6(module.seen) == (EPOCHS - 1) * lightning_run.N
    final = last_predictions(module.seen, EPOCHS)
    stored = SoftTargetStore.open(tmp_path / "store").read_epoch(EPOCHS)
    np.testing.assert_array_equal(stored, torch.stack([final[i] for i in range(lightning_run.N)]).half().numpy())


class Skips(lightning_run.Classifier):
    """Returns None from training_step (Lightning's skip) at the second step of epoch 2."""

    def training_step(self, batch, batch_idx):
        step = super().training_step(batch, batch_idx)
        return None if self.current_epoch == 1 and batch_idx == 1 else step


def test_a_skipped_batch_records_nothing_and_its_samples_carry_forward(tmp_path):
    pskd, loader = wrapped(tmp_path)
    quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(Skips(), loader)
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2, 3]
    assert [store.epoch_info(epoch)["ids_written"] for epoch in (1, 2, 3)] == [96, 80, 96]


class LogitsNone(lightning_run.Classifier):
    """Returns its loss and, by mistake, no logits: Lightning trains on, nothing is recorded."""

    def training_step(self, batch, batch_idx):
        return {**super().training_step(batch, batch_idx), "logits": None}


class LogitsNoneInEpoch2(lightning_run.Classifier):
    def training_step(self, batch, batch_idx):
        step = super().training_step(batch, batch_idx)
        return {**step, "logits": None} if self.current_epoch == 1 else step


def test_an_epoch_that_recorded_nothing_is_sealed_and_said(tmp_path):
    pskd, loader = wrapped(tmp_path)
    with pytest.warns(RuntimeWarning, match="epoch 1 recorded no predictions: .* one-hot label, so PS-KD trains as "
                                            "cross-entropy"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(LogitsNone(), loader)
    store = SoftTargetStore.open(tmp_path / "store")
    assert [store.epoch_info(epoch)["ids_written"] for epoch in (1, 2)] == [0, 0]
    pskd, loader = wrapped(tmp_path / "later", overwrite=True)
    with pytest.warns(RuntimeWarning, match="epoch 2 recorded no predictions: .* blend epoch 1's predictions again"):
        quiet_trainer(tmp_path, [pskd], max_epochs=3).fit(LogitsNoneInEpoch2(), loader)


class StepsByHand(lightning_run.Classifier):
    """Manual optimization, as Lightning's examples write it: training_step returns nothing."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx)["loss"])
        optimizer.step()


def test_manual_optimization_returning_nothing_is_refused_not_taken_for_skipped_batches(tmp_path):
    pskd, loader = wrapped(tmp_path)
    with pytest.raises(ValueError, match="training_step must return a dict with the batch's logits under 'logits'"):
        quiet_trainer(tmp_path, [pskd], max_epochs=2).fit(StepsByHand(), loader)


def test_a_second_fit_of_the_same_trainer_is_refused_before_the_store_changes(tmp_path):
    pskd, loader = wrapped(tmp_path, overwrite=True)
    trainer = quiet_trainer(tmp_path, [pskd], max_epochs=2)
    trainer.fit(lightning_run.Classifier(), loader)
    trainer.fit_loop.max_epochs = 4  # the way Lightning's users train on
    with pytest.raises(StoreError, match="this Trainer already trained 2 epochs: PS-KD goes on with a run only from "
                                         "its checkpoint"):
        trainer.fit(lightning_run.Classifier(), loader)
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2]


class TrainsOnTheFirst(lightning_run.Classifier):
    """Given several training DataLoaders, trains on the first one's batch."""

    def training_step(self, batch, batch_idx):
        return super().training_step(next(iter(batch.values())) if isinstance(batch, dict) else batch[0], batch_idx)


def _as_dict(batch) -> dict:
    return dict(zip(("inputs", "targets", "labels", "ids"), collate_soft_targets(batch)))


class ReadsDictBatches(lightning_run.Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step(tuple(batch.values()), batch_idx)


def test_several_training_dataloaders_and_dict_batches_are_refused_naming_why(tmp_path):
    refused = "PSKD reads each training batch as .* a tuple of 4 fields, the ids last; this one is a {}"
    for several, kind, module in (
            (lambda loader: [loader, loader], "list", TrainsOnTheFirst), (lambda loader: [loader] * 4, "list",
                                                                           TrainsOnTheFirst),
            (lambda loader: {"a": loader}, "dict", TrainsOnTheFirst),
            (lambda loader: DataLoader(loader.dataset, batch_size=16, collate_fn=_as_dict), "dict", ReadsDictBatches)):
        pskd, loader = wrapped(tmp_path, overwrite=True)
        loaders = several(loader)
        with pytest.raises(ValueError, match=refused.format(kind)):
            quiet_trainer(tmp_path, [pskd], max_epochs=1).fit(module(), loaders)


class Unreadable(torch.utils.data.Dataset):
    """A data set of ``count`` items that refuses to be read."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        raise AssertionError("an item was read")


class TokenTagger(pl.LightningModule):
    """A per-position classifier (embedding, linear) that keeps each step's logits and loss."""

    def __init__(self, vocabulary: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, 16)
        self.head = torch.nn.Linear(16, vocabulary)
        self.seen: list[tuple] = []

    def training_step(self, batch, batch_idx):
        inputs, labels, probs, classes, alpha, ids = batch
        logits = self.head(self.embed(inputs))
        loss = token_soft_cross_entropy(logits, labels, probs, classes, alpha)
        self.seen.append((self.current_epoch + 1, ids.clone(), logits.detach().clone(), labels.clone(), loss.detach()))
        return {"loss": loss, "logits": logits}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_per_token_targets_come_from_the_previous_epochs_logits(tmp_path):
    """A sequence store under Lightning: each step's loss is the cross-entropy against the
    dense target rebuilt by hand from the top-3 rows of the logits each target position had
    one epoch earlier, with DataLoader workers."""
    vocabulary, length, count = 20, 8, 48
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocabulary, (count, length), generator=generator)
    labels = torch.where(torch.rand(count, length, generator=generator) < 0.3, -100, (inputs + 1) % vocabulary)
    pskd = PSKD(tmp_path / "store", num_classes=vocabulary, per_token=True, topk=3)
    loader = DataLoader(pskd.wrap(torch.utils.data.TensorDataset(inputs, labels)), batch_size=16, shuffle=True,
                        num_workers=2, persistent_workers=True)
    torch.manual_seed(0)
    module = TokenTagger(vocabulary)
    quiet_trainer(tmp_path, [pskd], max_epochs=3, enable_checkpointing=False).fit(module, loader)
    encoding = row_encoding(vocabulary, "float16", 3)
    rows = {}  # (epoch, id) -> rebuilt (L, V) rows
    for epoch, ids, logits, _, _ in module.seen:
        for i, sample in zip(ids.tolist(), logits):
            rows[epoch, i] = torch.from_numpy(encoding.expand(encoding.encode(sample.softmax(dim=1)).numpy()))
    for epoch, ids, logits, batch_labels, loss in module.seen:
        keep = batch_labels != -100
        alpha = ALPHA_T * epoch / 3
        targets = F.one_hot(batch_labels[keep], vocabulary).float()
        if epoch > 1:
            past = torch.stack([rows[epoch - 1, i] for i in ids.tolist()])[keep]
            targets = (1 - alpha) * targets + alpha * past
        torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets), rtol=0, atol=1e-6)
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2, 3] and store.num_samples == int((labels != -100).sum())
    keep = labels != -100
    final = torch.cat([rows[3, i][keep[i]] for i in range(count)])
    assert (torch.from_numpy(store.read_epoch(3)) == final).all()
    # given each sample's labels, wrap() reads no item: the labels alone make the store's rows
    given = PSKD(tmp_path / "other", num_classes=vocabulary, per_token=True).wrap(Unreadable(count), labels=labels)
    wrapped = pskd.data
    assert np.array_equal(given.labels, wrapped.labels) and np.array_equal(given.lengths, wrapped.lengths)
