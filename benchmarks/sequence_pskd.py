"""PS-KD for a sequence model with the store's token rows; prints JSON.

The task: German -> English dictionary phrases from Debian's ``dict-de-en`` (the TU Chemnitz
dictionary, ``/usr/share/dictd/german-english.dict.dz``: ``apt-get install dict-de-en``) as
character-level translation by a small causal Transformer trained from scratch. A sequence
is ``<bos> german <sep> english <eos>``; only the English characters and ``<eos>`` are
targets (the German prompt's labels are -100), so target positions are scattered and of
every count, as in real translation data. Pairs are those whose German side has at least
two words and whose sides fit ``--max-chars``; a seed-0 permutation picks the training and
test pairs, the same for every seed.

  * ``table``: CE against PS-KD (the store, top-k rows), ``--seeds`` each; token-level
    error, NLL, perplexity, ECE and AURC on the test pairs' target characters after the
    last epoch. ``--loop plain`` trains the model below in a loop written here around
    ``TokenTargetDataset``; ``--loop trainer`` trains a GPT-2 of the same size (from a
    config) with Hugging Face's ``Trainer`` for CE and ``PSKDTrainer(per_token=True)`` for
    PS-KD, as a user of that library would.
  * ``teacher``: PS-KD with the store at each ``--topk`` against PS-KD the paper's way for
    translation (a frozen copy of the previous epoch's model run forward on every batch):
    samples/s over epochs 2..T (the median of ``--repeats`` rounds, arms alternated), the
    memory a teacher takes (the copy's parameters, on the device; the store's decoded
    epoch, mapped on the host), its compressed bytes per token on disk, and, for each k,
    the mean L1 distance between the rebuilt target row and the dense softmax it came
    from, over the training targets.

    python benchmarks/sequence_pskd.py table --epochs 10 --train-pairs 8000 --test-pairs 2000 --seeds 0 1 2
    python benchmarks/sequence_pskd.py table --loop trainer --epochs 10 --train-pairs 8000 --test-pairs 2000 \
        --seeds 0 1 2
    python benchmarks/sequence_pskd.py teacher --epochs 4 --topk 1 4 8 16 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pskd_store.loss import token_soft_cross_entropy
from pskd_store.metrics import evaluate
from pskd_store.row_encoding import row_encoding
from pskd_store.sequences import IGNORE_INDEX, token_labels
from pskd_store.store import SoftTargetStore
from pskd_store.token_dataset import TokenTargetDataset

DICTIONARY = "/usr/share/dictd/german-english.dict.dz"
PAD, BOS, SEP, EOS = 0, 1, 2, 3  # character ids follow


def dictionary_pairs(path: str, max_chars: int) -> list[tuple[str, str]]:
    """(German, English) pairs of the dictd file: a headword line, a grammar line (indented
    or empty), an indented translation; multi-word German phrases whose sides fit."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    pairs = []
    for head, grammar, translation in zip(lines, lines[1:], lines[2:]):
        if (head and not head[0].isspace() and (not grammar or grammar.startswith(" {") or grammar.startswith(" ("))
                and translation.startswith("   ")):
            german, english = head.strip(), translation.strip().rstrip(";")
            if len(german.split()) >= 2 and len(german) <= max_chars and 0 < len(english) <= max_chars:
                pairs.append((german, english))
    return sorted(set(pairs))


class PairSequences(Dataset):
    """``(input ids (L,), labels (L,))`` of each pair: labels are the next character on the
    English side and ``<eos>``, -100 elsewhere."""

    def __init__(self, pairs: list[tuple[str, str]], vocabulary: dict[str, int], length: int):
        self.inputs = torch.full((len(pairs), length), PAD, dtype=torch.int64)
        self.labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.int64)
        for i, (german, english) in enumerate(pairs):
            ids = [BOS, *(vocabulary[c] for c in german), SEP, *(vocabulary[c] for c in english), EOS]
            self.inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
            start = len(german) + 1  # position of <sep>: it predicts the first English character
            self.labels[i, start:len(ids) - 1] = torch.tensor(ids[start + 1:])

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.labels[i]


class CharTransformer(nn.Module):
    """A small pre-norm causal Transformer language model (learned positions)."""

    def __init__(self, vocabulary: int, length: int, width: int = 96, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        hidden = self.embed(inputs) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM seen as ``inputs -> logits``, as ``target_probs`` reads a model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs).logits


def build_data(args) -> tuple[PairSequences, PairSequences, int]:
    pairs = dictionary_pairs(args.dictionary, args.max_chars)
    order = np.random.default_rng(0).permutation(len(pairs))
    train_pairs = [pairs[i] for i in order[:args.train_pairs]]
    test_pairs = [pairs[i] for i in order[args.train_pairs:args.train_pairs + args.test_pairs]]
    characters = sorted({c for pair in train_pairs + test_pairs for side in pair for c in side})
    vocabulary = {c: i + 4 for i, c in enumerate(characters)}
    length = 2 * args.max_chars + 2
    return PairSequences(train_pairs, vocabulary, length), PairSequences(test_pairs, vocabulary, length), \
        len(vocabulary) + 4


def train_run(method: str, train, test, vocabulary: int, seed: int, args, workdir: Path,
              topk: int | None = None) -> dict:
    """Train one run; ``method`` is ``ce``, ``store`` (PS-KD from the store) or ``copy``
    (PS-KD from a frozen copy of the previous epoch's model). Returns its test metrics and
    its samples/s over epochs 2..T."""
    torch.manual_seed(seed)
    model = CharTransformer(vocabulary, train.inputs.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps, pct_start=0.1)
    store = None
    data = train
    if method == "store":
        tokens, lengths = token_labels(train.labels.numpy())
        store = SoftTargetStore.create(workdir / f"store-{time.time_ns()}", tokens, vocabulary, topk=topk,
                                       lengths=lengths)
        data = TokenTargetDataset(train, store, args.alpha_T, args.epochs, seed=seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    teacher, seconds, samples = None, 0.0, 0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        alpha = args.alpha_T * epoch / args.epochs
        writer = None
        if store is not None:
            data.set_epoch(epoch)
            writer = store.writer(epoch)
        for batch in loader:
            inputs, labels = batch[0], batch[1]
            logits = model(inputs)
            if method == "ce" or (method == "copy" and teacher is None):
                loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX)
            elif method == "copy":
                with torch.no_grad():
                    past = teacher(inputs).softmax(dim=-1)
                classes = torch.arange(vocabulary).expand_as(past)
                loss = token_soft_cross_entropy(logits, labels, past, classes, alpha)
            else:
                loss = token_soft_cross_entropy(logits, labels, batch[2], batch[3], batch[4])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if writer is not None:
                writer.write(batch[5], logits.detach(), labels)
        if writer is not None:
            writer.close()
            store.seal(epoch)
        if method == "copy":
            teacher = copy.deepcopy(model).eval()
        if epoch > 1:
            seconds += time.perf_counter() - started
            samples += len(train)
    result = {"samples_per_s": samples / seconds if seconds else None, "test": token_metrics(model, test)}
    if store is not None:
        info = store.epoch_info(args.epochs)
        result["store_bytes_per_token"] = info["nbytes_stored"] / store.num_samples
        result["served_teacher_bytes"] = info["nbytes"]  # the decoded epoch a data set maps (page cache, shared)
    if teacher is not None:
        result["teacher_copy_bytes"] = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    result["model"] = model
    return result


def causal_records(data: PairSequences) -> list[dict[str, torch.Tensor]]:
    """The pairs as a causal LM's records: the whole sequence as ``input_ids`` and its labels at
    the tokens' own positions (the model shifts them by one, as PSKDTrainer does)."""
    labels = F.pad(data.labels, (1, 0), value=IGNORE_INDEX)
    input_ids = torch.where(labels != IGNORE_INDEX, labels, F.pad(data.inputs, (0, 1), value=PAD))
    return [{"input_ids": i, "labels": y} for i, y in zip(input_ids, labels)]


def trainer_run(method: str, train, test, vocabulary: int, seed: int, args, workdir: Path,
                topk: int | None = None) -> dict:
    """One run through Hugging Face's ``Trainer`` (``method`` ``ce``) or ``PSKDTrainer`` with a
    top-k sequence store (``store``): GPT-2 the size of ``CharTransformer``, AdamW, warm-up
    then cosine decay, gradients clipped at 1."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator, set_seed

    from pskd_store.integrations.transformers import PSKDTrainer

    set_seed(seed)
    length = train.inputs.shape[1] + 1
    config = GPT2Config(vocab_size=vocabulary, n_positions=length, n_embd=96, n_layer=2, n_head=4,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    arguments = TrainingArguments(
        output_dir=str(workdir / f"trainer-{time.time_ns()}"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.1,
        lr_scheduler_type="cosine", max_grad_norm=1.0, seed=seed, save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True)
    common = dict(model=model, args=arguments, train_dataset=causal_records(train), data_collator=default_data_collator)
    if method == "ce":
        trainer = Trainer(**common)
    else:
        store = workdir / f"store-{time.time_ns()}"
        trainer = PSKDTrainer(**common, pskd_store=store, alpha_T=args.alpha_T, per_token=True,
                              store_options={"topk": topk})
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is this script's JSON
        metrics = trainer.train().metrics
    return {"samples_per_s": metrics["train_samples_per_second"], "test": token_metrics(CausalLMLogits(model), test),
            "model": model}


@torch.no_grad()
def target_probs(model: nn.Module, data: PairSequences) -> tuple[np.ndarray, np.ndarray]:
    """Softmax rows (T, V) at every target position of ``data``, and their labels."""
    model.eval()
    probs, labels = [], []
    for start in range(0, len(data), 256):
        inputs, batch_labels = data.inputs[start:start + 256], data.labels[start:start + 256]
        keep = batch_labels != IGNORE_INDEX
        probs.append(model(inputs).softmax(dim=-1)[keep].numpy())
        labels.append(batch_labels[keep].numpy())
    return np.concatenate(probs), np.concatenate(labels)


def token_metrics(model: nn.Module, data: PairSequences) -> dict[str, float]:
    metrics = evaluate(*target_probs(model, data), n_bins=15)
    metrics["perplexity"] = math.exp(metrics["nll"])
    return metrics


def rebuild_distance(probs: np.ndarray, vocabulary: int, topk: int) -> float:
    """Mean L1 distance between dense float16 rows and their top-k rows rebuilt."""
    encoding = row_encoding(vocabulary, "float16", topk)
    rebuilt = encoding.expand(encoding.encode(torch.from_numpy(probs)).numpy())
    return float(np.abs(rebuilt - probs.astype(np.float16).astype(np.float32)).sum(axis=1).mean())


def compare_teachers(train, test, vocabulary: int, args, workdir: Path) -> dict[str, dict]:
    """The frozen copy and each top-k store, alternated ``--repeats`` times (so that drift of
    a shared machine hits every arm alike); samples/s is each arm's median."""
    arms = {"frozen_copy": ("copy", None), **{f"store_top{k}": ("store", k) for k in args.topk}}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    runs: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, (method, k) in arms.items():
            runs[name] = train_run(method, train, test, vocabulary, args.seeds[0], args, workdir, topk=k)
            rates[name].append(runs[name]["samples_per_s"])
    copy_rate = statistics.median(rates["frozen_copy"])
    report = {"frozen_copy": {"samples_per_s": copy_rate, "runs": rates["frozen_copy"],
                              "teacher_copy_bytes": runs["frozen_copy"]["teacher_copy_bytes"]}}
    probs, _ = target_probs(runs["frozen_copy"]["model"], train)
    for name, (_, k) in list(arms.items())[1:]:
        rate = statistics.median(rates[name])
        report[name] = {"samples_per_s": rate, "runs": rates[name], "over_frozen_copy": rate / copy_rate,
                        "store_bytes_per_token": runs[name]["store_bytes_per_token"],
                        "served_teacher_bytes": runs[name]["served_teacher_bytes"],
                        "rebuilt_l1_to_dense": rebuild_distance(probs, vocabulary, k)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("table", "teacher"))
    parser.add_argument("--loop", choices=("plain", "trainer"), default="plain",
                        help="table: this script's loop or Hugging Face's Trainer")
    parser.add_argument("--dictionary", default=DICTIONARY)
    parser.add_argument("--max-chars", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha-T", dest="alpha_T", type=float, default=0.8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--topk", type=int, nargs="+", default=[8], help="k of the store's top-k rows")
    parser.add_argument("--repeats", type=int, default=1, help="teacher: rounds of the alternated arms")
    parser.add_argument("--threads", type=int, help="torch compute threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test, vocabulary = build_data(args)
    started = time.perf_counter()
    report = {"benchmark": f"sequence_pskd {args.mode}", "args": vars(args),
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "data": {"train_pairs": len(train), "test_pairs": len(test), "vocabulary": vocabulary,
                       "length": train.inputs.shape[1],
                       "train_target_tokens": int((train.labels != IGNORE_INDEX).sum()),
                       "test_target_tokens": int((test.labels != IGNORE_INDEX).sum())}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.mode == "table":
            runs = {"ce": [], f"pskd_top{args.topk[0]}": []}
            run_one = trainer_run if args.loop == "trainer" else train_run
            for seed in args.seeds:
                for name in runs:
                    run = run_one("ce" if name == "ce" else "store", train, test, vocabulary, seed, args,
                                    Path(tmp), topk=args.topk[0])
                    runs[name].append({"seed": seed, **run["test"]})
            report["runs"] = runs
            report["mean"] = {name: {key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "seed"}
                              for name, rows in runs.items()}
        else:
            report["arms"] = compare_teachers(train, test, vocabulary, args, Path(tmp))
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
