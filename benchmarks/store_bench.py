"""Soft-target store performance against its baselines, measured in one run; prints JSON.

Lookups: a batch of past predictions by dataset id, three ways —
  * ``memory``: gather rows of an in-memory float32 (N, K) tensor (the authors' approach),
  * ``service``: the memory-mapped sealed epoch (what SoftTargetDataset reads),
  * ``zarr_per_sample``: one read per sample straight from the compressed Zarr array.
Writes: the training thread's cost of ``PredictionWriter.write`` per batch, between
simulated training steps, against the authors' in-memory table update in the same loop;
and end-to-end rows/s written back to back (the writer's own speed limit), with the seal.
Disk: stored bytes of one epoch per dtype and codec.

Predictions are synthetic but shaped like a trained model's: softmax of Gaussian logits
with the true class boosted, so most rows are peaked (what compresses, and what does not).

    python benchmarks/store_bench.py            # N=50,000, K=100, batch 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pskd_store.loss import soft_target
from pskd_store.service import PredictionService
from pskd_store.store import DEFAULT_BLOSC, SoftTargetStore

CODECS = {
    "zstd-bitshuffle": DEFAULT_BLOSC,
    "lz4-shuffle": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "blosclz-shuffle": {"cname": "blosclz", "clevel": 5, "shuffle": "shuffle"},
    "uncompressed": {"cname": "lz4", "clevel": 0, "shuffle": "noshuffle"},
}


def trained_like_logits(num_samples: int, num_classes: int, labels: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (num_samples, num_classes)).astype(np.float32)
    logits[np.arange(num_samples), labels] += rng.uniform(0.0, 8.0, num_samples).astype(np.float32)
    return torch.from_numpy(logits)


def time_per_call(fn, batches: list, repeats: int) -> float:
    """Median seconds per call of ``fn(batch)`` over ``repeats`` passes (after a warm-up)."""
    fn(batches[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        times.append((time.perf_counter() - start) / len(batches))
    return statistics.median(times)


def write_epoch(store: SoftTargetStore, epoch: int, logits: torch.Tensor, batch: int) -> float:
    """Write one shuffled epoch back to back and seal it; return the seconds it took."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(epoch))
    batches = [(ids, logits[ids]) for ids in order.split(batch)]
    start = time.perf_counter()
    writer = store.writer(epoch)
    for ids, out in batches:
        writer.write(ids, out)
    writer.close()
    store.seal(epoch)
    return time.perf_counter() - start


def training_thread_cost(store: SoftTargetStore, logits: torch.Tensor, args) -> dict:
    """Per-batch cost of recording predictions on a training thread that does real work.

    The 'step' is a CPU matrix product of about ``--step-ms`` (it evicts caches, as a real
    step does) followed by producing the batch's logits. Three arms alternate over the same
    batches: no hook, the authors' in-memory table update (``table[ids] = softmax``) and
    ``PredictionWriter.write``. Reported: the mean time inside each hook, and each arm's
    step time. ``write_hot_us`` is write() back to back with warm caches (its own cost).
    """
    work = torch.randn(384, 384)
    reps = max(1, round(args.step_ms / 1.6))  # ~1.6 ms per product on the reference machine
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0))
    batches = order.split(args.batch)
    table = torch.zeros(store.num_samples, store.num_classes)
    epoch = store.latest_sealed + 1

    def in_memory(ids: torch.Tensor, out: torch.Tensor) -> None:
        table[ids] = out.softmax(dim=1)

    def run(hook) -> tuple[float, float]:
        in_hook = 0.0
        start = time.perf_counter()
        for ids in batches:
            for _ in range(reps):
                torch.mm(work, work)
            out = logits[ids]  # the step's output, fresh in cache as a model's logits are
            if hook is not None:
                t0 = time.perf_counter()
                hook(ids, out)
                in_hook += time.perf_counter() - t0
        return (time.perf_counter() - start) / len(batches), in_hook / len(batches)

    arms: dict[str, list] = {"none": [], "in_memory": [], "writer": []}
    for _ in range(args.repeats):
        arms["none"].append(run(None))
        arms["in_memory"].append(run(in_memory))
        writer = store.writer(epoch)
        arms["writer"].append(run(writer.write))
        writer.abandon()
    step = {name: statistics.median(r[0] for r in runs) for name, runs in arms.items()}
    hook = {name: statistics.median(r[1] for r in runs) for name, runs in arms.items()}

    writer = store.writer(epoch)  # warm: as many batches as the writer's buffers hold
    hot = []
    for ids in batches[: 3 * store.chunk_rows // args.batch]:
        out = logits[ids]
        t0 = time.perf_counter()
        writer.write(ids, out)
        hot.append(time.perf_counter() - t0)
    writer.abandon()
    return {
        "step_ms": step["none"] * 1e3,
        "write_us_per_batch": hook["writer"] * 1e6,
        "training_thread_rows_per_s": args.batch / hook["writer"],
        "in_memory_update_us_per_batch": hook["in_memory"] * 1e6,
        "write_over_in_memory": hook["writer"] / hook["in_memory"],
        "write_hot_us": statistics.median(hot) * 1e6,
        "throughput_ratio_writer": step["none"] / step["writer"],
        "throughput_ratio_in_memory": step["none"] / step["in_memory"],
    }


def bench_lookup(store: SoftTargetStore, args, root: Path) -> dict:
    labels = torch.from_numpy(store.labels)
    service = PredictionService(store, root / "mmap")
    epoch = store.latest_sealed
    token = service.prepare(epoch)
    table = torch.from_numpy(store.read_epoch(epoch).astype(np.float32))  # the in-memory baseline
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, store.num_samples, (args.batch,), generator=gen) for _ in range(args.lookup_batches)]
    alpha = 0.5

    memory = time_per_call(lambda ids: table[ids], batches, args.repeats)  # the authors' all_predictions[ids]
    memory_index_select = time_per_call(lambda ids: table.index_select(0, ids), batches, args.repeats)
    service_s = time_per_call(lambda ids: service.lookup(epoch, token, ids.numpy()), batches, args.repeats)
    memory_blend = time_per_call(lambda ids: soft_target(labels[ids], table[ids], alpha), batches, args.repeats)
    service_blend = time_per_call(
        lambda ids: soft_target(labels[ids], service.lookup(epoch, token, ids.numpy()), alpha), batches, args.repeats
    )
    zarr_array = store.teacher_array(epoch)
    zarr_s = time_per_call(
        lambda ids: np.concatenate([zarr_array[int(i):int(i) + 1] for i in ids]), batches[: args.zarr_batches], 1
    )
    return {
        "batch": args.batch,
        "memory_gather_us": memory * 1e6,
        "memory_index_select_us": memory_index_select * 1e6,  # torch's fastest in-memory gather
        "service_gather_us": service_s * 1e6,
        "zarr_per_sample_us": zarr_s * 1e6,
        "memory_gather_blend_us": memory_blend * 1e6,
        "service_gather_blend_us": service_blend * 1e6,
        "service_over_memory": service_s / memory,
        "service_over_memory_index_select": service_s / memory_index_select,
        "service_blend_over_memory_blend": service_blend / memory_blend,
        "zarr_over_service": zarr_s / service_s,
    }


def bench_verify(store: SoftTargetStore) -> dict:
    """`pskd-store verify` of the whole store (every checksum and value of the kept teacher
    epochs, every trajectory), against decoding the same teacher epochs (read_epoch)."""
    from pskd_store.verify import verify_store

    start = time.perf_counter()
    report = verify_store(store, cache_dir=Path(store.url).with_name("no-cache"))
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    for epoch in store.teacher_epochs:
        store.read_epoch(epoch)
    decode_s = time.perf_counter() - start
    epochs = len(store.teacher_epochs)
    return {"ok": report.ok, "teacher_epochs": epochs, "verify_s_per_epoch": verify_s / epochs,
            "decode_s_per_epoch": decode_s / epochs, "verify_over_decode": verify_s / decode_s}


def bench_topk_lookup(args, root: Path) -> list[dict]:
    """Service lookup (gather + rebuild to (B, K) float32) of top-k stores against a dense
    float16 store of the same predictions, at K = 100 and K = 1000."""
    rows = []
    for num_classes in (100, 1000):
        labels = np.random.default_rng(0).integers(0, num_classes, args.num_samples)
        logits = trained_like_logits(args.num_samples, num_classes, labels, seed=2)
        ids = [torch.randint(0, args.num_samples, (args.batch,), generator=torch.Generator().manual_seed(i))
               for i in range(args.lookup_batches)]
        times = {}
        for topk in (None, 5, 10):
            store = SoftTargetStore.create(root / f"topk-{num_classes}-{topk}", labels, num_classes, topk=topk)
            write_epoch(store, 1, logits, args.batch)
            service = PredictionService(store)
            token = service.prepare(1)
            times[topk] = time_per_call(lambda batch: service.lookup(1, token, batch.numpy()), ids, args.repeats)
        for topk in (5, 10):
            rows.append({"num_classes": num_classes, "topk": topk, "lookup_us": times[topk] * 1e6,
                         "dense_lookup_us": times[None] * 1e6, "topk_over_dense": times[topk] / times[None]})
    return rows


def bench_disk(labels: np.ndarray, logits: torch.Tensor, num_classes: int, args, root: Path) -> list[dict]:
    rows = []
    for dtype in ("float16", "float32"):
        for name, blosc in CODECS.items():
            store = SoftTargetStore.create(root / f"disk-{dtype}-{name}", labels, num_classes, dtype=dtype, blosc=blosc)
            seconds = write_epoch(store, 1, logits, args.batch)
            info = store.epoch_info(1)
            rows.append({
                "dtype": dtype, "codec": name, "bytes_per_epoch": info["nbytes_stored"],
                "raw_bytes": info["nbytes"], "ratio": info["nbytes"] / info["nbytes_stored"],
                "write_epoch_s": seconds,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lookup-batches", type=int, default=200)
    parser.add_argument("--zarr-batches", type=int, default=3, help="per-sample Zarr reads are slow")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated training step between writes")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a DataLoader worker's view: one thread each

    labels = np.random.default_rng(0).integers(0, args.num_classes, args.num_samples)
    logits = trained_like_logits(args.num_samples, args.num_classes, labels, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = SoftTargetStore.create(root / "store", labels, args.num_classes)
        end_to_end = statistics.median(write_epoch(store, epoch, logits, args.batch) for epoch in (1, 2, 3))
        result = {
            "benchmark": "store_bench",
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "num_samples": args.num_samples,
            "num_classes": args.num_classes,
            "lookup": bench_lookup(store, args, root),
            "write": {
                **training_thread_cost(store, logits, args),
                "end_to_end_rows_per_s": args.num_samples / end_to_end,
                "end_to_end_epoch_s": end_to_end,
            },
            "verify": bench_verify(store),
            "topk_lookup": bench_topk_lookup(args, root),
            "disk": bench_disk(labels, logits, args.num_classes, args, root),
        }
    lookup, write = result["lookup"], result["write"]
    result["targets"] = {
        "service_within_2x_memory": lookup["service_over_memory"] <= 2.0,
        "service_50x_faster_than_zarr_per_sample": lookup["zarr_over_service"] >= 50.0,
        "writer_under_50us_per_batch": write["write_us_per_batch"] < 50.0,
        "writer_hot_under_50us_per_batch": write["write_hot_us"] < 50.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
