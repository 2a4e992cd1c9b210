"""An ImageNet-sized epoch through the store, in bounded memory; prints JSON.

N = 1,281,167 rows, K = 1000 classes, float16 (2.6 GB dense), written by 1 and by 2 writer
processes (DDP ranks: each writes its DistributedSampler shard of the ids, in shuffled
order, padding duplicate included), then sealed and decoded for serving, each step in a
fresh process so that each peak RSS is its own. Reported per writer count:

  * ``write``: rows/s of all writers together (rows over the slowest writer's time from
    making its writer to closing it) and each writer's peak RSS; each writer process uses
    cores/writers torch threads, as torchrun's OMP_NUM_THREADS does;
  * ``seal`` and ``prepare`` (decode to the memory map): seconds, baseline RSS (after
    imports and opening the store) and peak RSS above it (VmHWM, restarted at the baseline
    through /proc/self/clear_refs: Linux only);
  * ``prepare.cached_seconds``: the next epoch's ``prepare`` of the same file, which checks
    the cached file's crc32c (what every epoch's ``set_epoch`` pays);
  * ``verify``: seconds of `pskd-store verify` on the store (every chunk's checksum, every
    row's values, the trajectory and the cached file), and its ratio to ``prepare``;
  * ``lookup``: median time of a batch-256 gather from the served epoch;
  * bytes on disk of the sealed epoch, against the authors' dense float32 table (N*K*4
    bytes in every rank's memory; x8 for an 8-GPU node, where the memory map is shared);
  * ``machine``: what this machine's disk and codec do with the same bytes, measured in the
    same run: a plain sequential write of the epoch's rows to a file (no fsync, as the
    store's writes), and Blosc-zstd compression and decompression of the same rows in
    memory with the store's codec; each step's MB/s (of uncompressed rows) is set against
    them and its ``bound`` named: the baseline it comes closest to, where it reaches 0.8 of
    it, else ``cpu`` (the step's own work, not the disk or the codec, holds it back);
  * ``topk_runs`` (``--topk 5,10,20``, one writer each): the same steps for top-k stores,
    their bytes and lookup time against the dense float16 run, and the mean and max L1
    distance between rebuilt and true targets at alpha_t = 0.8.

Rows are peaked softmax outputs (random logits, one class boosted: ``make_pool``), float16, drawn from a
pool of distinct rows so that generating them costs the writers nothing; the row of id i
depends on i only, so both writer counts seal the same epoch (a served batch is checked
against the rows written).

    python benchmarks/scale_bench.py                        # full size: ~9 GB free under --workdir
    python benchmarks/scale_bench.py --rows 50000 --classes 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

POOL = 8192  # distinct rows; more than a chunk's rows, so a chunk never repeats one


def rows_of(ids: np.ndarray, pool: np.ndarray) -> np.ndarray:
    return pool[(ids * 7919) % len(pool)]


def make_pool(num_classes: int) -> np.ndarray:
    """Peaked rows, like a trained ImageNet model's on its training set: logits N(0, 3), one
    class raised by U(8, 18); at K = 1000 the top class holds 0.69 of the mass on average,
    the top 5 0.83, the top 20 0.91 (printed as ``pool``)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, (POOL, num_classes))
    logits[np.arange(POOL), rng.integers(0, num_classes, POOL)] += rng.uniform(8.0, 18.0, POOL)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return (probs / probs.sum(1, keepdims=True)).astype(np.float16)


def shard(num_samples: int, rank: int, world: int) -> np.ndarray:
    """What DistributedSampler(shuffle=True) gives ``rank``: a permutation padded to a
    multiple of ``world`` with its first ids, every ``world``-th id from ``rank``."""
    order = np.random.default_rng(1).permutation(num_samples)
    padded = np.concatenate([order, order[:(-num_samples) % world]])
    return padded[rank::world]


def status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0]) * 1024


def start_measuring() -> int:
    """Restart the peak RSS from the current RSS (Linux's clear_refs); returns the baseline."""
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS")


# -- the child processes: one step each -------------------------------------------------------


def child_write(args) -> dict:
    import torch

    from pskd_store.store import SoftTargetStore

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))  # as torchrun's OMP_NUM_THREADS
    store = SoftTargetStore.open(args.store)
    pool = torch.from_numpy(make_pool(store.num_classes))
    ids = torch.from_numpy(shard(store.num_samples, args.rank, args.world))
    index = (ids * 7919) % len(pool)
    start = time.perf_counter()
    with store.writer(1, rank=args.rank, from_logits=False) as writer:
        for lo in range(0, len(ids), args.batch):
            writer.write(ids[lo:lo + args.batch], pool[index[lo:lo + args.batch]])
    return {"rows": len(ids), "seconds": time.perf_counter() - start, "peak_rss": status("VmHWM")}


def child_seal(args) -> dict:
    from pskd_store.store import SoftTargetStore

    store = SoftTargetStore.open(args.store)
    baseline = start_measuring()
    start = time.perf_counter()
    info = store.seal(1, scratch_dir=args.scratch)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "baseline_rss": baseline, "peak_rss_above_baseline": status("VmHWM") - baseline,
            "nbytes_stored": info["nbytes_stored"], "nbytes": info["nbytes"],
            "duplicates": info["duplicates"], "carried_forward": info["carried_forward"]}


def child_prepare(args) -> dict:
    import torch

    from pskd_store.service import PredictionService
    from pskd_store.store import SoftTargetStore

    store = SoftTargetStore.open(args.store, read_only=True)
    service = PredictionService(store, cache_dir=args.cache)
    baseline = start_measuring()
    start = time.perf_counter()
    token = service.prepare(1)
    seconds = time.perf_counter() - start
    peak = status("VmHWM") - baseline
    pool = make_pool(store.num_classes)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, store.num_samples, args.batch) for _ in range(300)]
    service.lookup(1, token, batches[0])
    times = []
    for ids in batches:
        t = time.perf_counter()
        service.lookup(1, token, ids)
        times.append(time.perf_counter() - t)
    checked = batches[-1]
    encoding = store.encoding  # a top-k store serves its rows rebuilt
    expected = torch.from_numpy(encoding.expand(encoding.encode(torch.from_numpy(rows_of(checked, pool))).numpy()))
    start = time.perf_counter()  # the next epoch's set_epoch: the cached file's checksum is checked
    PredictionService(store, cache_dir=args.cache).prepare(1)
    cached = time.perf_counter() - start
    return {"seconds": seconds, "cached_seconds": cached, "baseline_rss": baseline, "peak_rss_above_baseline": peak,
            "lookup_us_per_batch": statistics.median(times) * 1e6,
            "rows_match": bool(torch.equal(service.lookup(1, token, checked), expected))}


def child_verify(args) -> dict:
    from pskd_store.store import SoftTargetStore
    from pskd_store.verify import verify_store

    store = SoftTargetStore.open(args.store, read_only=True)
    start = time.perf_counter()
    report = verify_store(store, cache_dir=args.cache)  # the epoch, its trajectory and its cached file
    return {"seconds": time.perf_counter() - start, "ok": report.ok}


CHILDREN = {"write": child_write, "seal": child_seal, "prepare": child_prepare, "verify": child_verify}


# -- the parent: one scenario per writer count ---------------------------------------------------


def run_child(role: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--role", role, *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def scenario(args, workdir: Path, world: int, topk: int | None = None) -> dict:
    from pskd_store.store import SoftTargetStore

    store_path = workdir / f"store-{world}"
    labels = np.random.default_rng(3).integers(0, args.classes, args.rows)
    SoftTargetStore.create(store_path, labels, args.classes, dtype="float16", topk=topk, overwrite=True)
    common = ["--store", str(store_path), "--batch", str(args.batch)]
    writers = [subprocess.Popen([sys.executable, __file__, "--role", "write", *common,
                                 "--rank", str(rank), "--world", str(world)],
                                stdout=subprocess.PIPE, text=True) for rank in range(world)]
    results = []
    for proc in writers:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a writer failed with exit code {proc.returncode}")
        results.append(json.loads(stdout))
    rows = sum(r["rows"] for r in results)
    write = {"rows": rows, "rows_per_s": rows / max(r["seconds"] for r in results),
             "seconds_per_writer": [r["seconds"] for r in results],
             "peak_rss_per_writer": [r["peak_rss"] for r in results]}
    seal = run_child("seal", *common, "--scratch", str(workdir))
    prepare = run_child("prepare", *common, "--cache", str(workdir / f"cache-{world}"))
    verify = run_child("verify", *common, "--cache", str(workdir / f"cache-{world}"))
    verify["over_prepare"] = verify["seconds"] / prepare["seconds"]
    shutil.rmtree(store_path)
    shutil.rmtree(workdir / f"cache-{world}")
    return {"writers": world, "topk": topk, "write": write, "seal": seal, "prepare": prepare, "verify": verify}


def machine_baselines(args, workdir: Path) -> dict:
    """MB/s of uncompressed rows: a plain sequential write of the epoch's bytes, chunk by
    chunk as the writer hands them over, and the store's Blosc-zstd on the same chunks."""
    import numcodecs

    from pskd_store.store import DEFAULT_BLOSC, default_chunk_rows

    pool = make_pool(args.classes)
    rows = default_chunk_rows(args.classes * 2, args.rows)
    chunks = [rows_of(np.arange(lo, min(lo + rows, args.rows)), pool) for lo in range(0, args.rows, rows)]
    nbytes = sum(chunk.nbytes for chunk in chunks)
    start = time.perf_counter()
    with open(workdir / "plain.bin", "wb") as file:
        for chunk in chunks:
            file.write(chunk)
    write_s = time.perf_counter() - start
    (workdir / "plain.bin").unlink()
    shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[DEFAULT_BLOSC["shuffle"]]
    codec = numcodecs.Blosc(DEFAULT_BLOSC["cname"], DEFAULT_BLOSC["clevel"], shuffle)  # what zarr's BloscCodec runs
    start = time.perf_counter()
    compressed = [codec.encode(chunk) for chunk in chunks]  # the type size follows the float16 rows
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    for buffer in compressed:
        codec.decode(buffer)
    decompress_s = time.perf_counter() - start
    return {"bytes": nbytes, "plain_write_mb_s": nbytes / write_s / 1e6,
            "zstd_compress_mb_s": nbytes / compress_s / 1e6, "zstd_decompress_mb_s": nbytes / decompress_s / 1e6,
            "zstd_ratio": nbytes / sum(len(buffer) for buffer in compressed)}


def against_machine(run: dict, machine: dict) -> None:
    """Each step's MB/s of uncompressed rows, its ratio to the baselines, and its bound."""
    nbytes = run["seal"]["nbytes"]
    steps = {"write": nbytes / max(run["write"]["seconds_per_writer"]), "seal": nbytes / run["seal"]["seconds"],
             "prepare": nbytes / run["prepare"]["seconds"]}
    baselines = {"write": ("plain_write_mb_s",), "seal": ("plain_write_mb_s", "zstd_compress_mb_s"),
                 "prepare": ("plain_write_mb_s", "zstd_decompress_mb_s")}
    for step, rate in steps.items():
        ratios = {name: rate / 1e6 / machine[name] for name in baselines[step]}
        closest = max(ratios, key=ratios.get)  # a bound only where the step runs near it: else Python's CPU
        run[step].update(mb_s=rate / 1e6, vs_machine=ratios, bound=closest if ratios[closest] >= 0.8 else "cpu")


def pool_statistics(num_classes: int) -> dict:
    """How peaked the written rows are: the mean mass of their top 1, 5, 10 and 20 classes."""
    top = -np.sort(-make_pool(num_classes).astype(np.float32), axis=1)
    return {f"mean_top{k}_mass": float(top[:, :k].sum(axis=1).mean()) for k in (1, 5, 10, 20)}


def target_distance(num_classes: int, topk: int, alpha: float = 0.8) -> dict:
    """L1 distance between the target rebuilt from a top-k row and the true target
    (1 - a)·onehot + a·p, over the pool's rows (every sample's row is one of them): a·|p' - p|_1."""
    import torch

    from pskd_store.row_encoding import TopKRows

    pool = make_pool(num_classes)
    encoding = TopKRows(num_classes, "float16", topk)
    rebuilt = encoding.expand(encoding.encode(torch.from_numpy(pool)).numpy())
    distance = alpha * np.abs(rebuilt - pool.astype(np.float32)).sum(axis=1)
    return {"alpha_t": alpha, "mean_l1": float(distance.mean()), "max_l1": float(distance.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--writers", default="1,2", help="writer counts to run, comma-separated")
    parser.add_argument("--topk", default="5,10,20", help="top-k stores to run (1 writer each), comma-separated")
    parser.add_argument("--workdir", default=None, help="where stores, scratch and caches go (local disk)")
    parser.add_argument("--role", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    for name, kind in (("store", str), ("rank", int), ("world", int), ("scratch", str), ("cache", str)):
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(CHILDREN[args.role](args)))
        return
    dense = args.rows * args.classes * 4
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pskd-scale-", dir=args.workdir) as workdir:
        machine = machine_baselines(args, Path(workdir))
        runs = [scenario(args, Path(workdir), int(w)) for w in args.writers.split(",")]
        topk_runs = [scenario(args, Path(workdir), 1, int(k)) for k in args.topk.split(",") if k]
    for run in runs:
        against_machine(run, machine)
    stored = runs[0]["seal"]["nbytes_stored"]
    for run in topk_runs:
        run["bytes_vs_dense_float16"] = run["seal"]["nbytes_stored"] / stored
        run["bytes_vs_dense_float32_table"] = run["seal"]["nbytes_stored"] / dense
        run["lookup_vs_dense"] = run["prepare"]["lookup_us_per_batch"] / runs[0]["prepare"]["lookup_us_per_batch"]
        run["target_distance"] = target_distance(args.classes, run["topk"])
    print(json.dumps({
        "rows": args.rows, "classes": args.classes, "dtype": "float16", "batch": args.batch,
        "cpus": os.cpu_count(), "pool": pool_statistics(args.classes), "machine": machine,
        "runs": runs, "topk_runs": topk_runs,
        "bytes": {
            "stored_per_epoch": stored,
            "served_per_node": args.rows * args.classes * 2,  # one memory map, shared by the node's ranks
            "dense_float32_per_rank": dense,
            "dense_float32_per_8_rank_node": 8 * dense,
        },
    }, indent=2))


if __name__ == "__main__":
    main()
