"""Training throughput of PS-KD with the store against its alternatives; prints JSON.

Three arms train the same model on the same data with the same loop, differing only in
where the soft target comes from:
  * ``ce``: plain cross-entropy, no past predictions (the speed to match),
  * ``store``: PS-KD with SoftTargetDataset reading sealed epoch t-1 and a PredictionWriter
    recording epoch t (what ``pskd-store train`` does),
  * ``teacher``: PS-KD the paper's first way — a frozen copy of last epoch's model run
    forward on every batch.
The arms take turns step by step (a step of each, then the next step of each; at each epoch
the order rotates), so that the drift of a shared machine, which moves one epoch by more
than the store costs, hits all of them alike; each arm's clock runs only on its own turns,
and samples/s excludes epoch 1 (warm-up, and no teacher yet for PS-KD). On a GPU each turn
ends when its kernels have run. The store's per-epoch fixed cost (opening the writer,
sealing) is reported apart: on a tiny model whose epoch lasts a fraction of a second it
weighs far more than in a real epoch. ``parts_ms_per_epoch`` says where each arm's time
goes (the training thread's clock: on a GPU, what the host spends, not the kernels). The
writer's background thread, which writes every full chunk followed by more rows, runs on
through the other arms' turns; at the default 8,000 samples an epoch is one chunk, which
``close()`` writes in the store arm's own time.

With ``--workers N`` every arm's DataLoader has N persistent worker processes, as a GPU
run's would; the training thread then only receives each batch, and every arm's small
tensors are handed over by value (``collate_soft_targets``, :func:`collate_as_the_store_does`).

glibc hands a freed block of a few hundred KB (a batch's activations) back to the system
or keeps it, depending on what the process freed before; when it hands it back, the next
step faults the pages in again. In one process, arms doing the same work paid from 0.8 to
28 thousand page faults an epoch, up to +40% forward time. Unless ``--malloc default``,
the benchmark has glibc keep freed memory (``mallopt``), so that the arms differ by their
work, not by that draw.

    python benchmarks/train_overhead.py                          # MNIST-1D, mnist1d_cnn
    python benchmarks/train_overhead.py --arch mnist1d_mlp --epochs 6
    python benchmarks/train_overhead.py --workers 2                # batches from worker processes
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import json
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from pskd_store.batch_transfer import handed_over_by_value
from pskd_store.data import build_datasets
from pskd_store.dataset import SoftTargetDataset, collate_soft_targets
from pskd_store.engine import autocast, eval_loader, predict, to_device
from pskd_store.loss import alpha_t, soft_target
from pskd_store.models import create_model
from pskd_store.store import SoftTargetStore

ARMS = ("ce", "store", "teacher")
PARTS = ("loading", "step", "write", "set_epoch", "writer_open", "writer_close", "seal", "evaluate")  # of an epoch
FIXED = ("set_epoch", "writer_open", "writer_close", "seal")  # the store's work once an epoch, whatever its length
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def arm_epochs(arm: str, splits, args, workdir: Path, turns: bool = False) -> Iterator[dict | None]:
    """Train ``args.epochs`` epochs on ``args.device`` (fp32, or bfloat16 autocast with ``args.amp``),
    yielding None after each step (another arm's turn, with ``turns``: on a GPU its kernels have run)
    and after each epoch its samples, the seconds of its own work, those outside the steps
    (set_epoch, opening the writer, sealing) and where they went."""
    device = torch.device(args.device)
    synchronize = turns and device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(args.arch, splits.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    data = splits.train
    store = None
    if arm == "store":
        store = SoftTargetStore.create(workdir / f"store-{time.time_ns()}", splits.train_labels, splits.num_classes)
        data = SoftTargetDataset(splits.train, store, args.alpha_T, args.epochs)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
                        collate_fn=collate_soft_targets if store is not None else collate_as_the_store_does)
    test_loader = eval_loader(splits.test, 2 * args.batch_size, args.workers, device) if args.evaluate else None
    teacher = None
    clock = time.perf_counter
    for epoch in range(1, args.epochs + 1):
        model.train()
        alpha = alpha_t(epoch, args.epochs, args.alpha_T)
        writer, seen = None, 0
        spent = dict.fromkeys(PARTS, 0.0)
        if store is not None:
            start = clock()
            data.set_epoch(epoch)
            opening = clock()
            writer = store.writer(epoch)
            spent["set_epoch"], spent["writer_open"] = opening - start, clock() - opening
        for batch in timed_batches(loader, spent):
            loaded = clock()
            if store is not None:
                inputs, targets, labels, ids = batch
                targets = targets.to(device, non_blocking=True)
            else:
                inputs, labels = batch
            inputs = to_device(inputs, device, args.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, args.amp):
                logits = model(inputs)
            if arm == "ce" or (arm == "teacher" and teacher is None):
                targets = labels
            elif arm == "teacher":
                with torch.no_grad(), autocast(device, args.amp):
                    past = teacher(inputs).float().softmax(dim=1)
                targets = soft_target(labels, past, alpha)
            loss = F.cross_entropy(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if synchronize:
                torch.cuda.synchronize(device)
            stepped = clock()
            spent["step"] += stepped - loaded
            if writer is not None:
                writer.write(ids, logits)
            seen += len(labels)
            spent["write"] += clock() - stepped
            yield None
        if device.type == "cuda":  # the steps' last kernels are done before their clock stops
            ended = clock()
            torch.cuda.synchronize(device)
            spent["step"] += clock() - ended
        if writer is not None:
            closing = clock()
            writer.close()
            spent["writer_close"] = clock() - closing
        evaluate = None if test_loader is None else functools.partial(
            predict, model, test_loader, device, amp=args.amp, channels_last=args.channels_last)
        spent["evaluate"], spent["seal"] = seal_and_evaluate(store, epoch, evaluate)
        if arm == "teacher":
            teacher = copy.deepcopy(model).eval()
        yield {"epoch": epoch, "samples": seen, "seconds": sum(spent.values()),
               "fixed": sum(spent[part] for part in FIXED), "parts": spent}


def collate_as_the_store_does(batch: list) -> tuple | list:
    """CE's and the frozen teacher's ``collate_fn``: ``default_collate``, whose labels a worker
    hands over by value as ``collate_soft_targets`` does the store's (batch_transfer.py), so
    that with ``--workers`` the arms differ by the store's work, not by how a tensor crosses
    between processes (~0.3-0.6 ms a tensor in shared memory on the reference VM)."""
    return handed_over_by_value(default_collate(batch))


def timed_batches(loader: DataLoader, spent: dict[str, float]) -> Iterator:
    """The loader's batches, the time each took to come (the last, empty fetch included)
    added to ``spent["loading"]``."""
    clock = time.perf_counter
    fetching = clock()
    batches = iter(loader)
    while True:
        batch = next(batches, None)
        spent["loading"] += clock() - fetching
        if batch is None:
            return
        yield batch
        fetching = clock()


def seal_and_evaluate(store: SoftTargetStore | None, epoch: int, evaluate: Callable | None) -> tuple[float, float]:
    """Seal the epoch, in the background of the evaluation when there is one (as ``pskd-store
    train`` does); return the seconds spent evaluating and those of the seal still left."""
    clock = time.perf_counter
    start = clock()
    if evaluate is None:
        if store is not None:
            store.seal(epoch)
        return 0.0, clock() - start
    with ThreadPoolExecutor(1) as background:
        sealing = background.submit(store.seal, epoch) if store is not None else None
        evaluate()
        evaluated = clock()
        if sealing is not None:
            sealing.result()
    return evaluated - start, clock() - evaluated


def summary(epochs: list[dict]) -> dict:
    """Samples/s over epochs 2..T, the fixed seconds per epoch and where the time went."""
    timed = [e for e in epochs if e["epoch"] > 1]
    return {"samples_per_s": sum(e["samples"] for e in timed) / sum(e["seconds"] for e in timed),
            "fixed_s_per_epoch": statistics.fmean(e["fixed"] for e in timed),
            "parts_ms_per_epoch": {part: 1000 * statistics.fmean(e["parts"][part] for e in timed) for part in PARTS}}


def train_arm(arm: str, splits, args, workdir: Path) -> dict:
    """One arm's epochs in a row: :func:`summary`, and on a GPU its peak memory alone."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    result = summary([epoch for epoch in arm_epochs(arm, splits, args, workdir) if epoch is not None])
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(args.device) / 2**20
    return result


def interleaved(splits, args, workdir: Path) -> dict[str, list[dict]]:
    """Every arm's epochs (as :func:`arm_epochs` yields them), the arms taking turns step by
    step, in an order rotated each epoch and reversed every other one: work an arm leaves
    running after its turn (a thread, a worker, queued kernels) lands on the arm after it,
    which is then not always the same one."""
    runs = {arm: arm_epochs(arm, splits, args, workdir, turns=True) for arm in ARMS}
    epochs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for epoch in range(args.epochs):
        training = ARMS[epoch % len(ARMS):] + ARMS[:epoch % len(ARMS)]
        if epoch % 2:
            training = training[::-1]
        while training:
            for arm in training:
                done = next(runs[arm])
                if done is not None:
                    epochs[arm].append(done)
            training = tuple(arm for arm in training if len(epochs[arm]) <= epoch)
    return epochs


def paired_ratios(epochs: dict[str, list[dict]]) -> list[dict[str, float]]:
    """Per timed epoch, each arm's speed over CE's in the same epoch: the store's with and
    without its fixed cost, the frozen teacher's."""
    return [{"store_over_ce": ce["seconds"] / store["seconds"],
             "store_steps_over_ce": ce["seconds"] / (store["seconds"] - store["fixed"]),
             "teacher_over_ce": ce["seconds"] / teacher["seconds"]}
            for ce, store, teacher in zip(*(epochs[arm] for arm in ARMS)) if ce["epoch"] > 1]


def keep_freed_memory() -> bool:
    """Have glibc keep what the process frees for its next allocations (see the module's
    docstring); False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False


def build_parser() -> argparse.ArgumentParser:
    """The options, also what ``gpu_check.py`` parses its throughput runs' settings with."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-subset", type=int,
                        help="n training samples, n/K of each class, as `pskd-store train --train-subset`: a quick try")
    parser.add_argument("--arch", default="mnist1d_cnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--alpha-T", dest="alpha_T", type=float, default=0.8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch compute threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (on a GPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format for image batches")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed memory (the arms then differ by their work, not by page faults)")
    parser.add_argument("--evaluate", action="store_true",
                        help="every arm evaluates the test split after each epoch, the store's seal meanwhile")
    return parser


def measure(splits, args, workdir: Path) -> dict:
    """``args.repeats`` rounds of :func:`interleaved`: each arm's samples/s (median over the
    rounds), where its time went, the store's fixed cost, the ratios and the targets."""
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
    parts: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    fixed: list[float] = []
    pairs: list[dict[str, float]] = []
    for _ in range(args.repeats):
        epochs = interleaved(splits, args, workdir)
        pairs += paired_ratios(epochs)
        for arm, measured in ((arm, summary(done)) for arm, done in epochs.items()):
            rates[arm].append(measured["samples_per_s"])
            parts[arm].append(measured["parts_ms_per_epoch"])
            if arm == "store":
                fixed.append(measured["fixed_s_per_epoch"])
    median = {arm: statistics.median(values) for arm, values in rates.items()}
    epoch_s = {arm: len(splits.train) / rate for arm, rate in median.items()}
    store_fixed = statistics.median(fixed)
    result = {
        "samples_per_s": median,
        "runs": rates,
        "store_over_ce": median["store"] / median["ce"],
        "teacher_over_ce": median["teacher"] / median["ce"],
        "store_over_teacher": median["store"] / median["teacher"],
        "epoch_s": epoch_s,
        "store_fixed_s_per_epoch": store_fixed,
        "parts_ms_per_epoch": {arm: {part: statistics.median(run[part] for run in runs) for part in PARTS}
                               for arm, runs in parts.items()},
        # the steps alone: what remains of the store's cost once the per-epoch seal is
        # amortised over an epoch much longer than this one (a real GPU epoch)
        "store_steps_over_ce": epoch_s["ce"] / (epoch_s["store"] - store_fixed),
        # the same ratios epoch by epoch (each arm against CE's epoch beside it), their
        # median: what a burst of the machine's other load does to one epoch stays there
        "paired_median": {ratio: statistics.median(pair[ratio] for pair in pairs) for ratio in pairs[0]},
    }
    paired = result["paired_median"]
    result["targets"] = {
        "store_steps_at_least_0.97_of_ce": paired["store_steps_over_ce"] >= 0.97,
        "store_at_least_0.93_of_ce": paired["store_over_ce"] >= 0.93,
        "both_at_least_0.2_above_the_teacher": min(paired["store_over_ce"], paired["store_steps_over_ce"])
        >= paired["teacher_over_ce"] + 0.2,
    }
    return result


def main() -> None:
    args = build_parser().parse_args()
    kept = args.malloc == "keep" and keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = build_datasets(args.dataset, args.data_dir, train_subset=args.train_subset)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(splits, args, Path(tmp))
    print(json.dumps({
        "benchmark": "train_overhead",
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": args.device, "freed_memory_kept": kept,
                    "page_faults_per_epoch": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                    / (args.repeats * args.epochs * len(ARMS))},
        "config": vars(args),
        **measured,
    }, indent=2))


if __name__ == "__main__":
    main()
