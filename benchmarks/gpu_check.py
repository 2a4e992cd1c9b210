"""What only a CUDA GPU can show; prints one JSON object per check, then a summary.

1. ``writer``: PredictionWriter fed CUDA logits stores exactly the rows it stores when
   fed the same logits on the CPU — on the default stream, and with the model and
   ``write()`` on a side stream while ``close()`` runs outside it. Each batch's logits
   are made right behind a long kernel, so a writer that read its pinned buffers before
   the copies landed would store stale rows.
2. ``syncs``: host-device synchronisations per training step of the real training loop
   (``torch.cuda.set_sync_debug_mode("warn")``), PS-KD epoch 2, for ``--aug none``,
   ``cutout`` and ``cutmix``, with and without the progress bar.
3. ``throughput`` and 4. peak memory: samples/s and ``torch.cuda.max_memory_allocated``
   of plain CE, PS-KD with the store, and PS-KD with a frozen copy of last epoch's model,
   on preact_resnet18 and densenet121, CIFAR-shaped random data, fp32 and ``--amp``
   (bfloat16), channels_last (``benchmarks/train_overhead.py``'s arms).
5. ``train``: a 3-epoch ``train()`` of the CIFAR recipe (preact_resnet18, fp32) on
   CIFAR-shaped random data, and its fixed cost per epoch (seal and evaluation).

On a machine without a CUDA GPU it says so and exits 0. About 3-5 minutes on an H100.

    python benchmarks/gpu_check.py [--samples 12800] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import ARMS, train_arm  # noqa: E402

from pskd_store.augment import BatchAugment  # noqa: E402
from pskd_store.data import DataSplits  # noqa: E402
from pskd_store.distributed import setup  # noqa: E402
from pskd_store.recipe import TrainConfig  # noqa: E402
from pskd_store.run_directory import RunDirectory  # noqa: E402
from pskd_store.store import SoftTargetStore  # noqa: E402
from pskd_store.training import _train_epoch, _train_loader, build_run, configure_determinism, train  # noqa: E402

K = 100
DEVICE = "cuda"


def cifar_like(n: int, seed: int) -> TensorDataset:
    """Normalised-looking random 3x32x32 images with labels 0..99 (every class present)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.arange(n) % K
    return TensorDataset(images, labels[torch.randperm(n, generator=generator)])


def cifar_splits(n_train: int, n_test: int) -> DataSplits:
    train_set, test_set = cifar_like(n_train, 0), cifar_like(n_test, 1)
    return DataSplits(train=train_set, val=None, test=test_set, num_classes=K,
                      train_labels=train_set.tensors[1].numpy(), input_kind="32x32")


def emit(name: str, result: dict, results: dict) -> None:
    results[name] = result
    print(json.dumps({name: result}), flush=True)


# -- 1. the writer on a GPU ---------------------------------------------------------------

def _write_epoch(store: SoftTargetStore, batches: list[torch.Tensor], logits: torch.Tensor,
                 stream: torch.cuda.Stream | None) -> np.ndarray:
    """Write one epoch batch by batch, each batch's logits made behind a long kernel on
    ``stream`` (None: the logits are on the CPU); return the sealed rows."""
    writer = store.writer(1)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None:
            stream.wait_stream(torch.cuda.default_stream())
            a, b = (torch.randn(4096, 4096, device=logits.device) for _ in range(2))
        for ids in batches:
            out = logits[ids]
            if stream is not None:
                busy = a @ b  # ~1 ms of work queued ahead of the logits, on this stream
                out = logits[ids.to(logits.device, non_blocking=True)] + busy[0, 0] * 0
            writer.write(ids, out)
    writer.close()  # outside the side stream
    store.seal(1)
    return store.read_epoch(1).astype(np.float32)


def check_writer(tmp: Path) -> dict:
    n = 20_000
    labels = np.arange(n) % K
    logits = torch.randn(n, K, generator=torch.Generator().manual_seed(0)) * 4
    batches = list(torch.randperm(n, generator=torch.Generator().manual_seed(1)).split(128))
    on_cpu = _write_epoch(SoftTargetStore.create(tmp / "cpu", labels, K), batches, logits, None)
    gpu_logits = logits.cuda()
    result = {"rows": n}
    for name, stream in (("default_stream", torch.cuda.default_stream()), ("side_stream", torch.cuda.Stream())):
        stored = _write_epoch(SoftTargetStore.create(tmp / name, labels, K), batches, gpu_logits, stream)
        difference = np.abs(stored - on_cpu).max(axis=1)
        # float16 rows of a softmax computed on two devices may differ in the last bit
        result[name] = {"max_abs_diff": float(difference.max()), "rows_wrong": int((difference > 1e-3).sum())}
    result["ok"] = all(result[s]["rows_wrong"] == 0 for s in ("default_stream", "side_stream"))
    return result


# -- 2. synchronisations per step ----------------------------------------------------------

def check_syncs(tmp: Path, steps: int) -> dict:
    splits = cifar_splits(128 * steps, 512)
    result = {}
    for aug in ("none", "cutout", "cutmix"):
        config = TrainConfig(dataset="cifar100", arch="preact_resnet18", aug=aug, epochs=3, device=DEVICE,
                             steps_per_epoch=steps).resolved()
        env, device = setup(config.device)
        run = build_run(config, RunDirectory(tmp / f"syncs-{aug}"), env, device, splits)
        loader = _train_loader(run)
        augment = BatchAugment(aug, K, half_batch=True) if aug != "none" else None
        _train_epoch(run, loader, 1, augment, quiet=True)  # warm-up: workers, cuDNN autotuning
        run.store.seal(1)
        for epoch, bar in ((2, False), (3, True)):  # epochs with a teacher
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    _train_epoch(run, loader, epoch, augment, quiet=not bar)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            run.store.seal(epoch)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
            result[f"{aug}{'_progress_bar' if bar else ''}"] = {
                "syncs_per_step": len(syncs) / steps, "syncs": len(syncs), "steps": steps,
                "where": dict(where.most_common(6)),
            }
    return result


# -- 3, 4. throughput and memory -------------------------------------------------------------

def check_throughput(tmp: Path, samples: int) -> dict:
    splits = cifar_splits(samples, 256)
    result = {}
    for arch in ("preact_resnet18", "densenet121"):
        for amp in (False, True):
            args = SimpleNamespace(arch=arch, epochs=3, batch_size=128, alpha_T=0.8, workers=4, device=DEVICE,
                                   amp=amp, channels_last=True)
            arms = {arm: train_arm(arm, splits, args, tmp) for arm in ARMS}
            key = f"{arch}_{'amp_bf16' if amp else 'fp32'}"
            result[key] = {
                **{f"{arm}_samples_per_s": m["samples_per_s"] for arm, m in arms.items()},
                **{f"{arm}_peak_gpu_mib": m["peak_gpu_mib"] for arm, m in arms.items()},
                "store_over_ce": arms["store"]["samples_per_s"] / arms["ce"]["samples_per_s"],
                "teacher_over_ce": arms["teacher"]["samples_per_s"] / arms["ce"]["samples_per_s"],
                "store_fixed_s_per_epoch": arms["store"]["fixed_s_per_epoch"],
            }
            print(json.dumps({"throughput_" + key: result[key]}), flush=True)
    return result


# -- 5. a short real training run --------------------------------------------------------------

def check_train(tmp: Path, samples: int) -> dict:
    config = TrainConfig(dataset="cifar100", epochs=3, device=DEVICE).resolved()
    started = time.perf_counter()
    train(config, tmp / "train", quiet=True, splits=cifar_splits(samples, 2_000))
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
    parser.add_argument("--samples", type=int, default=12_800, help="training samples per epoch (checks 3 and 5)")
    parser.add_argument("--sync-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"gpu_check": "skipped: no CUDA GPU on this machine; run it where one is"}))
        return
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "platform": platform.platform()}
    print(json.dumps(results), flush=True)
    configure_determinism(False)
    checks = (("writer", lambda tmp: check_writer(tmp)),
              ("syncs", lambda tmp: check_syncs(tmp, args.sync_steps)),
              ("throughput", lambda tmp: check_throughput(tmp, args.samples)),
              ("train", lambda tmp: check_train(tmp, args.samples)))
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in checks:
            started = time.perf_counter()
            try:
                result = check(Path(tmp) / name)
            except Exception as err:  # report and go on: the other checks still tell something
                result = {"error": f"{type(err).__name__}: {err}"}
            result["check_s"] = time.perf_counter() - started
            emit(name, result, results)
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
