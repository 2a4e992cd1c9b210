"""PS-KD in Hugging Face's ``Trainer`` for sequence classification and, with ``per_token=True``,
for language and translation models: a ``Trainer`` whose ``compute_loss`` trains on PS-KD's
targets, as Hugging Face's docs advise for a custom loss.

::

    trainer = PSKDTrainer(model=model, args=TrainingArguments(..., num_train_epochs=T, save_strategy="epoch"),
                          train_dataset=train_set, eval_dataset=test_set, data_collator=collator,
                          pskd_store="run/store", alpha_T=0.8)
    trainer.train()                                  # or train(resume_from_checkpoint=True)

Each training item gets its row index as its store id (``pskd_id``); each batch's targets
are blended in the main process from the memory-mapped teacher, its logits recorded, and
each epoch sealed at its end, before the Trainer saves that epoch's checkpoint. Evaluation
batches (no ``pskd_id``) keep the model's own loss.

With ``per_token=True`` the store is a sequence store (sequences.py): a row per target token
(a record's ``labels`` other than -100; a causal LM's labels shifted by one, as its own loss
shifts them: ``shift_labels`` says so for a model whose class does not tell), top-k rows
chosen where the logits are, and the loss :func:`~pskd_store.loss.token_soft_cross_entropy`
rebuilds each target on the device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.trainer_callback import ExportableState

from ..distributed import Distributed, torchrun_environment
from ..errors import StoreError
from ..loss import token_soft_cross_entropy
from ..sequences import token_labels
from .session import StoreSession

SAMPLE_ID = "pskd_id"


class WithSampleIds(Dataset):
    """A data set of dict records, each with its index added under ``pskd_id``."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return {**self.base[index], SAMPLE_ID: index}


class PSKDTrainer(Trainer):
    """``transformers.Trainer`` training on (1 - a_t)·onehot(y) + a_t·p_{t-1}(x) from a store at
    ``pskd_store``. ``labels`` (index order) spare reading every record's ``labels``/``label``;
    ``num_classes`` defaults to ``model.config.num_labels``; ``overwrite`` replaces a store left
    by an earlier run; ``store_options`` go to :meth:`SoftTargetStore.create` (``{"topk": 8}``
    for a vocabulary). ``per_token`` trains a language or translation model, or a token
    classifier, on per-token targets (``num_classes`` then defaults to
    ``model.config.vocab_size``, a token classifier's to ``num_labels``); ``shift_labels``
    (True: position t predicts token t + 1, as a causal LM's loss has it; False: each
    position its own label) is needed only for a model whose own loss cannot be told from its
    class (XLM's, XLNet's)."""

    def __init__(self, *args: Any, pskd_store: str | Path, alpha_T: float = 0.8,
                 labels: Sequence[int] | np.ndarray | None = None, num_classes: int | None = None,
                 overwrite: bool = False, cache_dir: str | None = None, store_options: dict | None = None,
                 per_token: bool = False, shift_labels: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("PSKDTrainer needs a train_dataset: its row indices are the store's sample ids")
        if self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError("PSKDTrainer's training loss is PS-KD's: drop label_smoothing_factor and "
                             "compute_loss_func, or subclass PSKDTrainer to combine them deliberately")
        self.pskd_url = str(pskd_store)
        self.pskd_options = dict(alpha_T=alpha_T, overwrite=overwrite, cache_dir=cache_dir, **(store_options or {}))
        self.pskd_shift = per_token and _predicts_the_next_token(self.model, shift_labels)
        padder = getattr(self.data_collator, "tokenizer", None)  # a collator that pads (packed blocks: none)
        if self.pskd_shift and getattr(padder, "padding_side", None) == "left":
            raise ValueError(
                "per-token PS-KD of a causal LM needs right padding: padded on the left, a record's first token "
                "becomes a target (predicted from the padding) in some batches and not in others, so its tokens "
                "have no fixed rows in the store. Set tokenizer.padding_side = 'right' for training")
        self.pskd_lengths = None
        if per_token:  # the targets of each record, as its model's loss sees them
            sequences = _token_labels_of(self.train_dataset) if labels is None else labels
            self.pskd_labels, self.pskd_lengths = token_labels(
                np.asarray(sequence)[1:] if self.pskd_shift else sequence for sequence in sequences)
        else:
            self.pskd_labels = _labels_of(self.train_dataset) if labels is None else np.asarray(labels, dtype=np.int64)
        self.pskd_classes = num_classes or (_token_classes(self.model) if per_token else self.model.config.num_labels)
        self.pskd_base = self.train_dataset
        self.train_dataset = WithSampleIds(self.train_dataset)
        self.session: StoreSession | None = None
        self._train_calls = self._session_opened_in = 0  # which train() call opened the session
        self.add_callback(_StoreEpochs(self))
        self.add_callback(SealRecord())

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; each call counted, so that a retry within one (auto_find_batch_size's,
        after an out-of-memory) is told from a new call after a failure."""
        self._train_calls += 1
        return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID not in self._signature_columns:  # the collator would drop it as no forward() argument
            self._signature_columns.append(SAMPLE_ID)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if not model.training:  # evaluation, of any data set (the training set's ids too): the model's own loss
            inputs.pop(SAMPLE_ID, None)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if SAMPLE_ID not in inputs:  # trained on the model's own loss, nothing recorded: refused
            raise StoreError(f"a training batch came without {SAMPLE_ID!r}, the store ids PSKDTrainer adds "
                             "to every record: use a data collator that keeps extra columns "
                             "(DataCollatorWithPadding, DataCollatorForSeq2Seq with a tokenizer, "
                             "default_data_collator)")
        ids, labels = inputs.pop(SAMPLE_ID), inputs.pop("labels")
        if self.pskd_lengths is not None and self.model.config.is_encoder_decoder and "decoder_input_ids" not in inputs:
            # what the model does with labels it is given: its decoder reads them shifted right
            inputs["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**inputs)
        logits = _logits_of(outputs)
        # normalised as the Trainer has the model's own loss normalised: by the targets of the
        # whole accumulated step when the model takes num_items_in_batch (training_step then
        # leaves the loss as it is), else by this micro-batch's (training_step divides it)
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        if num_items is not None and self.args.n_gpu > 1:
            # DataParallel: the outputs are the whole batch's, gathered, and the Trainer hands the
            # count once per GPU, each the step's (or its n-th, not averaged across devices)
            per_device = 1 if self.args.average_tokens_across_devices else self.args.n_gpu
            num_items = num_items.reshape(-1)[0] * per_device
        if self.pskd_lengths is None:
            targets = self.session.data.targets(labels, ids).to(logits.device, non_blocking=True)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum") / (
                len(targets) if num_items is None else num_items)
            self.session.record(ids, logits)
        else:
            if self.pskd_shift:  # position t predicts token t + 1
                logits, labels = logits[:, :-1], labels[:, 1:]
            probs, classes, alpha = self.session.data.teacher(labels, ids)
            loss = token_soft_cross_entropy(logits, labels, probs.to(logits.device, non_blocking=True),
                                            classes.to(logits.device, non_blocking=True), alpha, num_items=num_items)
            self.session.record(ids, logits, labels)
        if num_items is not None and self.args.average_tokens_across_devices and self.args.n_gpu <= 1:
            # num_items counts every process's targets, and DDP averages the processes' gradients
            # (Trainer.compute_loss scales the model's own loss so)
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def open_store(self, epochs_done: int, seal_token: str | None = None) -> None:
        """Open the store, rolled back to ``epochs_done`` on a resume (each epoch's teacher is
        served when the epoch begins); ``seal_token``: the checkpoint's, of that epoch."""
        options = dict(self.pskd_options)
        if self.session is not None:
            self.session.abandon()  # a try that failed mid-epoch: its part given up
            if self._session_opened_in == self._train_calls:
                # auto_find_batch_size's retry, within this train() call: from step 0 (or the same
                # checkpoint), into the store made anew, whatever the failed try sealed. A new
                # call after a failure takes the store over only if that try sealed nothing: the
                # epochs it sealed are its checkpoints' teachers
                options["overwrite"] = options["overwrite"] or epochs_done == 0
        self.session = StoreSession.open(
            self.pskd_url, self.pskd_base, self.pskd_labels, num_classes=self.pskd_classes,
            alpha_T=options.pop("alpha_T"), total_epochs=_whole(self.args.num_train_epochs, "num_train_epochs"),
            env=torchrun_environment() or Distributed(), resuming=epochs_done > 0, lengths=self.pskd_lengths,
            **options,
        )
        self._session_opened_in = self._train_calls
        if epochs_done > 0:
            self.session.resume_after(epochs_done, seal_token)


class SealRecord(TrainerCallback, ExportableState):
    """What a checkpoint records of the store (in trainer_state.json, as the Trainer saves
    the state of such callbacks): the last epoch sealed and which seal of it, so that a
    resume refuses a store that another run sealed that epoch into since."""

    def __init__(self, sealed: int = 0, seal_token: str | None = None):
        self.sealed, self.seal_token = sealed, seal_token

    def state(self) -> dict:
        return {"args": {"sealed": self.sealed, "seal_token": self.seal_token}, "attributes": {}}


class _StoreEpochs(TrainerCallback):
    """Serve each epoch's teacher at its start; seal the epoch at its end, which the Trainer
    calls before it saves the epoch's checkpoint."""

    def __init__(self, trainer: PSKDTrainer):
        self.trainer = trainer

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if args.max_steps > 0:
            raise ValueError("PS-KD's alpha_t = alpha_T·t/T counts whole epochs: set num_train_epochs, not max_steps")
        epochs_done = _whole(state.epoch or 0, "the resumed checkpoint's epoch",
                             "PS-KD resumes from a checkpoint taken at an epoch's end: save_strategy='epoch'")
        steps_per_epoch = state.max_steps // _whole(args.num_train_epochs, "num_train_epochs")
        if state.global_step != epochs_done * steps_per_epoch:  # the Trainer would go on from another epoch
            raise ValueError(
                f"the checkpoint was taken at the end of epoch {epochs_done}, after {state.global_step} steps, but "
                f"this Trainer takes {steps_per_epoch} steps an epoch and would go on from step {state.global_step} of "
                "its own epochs: resume with the run's batch size, gradient accumulation and number of processes")
        recorded = state.stateful_callbacks.setdefault(SealRecord.__name__, SealRecord().state())["args"]
        self.trainer.open_store(epochs_done, recorded["seal_token"] if recorded["sealed"] == epochs_done else None)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        session = self.trainer.session
        session.begin_epoch(session.sealed + 1)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        session = self.trainer.session
        session.end_epoch()
        record = next(c for c in self.trainer.callback_handler.callbacks if isinstance(c, SealRecord))
        record.sealed, record.seal_token = session.sealed, session.seal_token  # saved with the epoch's checkpoint


def _predicts_the_next_token(model: torch.nn.Module, shift_labels: bool | None) -> bool:
    """Whether the model's own loss compares position t's logits with token t + 1
    (``shift_labels`` when given): its loss function is the causal LM's, and not an
    encoder-decoder's, whose decoder reads the labels shifted instead. A masked LM or a
    token classifier compares each position with its own label. The loss function is the
    one its class names (``PreTrainedModel.loss_type``), or, for a class that names none and
    whose ``forward`` calls ``self.loss_function`` (GPT2LMHeadModel), the causal LM's, that
    property's default; a class that does neither computes a loss of its own, which is refused."""
    if shift_labels is not None:
        return shift_labels
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    loss_type = getattr(model, "loss_type", None)
    if loss_type in LOSS_MAPPING:
        own_loss = LOSS_MAPPING[loss_type]
    elif "loss_function" in inspect.unwrap(type(model).forward).__code__.co_names:
        own_loss = ForCausalLMLoss
    else:
        raise ValueError(
            f"{type(model).__name__} computes a loss of its own, so PSKDTrainer cannot tell whether it compares "
            "position t's logits with token t + 1 (a causal LM's) or with token t (a masked LM's): pass "
            "shift_labels=True or shift_labels=False")
    return own_loss is ForCausalLMLoss


def _logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's output: a ModelOutput's (or dict's) ``logits``, a tuple's first
    item (``return_dict=False``, no labels passed), or the output itself (a plain module's)."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) and "logits" in outputs else (
        outputs[0] if isinstance(outputs, tuple) and outputs else outputs)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"PSKDTrainer reads the model's logits from its output, a {type(outputs).__name__} with no "
                        "'logits': return a ModelOutput (or dict) with 'logits', a tuple of them first, or the logits")
    return logits


def _token_classes(model: torch.nn.Module) -> int:
    """The width of a model's per-token logits: a token classifier's labels, else the vocabulary."""
    token_classifier = getattr(model, "loss_type", None) == "ForTokenClassification"
    return model.config.num_labels if token_classifier else model.config.vocab_size


def _token_labels_of(records: Dataset) -> list:
    """Each record's ``labels`` sequence, in index order."""
    try:
        return [record["labels"] for record in records]
    except KeyError as err:
        raise ValueError(
            "per-token PS-KD reads each training record's 'labels' (its target tokens, -100 where none) to make "
            "the store's rows, but a record has none (a collator that makes them, as "
            "DataCollatorForLanguageModeling, runs too late): add 'labels' to the records, or pass labels=[...] "
            "(one sequence per record)") from err


def _whole(value: float, what: str, advice: str = "PS-KD's alpha_t counts whole epochs") -> int:
    if value != math.floor(value):
        raise StoreError(f"{what} is {value}, not a whole number of epochs: {advice}")
    return int(value)


def _labels_of(records: Dataset) -> np.ndarray:
    """Each record's ``labels`` (or ``label``), in index order: pass ``labels=`` to spare the
    read (``labels=train_set["label"]`` for a ``datasets.Dataset``)."""
    return np.asarray([int(record["labels"] if "labels" in record else record["label"]) for record in records],
                      dtype=np.int64)
