"""A small Hugging Face fine-tuning run with PSKDTrainer, written as a user writes one: a
tiny BERT built from a config (no download), a word-level tokenizer made here, and a
four-class text set whose class shows in its words. Imported by
tests/test_transformers.py (which forks the run it kills), and run as a script under torchrun.

Each rank saves what its training steps saw (epoch, ids, logits, loss) to
``ROOT/seen_rank{R}.pt``; rank 0 saves the final weights to ``ROOT/final.pt``. Under
torchrun (``torchrun --nproc-per-node 2 tests/transformers_run.py ROOT``) each rank trains
its shard.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)

from pskd_store.integrations.transformers import SAMPLE_ID, PSKDTrainer

N, K = 96, 4
WORDS = [[f"w{k}_{i}" for i in range(6)] for k in range(K)] + [[f"common{i}" for i in range(8)]]


def tokenizer() -> PreTrainedTokenizerFast:
    vocabulary = ["[PAD]", "[UNK]"] + [word for words in WORDS for word in words]
    model = models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="[UNK]")
    tokens = Tokenizer(model)
    tokens.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokens, pad_token="[PAD]", unk_token="[UNK]")


def sentences(count: int, seed: int) -> list[dict]:
    """Tokenised records: 3-10 words, each one of the class's own words or a common word."""
    generator = torch.Generator().manual_seed(seed)
    tokens, records = tokenizer(), []
    for i in range(count):
        label = i % K
        length = int(torch.randint(3, 11, (1,), generator=generator))
        own = torch.rand(length, generator=generator) < 0.5
        picks = torch.randint(0, 6, (length,), generator=generator)
        text = " ".join(WORDS[label][p] if o else WORDS[K][p] for o, p in zip(own.tolist(), picks.tolist()))
        records.append({**tokens(text), "labels": label})
    return records


class Recording(PSKDTrainer):
    """Keeps what each training step saw, for the test to recompute PS-KD's loss."""

    def __init__(self, *args, kill_in_epoch: int | None = None, kill_at_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple] = []
        if kill_in_epoch is not None:
            self.add_callback(KillInEpoch(kill_in_epoch))
        if kill_at_step is not None:
            self.add_callback(KillAtStep(kill_at_step))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.get(SAMPLE_ID) if model.training else None
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if ids is not None:
            self.seen.append((self.session.epoch, ids.clone(), outputs["logits"].detach().clone(), loss.detach()))
        return (loss, outputs) if return_outputs else loss


class KillInEpoch(TrainerCallback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, args, state, control, **kwargs):
        if round(state.epoch) == self.epoch:  # sealed (PSKDTrainer's callback ran first), not yet saved
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fine_tune(root: Path, *, epochs: int = 3, workers: int = 2, kill_in_epoch: int | None = None,
              kill_at_step: int | None = None, resume: bool | str = False, train: bool = True,
              arguments: dict | None = None, **pskd_options) -> Recording:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=K, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    arguments = dict(output_dir=str(root / "checkpoints"), num_train_epochs=epochs, per_device_train_batch_size=16,
                     learning_rate=1e-2, save_strategy="epoch", logging_strategy="no", report_to=[],
                     dataloader_num_workers=workers, seed=0, use_cpu=True, disable_tqdm=True) | (arguments or {})
    args = TrainingArguments(**arguments)
    trainer = Recording(model=BertForSequenceClassification(config), args=args, train_dataset=sentences(N, 1),
                        eval_dataset=sentences(32, 2),
                        data_collator=DataCollatorWithPadding(tokenizer()), pskd_store=root / "store", alpha_T=0.8,
                        store_options={"chunk_rows": 16}, kill_in_epoch=kill_in_epoch, kill_at_step=kill_at_step,
                        **pskd_options)
    if not train:
        return trainer
    trainer.train(resume_from_checkpoint=resume or None)
    torch.save(trainer.seen, root / f"seen_rank{trainer.args.process_index}.pt")
    if trainer.args.process_index == 0:
        torch.save(trainer.model.state_dict(), root / "final.pt")
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    fine_tune(parser.parse_args().root)
