"""What only a CUDA GPU can show; prints one JSON object per check, then a summary.

1. ``matrix``: every ``--method`` x ``--aug`` (15 runs) trains two epochs of a few steps
   on the device through the real ``train()``, on CIFAR-shaped images with CIFAR's crop
   and flip in two DataLoader workers: a crash on a device path (a zero-row write on a
   mixed batch, say) shows up as an error naming the combination.
2. ``writer``: PredictionWriter fed CUDA logits stores exactly the rows it stores when
   fed the same logits on the CPU — on the default stream, and with the model and
   ``write()`` on a side stream while ``close()`` runs outside it. Each batch's logits
   are made right behind a long kernel, so a writer that read its pinned buffers before
   the copies landed would store stale rows.
2a. ``write_time``: ``write()``'s host time per call alone (mean, median, slowest), CUDA
   logits, each call after the device finished the last, four epochs.
2b. ``tokens``: a sequence store's TokenWriter fed CUDA logits (B, L, V) and labels stores
   the top-8 rows the CPU path stores for the same logits, with no host-device
   synchronisation inside ``write()``.
3. ``syncs``: host-device synchronisations per training step of the real training loop
   (``torch.cuda.set_sync_debug_mode("warn")``), PS-KD epochs 2 and 3, for ``--aug none``,
   ``cutout`` and ``cutmix``, with and without the progress bar.
4. ``rank_draws`` (two GPUs or more): a 2-rank torchrun on NCCL (benchmarks/rank_draws.py)
   whose ranks must draw other crops and Cutout holes from identical initial weights.
5. ``throughput`` and peak memory: samples/s and ``torch.cuda.max_memory_allocated`` of
   plain CE, PS-KD with the store, and PS-KD with a frozen copy of last epoch's model, on
   preact_resnet18 and densenet121, CIFAR-shaped random data, fp32 and ``--amp``
   (bfloat16), channels_last (``benchmarks/train_overhead.py``'s arms), one arm after another.
6. ``overhead``: the same arms on preact_resnet18 taking turns step by step, as
   ``train_overhead.py`` measures them (each turn ends when its kernels have run):
   the store's and the frozen teacher's samples/s over CE's, paired epoch by epoch, and
   where the training thread's time goes.
7. ``train``: a 3-epoch ``train()`` of the CIFAR recipe (preact_resnet18, fp32) on
   CIFAR-shaped random data, and its fixed cost per epoch (seal and evaluation).

They run in that order, but for ``train``, which runs before the long 5 and 6. On a
machine without a CUDA GPU it says so and exits 0; ``--device cpu`` runs the checks that do
not need CUDA (1 and 4, on gloo) there, to try the script itself. On an H200 (TF32
convolutions then) the checks took 25 s (matrix, 2 steps), 19 s (syncs, 20 steps), 121 s
(throughput, 6,400 samples), 82 s (overhead, 12,800 samples) and 7 s (train, 6,400
samples); in full float32 at the default 12,800 samples, throughput and overhead may take
several minutes each, so on a short lease run it in two calls. The report is written to
``--out`` at the start and after every check; the exit status is 1 when a check failed.
The repository needs no install (its root is put on the path); the machine needs torch,
torchvision, zarr, numcodecs, google-crc32c, donfig and tqdm.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --checks matrix,writer,write_time,tokens,syncs,train \
        --out "$OUT/gpu_check.json"
    PYTHONPATH=. python3 benchmarks/gpu_check.py --checks throughput,overhead --out "$OUT/gpu_perf.json"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from tqdm import tqdm

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # no install needed
from train_overhead import ARMS, build_parser, keep_freed_memory, measure, train_arm  # noqa: E402

from pskd_store import engine  # noqa: E402
from pskd_store.augment import BatchAugment  # noqa: E402
from pskd_store.data import DataSplits  # noqa: E402
from pskd_store.distributed import setup  # noqa: E402
from pskd_store.engine import float32_precision  # noqa: E402
from pskd_store.methods import METHODS  # noqa: E402
from pskd_store.recipe import AUGMENTATIONS, TrainConfig  # noqa: E402
from pskd_store.run_directory import RunDirectory  # noqa: E402
from pskd_store.sequences import token_labels  # noqa: E402
from pskd_store.store import SoftTargetStore  # noqa: E402
from pskd_store.training import (  # noqa: E402
    _set_teacher,
    _train_epoch,
    build_run,
    configure_determinism,
    train,
    train_loader,
)

K = 100
# what torch.cuda.set_sync_debug_mode("warn") says at a synchronising call (its one-time
# notice that the mode is a prototype mentions "synchronizing" too, and is no sync)
SYNC_WARNING = "called a synchronizing CUDA operation"
RANK_DRAWS = Path(__file__).resolve().parent / "rank_draws.py"


class CifarLike(Dataset):
    """Random 3x32x32 images with labels 0..99 (every class present), optionally through
    CIFAR's random crop and flip, so that DataLoader workers draw as on CIFAR."""

    def __init__(self, n: int, seed: int, augment: bool):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=generator)
        self.targets = (torch.arange(n) % K)[torch.randperm(n, generator=generator)].numpy()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]) if augment else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (image if self.transform is None else self.transform(image)), int(self.targets[index])


def cifar_splits(n_train: int, n_test: int, augment: bool = False) -> DataSplits:
    train_set = CifarLike(n_train, 0, augment)
    return DataSplits(train=train_set, val=None, test=CifarLike(n_test, 1, False), num_classes=K,
                      train_labels=train_set.targets, input_kind="32x32", random_transforms=augment)


def emit(name: str, result: dict, results: dict) -> None:
    results[name] = result
    print(json.dumps({name: result}), flush=True)


# -- 1. every method with every augmentation ------------------------------------------------

def check_matrix(tmp: Path, device: str, steps: int, batch_size: int, workers: int) -> dict:
    result = {}
    splits = cifar_splits(2 * steps * batch_size, 2 * batch_size, augment=True)  # one evaluation batch
    for method in METHODS:
        for aug in AUGMENTATIONS:
            name = f"{method}+{aug}"
            config = TrainConfig(dataset="cifar100", arch="preact_resnet18", method=method, aug=aug, epochs=2,
                                 batch_size=batch_size, steps_per_epoch=steps, workers=workers,
                                 device=device).resolved()
            try:
                train(config, tmp / name, quiet=True, splits=splits)
                store = SoftTargetStore.open(tmp / name / "store", read_only=True)
                written = [store.epoch_info(e)["ids_written"] for e in (1, 2)]
                expected = _recorded_per_epoch(method, aug, steps, batch_size)
                result[name] = {"ok": store.sealed_epochs == [1, 2] and all(
                    count == expected if expected is not None else count % batch_size == 0 for count in written),
                    "ids_written": written, "expected": expected}
            except Exception as err:  # the point of the check: which combination fails, and how
                result[name] = {"ok": False, "error": _error(err)}
            finally:  # one run's checkpoints (~85 MB each) on disk at a time, not fifteen runs'
                shutil.rmtree(tmp / name, ignore_errors=True)
    result["ok"] = all(r["ok"] for r in result.values())
    return result


def _recorded_per_epoch(method: str, aug: str, steps: int, batch_size: int) -> int | None:
    """The ids a matrix run records an epoch: every sample trained on its own, but PS-KD under
    --aug only its PS-KD half; None where CutMix mixes a whole batch by chance (a mixed batch
    records nothing: a multiple of the batch)."""
    if method == "pskd":
        return steps * batch_size // (1 if aug == "none" else 2)
    return None if aug == "cutmix" else steps * batch_size


def _error(err: BaseException) -> str:
    """An error as the report keeps it: its type, message and where (a GPU run is rare)."""
    return f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"


# -- 2. the writer on a GPU ---------------------------------------------------------------

def _write_epoch(store: SoftTargetStore, batches: list[torch.Tensor], logits: torch.Tensor,
                 stream: torch.cuda.Stream | None) -> tuple[np.ndarray, bool]:
    """Write one epoch batch by batch, each batch's logits made behind a long kernel on
    ``stream`` (None: the logits are on the CPU); return the sealed rows, and whether the
    device was still behind the host when the writer closed (else the check showed nothing:
    a writer reading its buffers early would have read them whole)."""
    writer = store.writer(1)
    behind = False
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None:
            stream.wait_stream(torch.cuda.default_stream())
            a, b = (torch.randn(4096, 4096, device=logits.device) for _ in range(2))
        for ids in batches:
            out = logits[ids]
            if stream is not None:
                busy = a @ b  # ~1 ms of work queued ahead of the logits, on this stream
                out = logits[ids.pin_memory().to(logits.device, non_blocking=True)] + busy[0, 0] * 0
            writer.write(ids, out)
        if stream is not None:
            behind = not stream.query()
    writer.close()  # outside the side stream
    store.seal(1)
    return store.read_epoch(1).astype(np.float32), behind


def check_writer(tmp: Path) -> dict:
    n = 20_000
    labels = np.arange(n) % K
    logits = torch.randn(n, K, generator=torch.Generator().manual_seed(0)) * 4
    batches = list(torch.randperm(n, generator=torch.Generator().manual_seed(1)).split(128))
    on_cpu, _ = _write_epoch(SoftTargetStore.create(tmp / "cpu", labels, K), batches, logits, None)
    gpu_logits = logits.cuda()
    result = {"rows": n}
    for name, stream in (("default_stream", torch.cuda.default_stream()), ("side_stream", torch.cuda.Stream())):
        stored, behind = _write_epoch(SoftTargetStore.create(tmp / name, labels, K), batches, gpu_logits, stream)
        difference = np.abs(stored - on_cpu).max(axis=1)
        # float16 rows of a softmax computed on two devices may differ in the last bit
        result[name] = {"max_abs_diff": float(difference.max()), "rows_wrong": int((difference > 1e-3).sum()),
                        "device_behind_at_close": behind}
    result["ok"] = all(result[s]["rows_wrong"] == 0 for s in ("default_stream", "side_stream"))
    return result


def check_write_time(tmp: Path, device: str = "cuda", samples: int = 12_800, epochs: int = 4) -> dict:
    """``write()``'s host time a call, alone: 128 x 100 logits on ``device``, each call after
    the device has finished the previous one (what a training step leaves), epoch by epoch.
    The mean holds what the median hides: every 32nd call takes or hands over a chunk
    buffer, and one that finds every buffer in flight waits for the background thread."""
    logits = torch.randn(samples, K, device=device)
    order = torch.randperm(samples)
    store = SoftTargetStore.create(tmp / "store", np.arange(samples) % K, K)
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    result = {}
    for epoch in range(1, epochs + 1):
        spent = []
        with store.writer(epoch) as writer:
            for lo in range(0, samples, 128):
                ids = order[lo:lo + 128]
                batch = logits[ids.to(device)]
                synchronize()
                started = time.perf_counter()
                writer.write(ids, batch)
                spent.append(1e6 * (time.perf_counter() - started))
        store.seal(epoch)
        result[f"epoch_{epoch}"] = {"mean_us": statistics.fmean(spent), "median_us": statistics.median(spent),
                                    "max_us": max(spent), "calls": len(spent)}
    return result


def check_tokens(tmp: Path) -> dict:
    sequences, length, vocabulary = 256, 32, 8_000
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocabulary, (sequences, length), generator=generator)
    labels[torch.rand(sequences, length, generator=generator) < 0.3] = -100  # prompts and padding
    logits = torch.randn(sequences, length, vocabulary, generator=generator) * 4
    tokens, lengths = token_labels(labels.numpy())
    batches = list(torch.randperm(sequences, generator=torch.Generator().manual_seed(1)).split(16))

    def write(device: str) -> tuple[np.ndarray, int]:
        store = SoftTargetStore.create(tmp / device, tokens, vocabulary, topk=8, lengths=lengths)
        on_device, device_labels = logits.to(device), labels.to(device)
        writer = store.writer(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            for ids in batches:
                picked = ids.to(device, non_blocking=True)
                writer.write(ids, on_device[picked], device_labels[picked])
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        writer.close()
        store.seal(1)
        return store.read_epoch(1), sum(SYNC_WARNING in str(w.message) for w in caught)

    on_cpu, _ = write("cpu")
    on_gpu, syncs = write("cuda")
    difference = np.abs(on_gpu - on_cpu).max(axis=1)  # rows rebuilt: a last-bit difference moves little
    rows_wrong = int((difference > 1e-3).sum())
    return {"token_rows": len(on_cpu), "max_abs_diff": float(difference.max()), "rows_wrong": rows_wrong,
            "syncs_in_write": syncs, "ok": rows_wrong == 0 and syncs == 0}


# -- 3. synchronisations per step ----------------------------------------------------------

def check_syncs(tmp: Path, steps: int, device: str = "cuda", batch_size: int = 128) -> dict:
    splits = cifar_splits(batch_size * steps, 512)
    result = {}
    for aug in ("none", "cutout", "cutmix"):
        config = TrainConfig(dataset="cifar100", arch="preact_resnet18", aug=aug, epochs=3, device=device,
                             batch_size=batch_size, steps_per_epoch=steps).resolved()
        env, chosen = setup(config.device, timedelta(seconds=config.dist_timeout))
        directory = RunDirectory(tmp / f"syncs-{aug}")
        run = build_run(config, directory, env, chosen, splits)
        loader, _ = train_loader(run.method, run.train_data, splits, config, env, chosen)
        augment = None
        if aug != "none":
            augment = BatchAugment(aug, K, cutmix_prob=config.cutmix_prob, cutout_hole=config.cutout_hole,
                                   seed=config.seed)
        _set_teacher(run.train_data, run.store, env, directory, 1)
        train_epoch = functools.partial(_train_epoch, run.model, run.method, loader, run.optimizer, run.store, config,
                                        env, chosen)
        train_epoch(1, augment, quiet=True)  # warm-up: workers, cuDNN autotuning
        run.store.seal(1)
        for epoch, bar in ((2, False), (3, True)):  # epochs with a teacher
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught, _bar_drawn(bar):
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    _set_teacher(run.train_data, run.store, env, directory, epoch)
                    train_epoch(epoch, augment, quiet=not bar)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            run.store.seal(epoch)
            syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
            where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
            result[f"{aug}{'_progress_bar' if bar else ''}"] = {
                "syncs_per_step": len(syncs) / steps, "syncs": len(syncs), "steps": steps,
                "where": dict(where.most_common(6)),
            }
    # the epoch's totals are read once at its end (a CUDA sync: the detector's positive
    # control); the progress bar reads its loss each step
    once = 1 if device == "cuda" else 0
    result["ok"] = all(result[aug]["syncs"] == once and (device != "cuda" or result[f"{aug}_progress_bar"]["syncs"]
                                                         > once) for aug in ("none", "cutout", "cutmix"))
    return result


@contextlib.contextmanager
def _bar_drawn(drawn: bool):
    """The training loop's progress bar drawn (into a string) when ``drawn``: tqdm turns
    itself off where its output is no terminal, as on a GPU machine run by a script."""
    if not drawn:
        yield
        return
    def bar(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": bool(kwargs.get("disable")), "file": io.StringIO()})
    engine.tqdm = bar
    try:
        yield
    finally:
        engine.tqdm = tqdm


# -- 4. two ranks draw apart -------------------------------------------------------------------

def check_rank_draws(tmp: Path, device: str) -> dict:
    if device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs two GPUs, this machine has {torch.cuda.device_count()}"}
    torchrun = shutil.which("torchrun")
    launched = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", str(RANK_DRAWS),
                               str(tmp), "--device", device], capture_output=True, text=True, timeout=300)
    if launched.returncode != 0:
        return {"ok": False, "error": launched.stderr[-2000:]}
    compared = json.loads(subprocess.run([sys.executable, str(RANK_DRAWS), str(tmp), "--compare"],
                                         capture_output=True, text=True, check=True, timeout=120).stdout)
    compared["ok"] = (compared["initial_weights_equal"] and compared["own_streams_differ"]
                      and compared["rows_whose_holes_differ"] > compared["rows"] // 2
                      and compared["rows_whose_crop_or_flip_differ"] > compared["rows"] // 2)
    return compared


# -- 5. throughput and memory -------------------------------------------------------------

def tensor_splits(samples: int) -> DataSplits:
    """CIFAR-shaped training tensors without transforms: loading costs the workers little,
    so the arms differ by the GPU's work and the training thread's."""
    splits = cifar_splits(samples, 256)
    splits.train = TensorDataset(splits.train.images, torch.as_tensor(splits.train.targets))
    return splits


def check_throughput(tmp: Path, samples: int, device: str = "cuda",
                     archs: tuple[str, ...] = ("preact_resnet18", "densenet121"),
                     amps: tuple[bool, ...] = (False, True)) -> dict:
    splits = tensor_splits(samples)
    result = {}
    for arch in archs:
        for amp in amps:
            args = build_parser().parse_args(["--arch", arch, "--epochs", "3", "--batch-size", "128", "--workers", "4",
                                              "--device", device, "--channels-last", *(["--amp"] if amp else [])])
            arms = {arm: train_arm(arm, splits, args, tmp) for arm in ARMS}
            key = f"{arch}_{'amp_bf16' if amp else 'fp32'}"
            result[key] = {
                **{f"{arm}_samples_per_s": m["samples_per_s"] for arm, m in arms.items()},
                **{f"{arm}_peak_gpu_mib": m.get("peak_gpu_mib") for arm, m in arms.items()},
                "store_over_ce": arms["store"]["samples_per_s"] / arms["ce"]["samples_per_s"],
                "teacher_over_ce": arms["teacher"]["samples_per_s"] / arms["ce"]["samples_per_s"],
                "store_fixed_s_per_epoch": arms["store"]["fixed_s_per_epoch"],
            }
            print(json.dumps({"throughput_" + key: result[key]}), flush=True)
    return result


def check_overhead(tmp: Path, samples: int, repeats: int, device: str = "cuda",
                   archs: tuple[str, ...] = ("preact_resnet18",), amps: tuple[bool, ...] = (False, True),
                   epochs: int = 4, batch_size: int = 128) -> dict:
    """The store's tax on a fast model's steps: the arms of check 5 taking turns step by step
    (``train_overhead.py``'s measurement: each turn ends when its kernels have run, the
    drift of the machine shared alike), paired medians over ``repeats`` rounds, and where
    the training thread's time went in the CE and store arms."""
    splits = tensor_splits(samples)
    result = {}
    for arch in archs:
        for amp in amps:
            args = build_parser().parse_args(["--arch", arch, "--epochs", str(epochs), "--batch-size", str(batch_size),
                                              "--workers", "4", "--repeats", str(repeats), "--device", device,
                                              "--channels-last", *(["--amp"] if amp else [])])
            measured = measure(splits, args, tmp)
            key = f"{arch}_{'amp_bf16' if amp else 'fp32'}"
            result[key] = {"paired_median": measured["paired_median"], "samples_per_s": measured["samples_per_s"],
                           "store_fixed_s_per_epoch": measured["store_fixed_s_per_epoch"],
                           "parts_ms_per_epoch": {arm: measured["parts_ms_per_epoch"][arm] for arm in ("ce", "store")}}
            print(json.dumps({"overhead_" + key: result[key]}), flush=True)
    return result


# -- 6. a short real training run --------------------------------------------------------------

def check_train(tmp: Path, samples: int) -> dict:
    config = TrainConfig(dataset="cifar100", epochs=3, device="cuda").resolved()
    started = time.perf_counter()
    train(config, tmp / "train", quiet=True, splits=cifar_splits(samples, 2_000, augment=True))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (tmp / "train" / "metrics.jsonl").read_text().splitlines()]
    return {
        "arch": config.arch, "amp": config.amp, "workers": config.workers, "train_samples": samples,
        "wall_s": wall,
        "epochs": [{"epoch": r["epoch"], "epoch_s": r["epoch_seconds"], "steps_s": r["train"]["seconds"],
                    "fixed_s": r["epoch_seconds"] - r["train"]["seconds"],
                    "samples_per_s": r["train"]["samples_per_s"]} for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=12_800, help="training samples per epoch (checks 5-7)")
    parser.add_argument("--sync-steps", type=int, default=30)
    parser.add_argument("--overhead-repeats", type=int, default=2, help="rounds of the overhead check's turns")
    parser.add_argument("--matrix-steps", type=int, default=3, help="steps per epoch of each method x aug run")
    parser.add_argument("--matrix-batch", type=int, default=64)
    parser.add_argument("--matrix-workers", type=int, default=2, help="DataLoader workers of each matrix run")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: only the checks that need no CUDA (matrix, rank_draws), to try the script")
    parser.add_argument("--checks", help="comma-separated names of the checks to run (default: all)")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"gpu_check": "skipped: no CUDA GPU on this machine; run it where one is"}))
        return
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "cuda": torch.version.cuda, "platform": platform.platform()}
    print(json.dumps(results), flush=True)
    configure_determinism(False)
    results["freed_memory_kept"] = keep_freed_memory()  # as train_overhead.py measures
    checks = [("matrix", lambda tmp: check_matrix(tmp, args.device, args.matrix_steps, args.matrix_batch,
                                                  args.matrix_workers)),
              ("rank_draws", lambda tmp: check_rank_draws(tmp, args.device))]
    if args.device == "cuda":
        checks[1:1] = [("writer", check_writer), ("write_time", check_write_time), ("tokens", check_tokens),
                       ("syncs", lambda tmp: check_syncs(tmp, args.sync_steps))]
        checks += [("train", lambda tmp: check_train(tmp, args.samples)),  # short: before the long two
                   ("throughput", lambda tmp: check_throughput(tmp, args.samples)),
                   ("overhead", lambda tmp: check_overhead(tmp, args.samples, args.overhead_repeats))]
    if args.checks:
        wanted = [name.strip() for name in args.checks.split(",")]
        unknown = sorted(set(wanted) - {name for name, _ in checks})
        if unknown:
            parser.error(f"--checks: no check {', '.join(unknown)} on {args.device}; "
                         f"choose among {', '.join(name for name, _ in checks)}")
        checks = [(name, check) for name, check in checks if name in wanted]
    if args.out:  # written now and after every check: a run cut short keeps what it found
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp, float32_precision(False):  # as pskd-store train runs
        for name, check in checks:
            started = time.perf_counter()
            (Path(tmp) / name).mkdir()
            try:
                result = check(Path(tmp) / name)
            except Exception as err:  # report and go on: the other checks still tell something
                result = {"error": _error(err)}
            result["check_s"] = time.perf_counter() - started
            emit(name, result, results)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    failed = [name for name, _ in checks if "error" in results[name] or results[name].get("ok") is False]
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed (see the JSON above)")


if __name__ == "__main__":
    main()
