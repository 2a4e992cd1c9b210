"""PS-KD in a real Hugging Face Trainer (tests/transformers_run.py): each step's loss is the
cross-entropy against Eq. 6 of the logits the previous epoch produced, with DataLoader
workers; a run killed mid-epoch resumes from its checkpoint into an uninterrupted run."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the Hugging Face integration needs pip install -e '.[transformers]'")
pytest.importorskip("accelerate", reason="the Hugging Face integration needs pip install -e '.[transformers]'")

from conftest import exit_code, forked  # noqa: E402
from transformers_run import K, N, fine_tune, tokenizer  # noqa: E402  (tests/ is on the path)

from pskd_store import SoftTargetStore, StoreError  # noqa: E402
from pskd_store.integrations.transformers import PSKDTrainer  # noqa: E402
from pskd_store.loss import soft_target  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_state_kept")
SCRIPT = Path(__file__).with_name("transformers_run.py")
ALPHA_T, EPOCHS = 0.8, 3


def assert_losses_are_pskds(seen: list[tuple], written: list[tuple] | None = None) -> int:
    """Every step's loss is CE against (1 - a_t)·onehot + a_t·p_{t-1}, p_{t-1} the float16
    softmax of the last logits ``written`` for each id in epoch t - 1 (one-hot in epoch 1)."""
    written = seen if written is None else written
    checked = 0
    for epoch, ids, logits, loss in seen:
        labels = ids % K  # sentences(): label = index mod K
        target = F.one_hot(labels, K).float()
        if epoch > 1:
            past = {}
            for step_epoch, step_ids, step_logits, _ in written:
                if step_epoch == epoch - 1:
                    past.update(zip(step_ids.tolist(), step_logits.float().softmax(dim=1).half().float()))
            alpha = ALPHA_T * epoch / EPOCHS
            target = (1 - alpha) * target + alpha * torch.stack([past[i] for i in ids.tolist()])
            checked += len(ids)
        torch.testing.assert_close(loss, F.cross_entropy(logits.float(), target), rtol=0, atol=1e-6)
    return checked


def test_fine_tuning_with_workers_trains_on_eq6_and_seals_each_epoch(tmp_path):
    trainer = fine_tune(tmp_path, epochs=EPOCHS, workers=2, arguments={"eval_strategy": "epoch"})
    assert trainer.state.log_history[-2]["eval_loss"] > 0  # evaluation batches keep the model's own loss
    assert sorted(i for epoch, ids, *_ in trainer.seen if epoch == 2 for i in ids.tolist()) == list(range(N))
    assert assert_losses_are_pskds(trainer.seen) == (EPOCHS - 1) * N
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2, 3]
    last = {}
    for epoch, ids, logits, _ in trainer.seen:
        if epoch == 3:
            last.update(zip(ids.tolist(), logits.float().softmax(dim=1).half().float()))
    assert (torch.from_numpy(store.read_epoch(3)).float() == torch.stack([last[i] for i in range(N)])).all()


@pytest.mark.slow
def test_a_run_killed_after_a_seal_resumes_from_its_checkpoint_into_an_uninterrupted_run(tmp_path):
    """Killed after epoch 3 was sealed and before its checkpoint: the resume from epoch 2's
    checkpoint rolls the store back and repeats epoch 3 exactly, with DataLoader workers."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    fine_tune(whole, epochs=EPOCHS)
    assert exit_code(forked(fine_tune, killed, kill_in_epoch=3)) == -signal.SIGKILL
    assert SoftTargetStore.open(killed / "store").sealed_epochs == [1, 2, 3]
    resumed = fine_tune(killed, epochs=EPOCHS, resume=True)
    assert {epoch for epoch, *_ in resumed.seen} == {3}
    assert assert_losses_are_pskds(resumed.seen, torch.load(whole / "seen_rank0.pt")) == N
    for name, value in torch.load(whole / "final.pt").items():
        torch.testing.assert_close(torch.load(killed / "final.pt")[name], value, rtol=0, atol=0)
    stores = [SoftTargetStore.open(root / "store") for root in (whole, killed)]
    assert (stores[0].read_epoch(3) == stores[1].read_epoch(3)).all()


def test_a_store_left_by_another_run_is_refused_naming_the_fix(tmp_path):
    fine_tune(tmp_path, epochs=1, workers=0)
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        fine_tune(tmp_path, epochs=1, workers=0)
    fine_tune(tmp_path, epochs=1, workers=0, overwrite=True)


def test_a_resume_refuses_a_store_another_run_sealed_into_since(tmp_path):
    """Run A's checkpoint of epoch 2, resumed after run B trained into the same store
    (overwrite=True): B's predictions are not A's teachers."""
    fine_tune(tmp_path, epochs=EPOCHS, workers=0)
    after_epoch_2 = sorted((tmp_path / "checkpoints").iterdir(), key=lambda path: int(path.name.split("-")[1]))[1]
    shutil.copytree(after_epoch_2, tmp_path / "a_after_epoch_2")
    fine_tune(tmp_path, epochs=EPOCHS, workers=0, overwrite=True)
    with pytest.raises(StoreError, match="holds an epoch 2 that another run sealed .* Resume with the run's own store"):
        fine_tune(tmp_path, epochs=EPOCHS, workers=0, resume=str(tmp_path / "a_after_epoch_2"))
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]  # B's, not rolled back
    fine_tune(tmp_path, epochs=EPOCHS, workers=0, resume=str(after_epoch_2))  # B's own checkpoint resumes


def test_a_run_killed_before_its_first_seal_is_started_again_into_its_store(tmp_path):
    """Nothing sealed, no checkpoint: the same command again takes the store over, the dead
    writer's rows given up."""
    assert exit_code(forked(fine_tune, tmp_path, epochs=1, workers=0, kill_at_step=2)) == -signal.SIGKILL
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == []
    fine_tune(tmp_path, epochs=1, workers=0)
    assert SoftTargetStore.open(tmp_path / "store").epoch_info(1)["ids_written"] == N


class OutOfMemoryOnce(PSKDTrainer):
    """Fails its step ``at_step`` once as a GPU out of memory does; auto_find_batch_size then
    trains again, in this process, with a smaller batch, from step 0."""

    at_step, failed = 1, False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.state.global_step == self.at_step and not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("at_step", [1, 7])  # in epoch 1; in epoch 2, epoch 1 sealed
def test_a_retry_with_a_smaller_batch_trains_into_the_store_the_failed_try_made(tmp_path, at_step):
    trainer = fine_tune(tmp_path, train=False, arguments={"auto_find_batch_size": True, "num_train_epochs": 2})
    retrying = OutOfMemoryOnce(model=trainer.model, args=trainer.args, train_dataset=trainer.pskd_base,
                               data_collator=trainer.data_collator, pskd_store=tmp_path / "store")
    retrying.at_step = at_step
    retrying.train()
    assert retrying._train_batch_size < 16 and retrying.failed  # accelerate took 10% off
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2] and store.epoch_info(1)["ids_written"] == N


class FailsInEpoch2(PSKDTrainer):
    """Fails its eighth step (the second of epoch 2, six steps an epoch) once, as an
    interrupted notebook cell does."""

    failed = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.state.global_step == 7 and not FailsInEpoch2.failed:
            FailsInEpoch2.failed = True
            raise KeyboardInterrupt
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_train_called_again_after_a_try_that_sealed_epochs_is_refused_keeping_them(tmp_path):
    """The epochs the failed try sealed are the teachers its checkpoints resume with: a
    start from step 0 into the store is refused as any start into another run's store is."""
    trainer = fine_tune(tmp_path, train=False, workers=0)
    again = FailsInEpoch2(model=trainer.model, args=trainer.args, train_dataset=trainer.pskd_base,
                          data_collator=trainer.data_collator, pskd_store=tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        again.train()
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        again.train()
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1]
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-6"))
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]


def test_evaluating_the_training_set_keeps_the_models_own_loss_and_records_nothing(tmp_path):
    trainer = fine_tune(tmp_path, epochs=2, workers=0)
    store = SoftTargetStore.open(tmp_path / "store")
    before = store.epoch_info(2)["seal_token"]
    metrics = trainer.evaluate(trainer.train_dataset)
    assert metrics["eval_loss"] > 0 and SoftTargetStore.open(tmp_path / "store").epoch_info(2)["seal_token"] == before


@pytest.mark.parametrize("returns", ["tuple", "logits", "scores"])
def test_a_model_returning_a_tuple_or_its_logits_trains(tmp_path, returns):
    trainer = fine_tune(tmp_path, train=False, arguments={"remove_unused_columns": False})  # forward(**inputs)

    class Plain(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            logits = self.model(**inputs).logits
            return {"tuple": (logits,), "logits": logits, "scores": {"scores": logits}}[returns]

    plain = PSKDTrainer(model=Plain(trainer.model), args=trainer.args, train_dataset=trainer.pskd_base,
                        data_collator=trainer.data_collator, pskd_store=tmp_path / "store", num_classes=K)
    if returns == "scores":
        with pytest.raises(TypeError, match="PSKDTrainer reads the model's logits from its output, a dict with no "
                                            "'logits'"):
            plain.train()
        return
    plain.train()
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]


@pytest.mark.parametrize("average", [True, False])
def test_under_data_parallel_the_loss_is_the_batchs_mean_cross_entropy(tmp_path, average):
    """With several GPUs and no torchrun the Trainer wraps the model in DataParallel: its
    outputs are the whole batch's, gathered, the Trainer hands the targets' count once per
    GPU, (n_gpu, 1), each the step's (its n-th, not averaged across devices), and averages
    what compute_loss returns. That is still the batch's mean cross-entropy (epoch 1: one-hot)."""
    trainer = fine_tune(tmp_path, epochs=1, workers=0, train=False,
                        arguments={"average_tokens_across_devices": average})
    trainer.open_store(0)
    trainer.session.begin_epoch(1)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.args._n_gpu = 2  # what TrainingArguments finds on a machine with two GPUs
    count = torch.tensor(len(batch["labels"]))
    num_items = (count if average else count // 2).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        logits = trainer.model.train()(**{k: v for k, v in batch.items() if k not in ("labels", "pskd_id")}).logits
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items).mean()  # training_step's
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch["labels"]).item(), rel=1e-6)
    trainer.session.abandon()


def test_a_resume_with_another_number_of_steps_an_epoch_is_refused(tmp_path):
    """Resumed with a larger batch, the Trainer would count the checkpoint's 12 steps as 3
    of its epochs of 4 steps, and PS-KD 2: their epochs would part, a_t and the seals with them."""
    fine_tune(tmp_path, epochs=EPOCHS, workers=0)
    with pytest.raises(ValueError, match="after 12 steps, but this Trainer takes 4 steps an epoch .* resume with the "
                                         "run's batch size"):
        fine_tune(tmp_path, epochs=EPOCHS, workers=0, resume=str(tmp_path / "checkpoints" / "checkpoint-12"),
                  arguments={"per_device_train_batch_size": 24})
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]  # not rolled back


def test_a_resume_over_another_number_of_epochs_is_refused(tmp_path):
    fine_tune(tmp_path, epochs=2, workers=0)
    with pytest.raises(StoreError, match=r"trained with alpha_T=0.8 over 2 epochs, this one with alpha_T=0.8 over 4"):
        fine_tune(tmp_path, epochs=4, workers=0, resume=True)
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2]


def test_what_pskd_cannot_count_in_epochs_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Trainer made without arguments makes its default ./tmp_trainer
    with pytest.raises(ValueError, match="set num_train_epochs, not max_steps"):
        fine_tune(tmp_path / "steps", workers=0, arguments={"max_steps": 4})
    mid_epoch = tmp_path / "mid"
    fine_tune(mid_epoch, epochs=1, workers=0, arguments={"save_strategy": "steps", "save_steps": 3})
    with pytest.raises(StoreError, match="epoch is 0.5, not a whole number of epochs.*save_strategy='epoch'"):
        fine_tune(mid_epoch, epochs=1, workers=0, resume=str(mid_epoch / "checkpoints" / "checkpoint-3"))
    with pytest.raises(ValueError, match="PSKDTrainer needs a train_dataset"):
        PSKDTrainer(model=fine_tune(tmp_path / "model", train=False).model, pskd_store=tmp_path / "none")
    with pytest.raises(ValueError, match="training loss is PS-KD's: drop label_smoothing_factor"):
        fine_tune(tmp_path / "smoothed", train=False, arguments={"label_smoothing_factor": 0.1})


def test_gradient_accumulation_averages_its_micro_batches(tmp_path):
    """Two accumulated micro-batches step as one batch of both does (plain SGD, one epoch):
    28 + 28 records as 56, then 28 + 12 as 40, each record weighing as much as any other."""
    sgd = {"optim": "sgd", "learning_rate": 0.5}
    fine_tune(tmp_path / "one", epochs=1, workers=0, arguments=sgd | {"per_device_train_batch_size": 56})
    fine_tune(tmp_path / "two", epochs=1, workers=0, arguments=sgd | {"per_device_train_batch_size": 28,
                                                                      "gradient_accumulation_steps": 2})
    one, two = (torch.load(tmp_path / run / "final.pt") for run in ("one", "two"))
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_trains_each_ranks_shard(tmp_path):
    result = subprocess.run(["torchrun", "--nproc-per-node", "2", str(SCRIPT), str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [torch.load(tmp_path / f"seen_rank{rank}.pt") for rank in (0, 1)]
    shards = [{i for epoch, ids, *_ in s if epoch == 1 for i in ids.tolist()} for s in seen]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == N
    both = seen[0] + seen[1]  # each epoch's teacher holds every rank's predictions
    assert sum(assert_losses_are_pskds(s, both) for s in seen) == (EPOCHS - 1) * N
    assert SoftTargetStore.open(tmp_path / "store").sealed_epochs == [1, 2, 3]


class TokenRecording(PSKDTrainer):
    """Keeps each training step's (epoch, ids, logits, labels, loss)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, labels = inputs.get("pskd_id"), inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if ids is not None:
            self.seen.append((self.session.epoch, ids.clone(), outputs["logits"].detach().clone(), labels.clone(),
                              loss.detach()))
        return (loss, outputs) if return_outputs else loss


def test_a_causal_language_model_trains_on_per_token_targets_from_its_previous_epoch(tmp_path):
    """GPT-2 from a config: each record's prompt (its first 3 tokens) is no target; every step's
    loss is the cross-entropy against the dense target rebuilt by hand from the top-4 rows of
    the logits each target position had one epoch earlier (shifted as the model's own loss)."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, default_data_collator

    from pskd_store.row_encoding import row_encoding

    vocabulary, length, count = 30, 12, 40
    generator = torch.Generator().manual_seed(0)
    records = []
    for _ in range(count):
        tokens = torch.randint(0, vocabulary, (length,), generator=generator)
        labels = tokens.clone()
        labels[:3] = -100
        records.append({"input_ids": tokens, "attention_mask": torch.ones(length, dtype=torch.int64),
                        "labels": labels})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocabulary, n_positions=length, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), num_train_epochs=EPOCHS,
                             per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no",
                             logging_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
    trainer = TokenRecording(model=model, args=args, train_dataset=records, data_collator=default_data_collator,
                             pskd_store=tmp_path / "store", alpha_T=ALPHA_T, per_token=True,
                             store_options={"topk": 4})
    trainer.train()
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.sealed_epochs == [1, 2, 3] and store.num_samples == count * (length - 3)  # shifted: 9 targets
    encoding = row_encoding(vocabulary, "float16", 4)
    rows = {}  # (epoch, id) -> the rebuilt (9, V) teacher rows of its target positions
    for epoch, ids, logits, labels, _ in trainer.seen:
        for i, sample_logits in zip(ids.tolist(), logits[:, 2:-1]):  # positions 2..10 predict tokens 3..11
            rows[epoch, i] = torch.from_numpy(encoding.expand(encoding.encode(sample_logits.softmax(dim=1)).numpy()))
    checked = 0
    for epoch, ids, logits, labels, loss in trainer.seen:
        targets = labels[:, 3:].reshape(-1)
        past = torch.cat([rows[epoch - 1, i] for i in ids.tolist()]) if epoch > 1 else None
        alpha = ALPHA_T * epoch / EPOCHS
        dense = F.one_hot(targets, vocabulary).float() if past is None else torch.stack(
            [soft_target(y, p, alpha) for y, p in zip(targets, past)])
        expected = F.cross_entropy(logits[:, 2:-1].reshape(-1, vocabulary), dense)
        torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
        checked += epoch > 1
    assert checked == 2 * 5  # epochs 2 and 3, five batches each
    final = torch.cat([rows[3, i] for i in range(count)])
    assert (torch.from_numpy(store.read_epoch(3)) == final).all()


def test_a_translation_model_trains_on_per_token_targets_with_padded_labels(tmp_path):
    """T5 from a config, targets of 2-7 tokens padded with -100 by DataCollatorForSeq2Seq: the
    decoder's logits are the targets' own (no shift), each step's loss is CE against the
    dense target rebuilt by hand from the previous epoch's top-4 rows, and the last epoch is
    stored as those rows."""
    from transformers import DataCollatorForSeq2Seq, T5Config, T5ForConditionalGeneration, TrainingArguments

    from pskd_store.row_encoding import row_encoding

    vocabulary, count = 30, 32
    generator = torch.Generator().manual_seed(1)
    records = []
    for _ in range(count):
        source = torch.randint(1, vocabulary, (int(torch.randint(3, 9, (1,), generator=generator)),),
                               generator=generator)
        target = (source[:int(torch.randint(2, 8, (1,), generator=generator))] + 1) % vocabulary
        records.append({"input_ids": source.tolist(), "attention_mask": [1] * len(source), "labels": target.tolist()})
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=vocabulary, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                                                pad_token_id=0, dropout_rate=0.0))

    class Pads:  # what DataCollatorForSeq2Seq needs of a tokenizer to pad input ids
        pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids", "attention_mask"]

        def __init__(self, keep_other_columns: bool = True):
            self.keep = keep_other_columns

        def pad(self, features, **options):  # as a tokenizer pads: other columns are kept as they are
            width = max(len(f["input_ids"]) for f in features)
            batch = {key: torch.tensor([f[key] + [0] * (width - len(f[key])) for f in features])
                     for key in ("input_ids", "attention_mask")}
            others = {key: torch.tensor([f[key] for f in features]) for key in features[0] if key not in batch}
            return {**batch, **others} if self.keep else batch

    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), num_train_epochs=EPOCHS,
                             per_device_train_batch_size=8, learning_rate=1e-2, save_strategy="no",
                             logging_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True)
    trainer = TokenRecording(model=model, args=args, train_dataset=records,
                             data_collator=DataCollatorForSeq2Seq(Pads()), pskd_store=tmp_path / "store",
                             alpha_T=ALPHA_T, per_token=True, store_options={"topk": 4})
    trainer.train()
    assert len(trainer.seen) == EPOCHS * 4
    encoding = row_encoding(vocabulary, "float16", 4)
    rows = {}  # (epoch, id) -> the rebuilt rows of its target positions
    for epoch, ids, logits, labels, _ in trainer.seen:
        for i, sample_logits, sample_labels in zip(ids.tolist(), logits, labels):
            kept = sample_logits[sample_labels != -100].softmax(dim=1)
            rows[epoch, i] = torch.from_numpy(encoding.expand(encoding.encode(kept).numpy()))
    for epoch, ids, logits, labels, loss in trainer.seen:
        keep = labels != -100
        dense = F.one_hot(labels[keep], vocabulary).float()
        if epoch > 1:
            alpha = ALPHA_T * epoch / EPOCHS
            dense = (1 - alpha) * dense + alpha * torch.cat([rows[epoch - 1, i] for i in ids.tolist()])
        torch.testing.assert_close(loss, F.cross_entropy(logits[keep], dense), rtol=0, atol=1e-6)
    store = SoftTargetStore.open(tmp_path / "store")
    assert store.num_samples == sum(len(r["labels"]) for r in records)
    assert (torch.from_numpy(store.read_epoch(3)) == torch.cat([rows[3, i] for i in range(count)])).all()
    dropping = TokenRecording(model=model, args=args, train_dataset=records, pskd_store=tmp_path / "other",
                              data_collator=DataCollatorForSeq2Seq(Pads(keep_other_columns=False)),
                              alpha_T=ALPHA_T, per_token=True, store_options={"topk": 4})
    with pytest.raises(StoreError, match="a training batch came without 'pskd_id'.* keeps extra columns"):
        dropping.train()


def _trained_weights(trainer_class, model, arguments: dict, records: list, collator, **pskd_options) -> dict:
    from transformers import TrainingArguments

    args = TrainingArguments(**{"num_train_epochs": 1, "optim": "sgd", "learning_rate": 0.5,
                                "gradient_accumulation_steps": 2, "save_strategy": "no", "logging_strategy": "no",
                                "report_to": [], "seed": 0, "use_cpu": True, "disable_tqdm": True} | arguments)
    trainer_class(model=model, args=args, train_dataset=records, data_collator=collator, **pskd_options).train()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_a_masked_lm_per_token_trains_each_position_on_its_own_label_as_the_plain_trainer(tmp_path):
    """A masked LM's loss compares each position with its own label, a causal LM's with the
    next one: shifted as a causal LM's, every target and every recorded row would be the
    position before's. At alpha_T = 0 PS-KD's loss is BERT's own."""
    from transformers import BertConfig, BertForMaskedLM

    def model() -> BertForMaskedLM:
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=12, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))

    records = _masked_records(16, 30, 12)
    _assert_trains_as_the_plain_trainer(tmp_path, model, records, {"per_device_train_batch_size": 4})
    assert SoftTargetStore.open(tmp_path / "store").token_rows.num_rows == sum(int((r["labels"] >= 0).sum())
                                                                              for r in records)


def _assert_trains_as_the_plain_trainer(tmp_path: Path, model, records: list, arguments: dict,
                                        **pskd_options) -> None:
    """PS-KD at alpha_T = 0 (every target one-hot) trains ``model()`` into the plain
    Trainer's weights: the same positions against the same labels, the same loss."""
    from transformers import Trainer, default_data_collator

    plain = _trained_weights(Trainer, model(), {"output_dir": str(tmp_path / "plain")} | arguments, records,
                             default_data_collator)
    pskd = _trained_weights(PSKDTrainer, model(), {"output_dir": str(tmp_path / "pskd")} | arguments, records,
                            default_data_collator, pskd_store=tmp_path / "store", alpha_T=0.0, per_token=True,
                            **pskd_options)
    for name, value in plain.items():
        torch.testing.assert_close(pskd[name], value, rtol=0, atol=1e-6)


def _masked_records(count: int, vocabulary: int, length: int, seed: int = 0) -> list[dict]:
    """Records with 2-5 positions of each masked (the last token of the vocabulary) and labelled."""
    generator, records = torch.Generator().manual_seed(seed), []
    for i in range(count):
        tokens = torch.randint(0, vocabulary - 1, (length,), generator=generator)
        masked = torch.randperm(length, generator=generator)[:2 + i % 4]
        labels = torch.full((length,), -100)
        labels[masked] = tokens[masked]
        tokens[masked] = vocabulary - 1
        records.append({"input_ids": tokens, "attention_mask": torch.ones(length, dtype=torch.int64), "labels": labels})
    return records


def test_a_model_computing_a_loss_of_its_own_needs_shift_labels_per_token(tmp_path):
    """XLM's LM head names no loss type and computes its own loss (each position against its
    own label): taken for a causal LM, every target and recorded row would be the position
    before's. Refused until ``shift_labels`` says; with False, PS-KD at alpha_T = 0 trains as
    the plain Trainer."""
    from transformers import XLMConfig, XLMWithLMHeadModel, default_data_collator

    def model() -> XLMWithLMHeadModel:
        torch.manual_seed(0)
        return XLMWithLMHeadModel(XLMConfig(vocab_size=30, emb_dim=16, n_layers=1, n_heads=2, dropout=0.0,
                                            attention_dropout=0.0, max_position_embeddings=12, use_lang_emb=False))

    records = [{k: v for k, v in r.items() if k != "attention_mask"} for r in _masked_records(16, 30, 12)]
    # one micro-batch a step: XLM's forward takes **kwargs, so the Trainer leaves it to normalise
    # by the step's target count, which its own loss (a mean) ignores
    arguments = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match="XLMWithLMHeadModel computes a loss of its own.* pass shift_labels=True or "
                                         "shift_labels=False"):
        _trained_weights(PSKDTrainer, model(), {"output_dir": str(tmp_path / "refused")} | arguments, records,
                         default_data_collator, pskd_store=tmp_path / "refused", alpha_T=0.0, per_token=True)
    _assert_trains_as_the_plain_trainer(tmp_path, model, records, arguments, shift_labels=False)


def test_an_encoder_decoder_computing_a_loss_of_its_own_is_not_shifted(tmp_path):
    """Marian names no loss type and computes its own loss, but an encoder-decoder's decoder
    reads the labels shifted itself: its logits are the labels' own, whatever its class."""
    from transformers import MarianConfig, MarianMTModel, TrainingArguments

    model = MarianMTModel(MarianConfig(vocab_size=30, d_model=16, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, pad_token_id=0, decoder_start_token_id=0))
    arguments = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[], use_cpu=True)
    records = [{"input_ids": [2, 3, 4], "labels": [5, 6, 7]}] * 2
    trainer = PSKDTrainer(model=model, args=arguments, train_dataset=records, pskd_store=tmp_path / "store",
                          per_token=True)
    assert trainer.pskd_shift is False and trainer.pskd_lengths.tolist() == [3, 3]


def test_a_token_classifier_per_token_trains_on_its_labels_as_the_plain_trainer(tmp_path):
    """A token classifier's logits have num_labels classes, not the vocabulary's: the store
    is made for them, and at alpha_T = 0 PS-KD trains as the plain Trainer."""
    from transformers import BertConfig, BertForTokenClassification

    def model() -> BertForTokenClassification:
        torch.manual_seed(0)
        return BertForTokenClassification(BertConfig(
            vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=5))

    records = _masked_records(16, 30, 12)
    for record in records:
        record["labels"] = torch.where(record["labels"] >= 0, record["labels"] % 5, -100)
    _assert_trains_as_the_plain_trainer(tmp_path, model, records, {"per_device_train_batch_size": 4})
    assert SoftTargetStore.open(tmp_path / "store").num_classes == 5


def test_per_token_records_without_labels_are_refused_naming_the_fix(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=12, n_embd=16, n_layer=1, n_head=2))
    arguments = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="reads each training record's 'labels'.* add 'labels' to the records, or "
                                         r"pass labels=\[...\]"):
        PSKDTrainer(model=model, args=arguments, train_dataset=[{"input_ids": [2, 3, 4]}] * 2,
                    pskd_store=tmp_path / "store", per_token=True)


def test_a_causal_lm_padded_on_the_left_is_refused_per_token(tmp_path):
    from transformers import (
        DataCollatorForSeq2Seq,
        GPT2Config,
        GPT2LMHeadModel,
        TrainingArguments,
        default_data_collator,
    )

    left = tokenizer()
    left.padding_side = "left"
    records = [{"input_ids": [2, 3, 4], "labels": [2, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=12, n_embd=16, n_layer=1, n_head=2))
    arguments = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[], use_cpu=True)
    for collator, processing_class in ((DataCollatorForSeq2Seq(left), None), (None, left)):  # None: it pads
        with pytest.raises(ValueError, match="needs right padding: .* Set tokenizer.padding_side = 'right'"):
            PSKDTrainer(model=model, args=arguments, train_dataset=records, data_collator=collator,
                        processing_class=processing_class, pskd_store=tmp_path / "store", per_token=True)
    blocks = [{"input_ids": [2, 3, 4, 5], "labels": [2, 3, 4, 5]}] * 2  # packed to one length: never padded
    PSKDTrainer(model=model, args=arguments, train_dataset=blocks, data_collator=default_data_collator,
                processing_class=left, pskd_store=tmp_path / "store", per_token=True)


def test_per_token_with_alpha_T_0_trains_as_the_plain_trainer_under_gradient_accumulation(tmp_path):
    """alpha_T = 0: every target one-hot, PS-KD's loss GPT-2's own cross-entropy. Two
    micro-batches a step, of unequal counts of target tokens (records of 2-9): the plain
    Trainer has the model divide each one's summed loss by the targets of the whole step
    (``num_items_in_batch``), and so must PSKDTrainer, or a step weighs the tokens of its
    smaller micro-batch more."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, default_data_collator

    def model() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=12, n_embd=32, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    generator, records = torch.Generator().manual_seed(0), []
    for i in range(24):
        tokens = torch.randint(0, 30, (12,), generator=generator)
        labels = tokens.clone()
        labels[:2 + i % 8] = -100  # a prompt of 2-9 tokens: 9 down to 2 targets (shifted)
        records.append({"input_ids": tokens, "attention_mask": torch.ones(12, dtype=torch.int64), "labels": labels})
    arguments = {"per_device_train_batch_size": 4}
    plain = _trained_weights(Trainer, model(), {"output_dir": str(tmp_path / "plain")} | arguments, records,
                             default_data_collator)
    pskd = _trained_weights(PSKDTrainer, model(), {"output_dir": str(tmp_path / "pskd")} | arguments, records,
                            default_data_collator, pskd_store=tmp_path / "store", alpha_T=0.0, per_token=True,
                            store_options={"topk": 4})
    for name, value in plain.items():
        torch.testing.assert_close(pskd[name], value, rtol=0, atol=1e-6)
