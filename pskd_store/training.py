"""The training loop: the paper's recipe, with past predictions read from and written to
the run's store for every method (so baselines can be compared with PS-KD later).

Per epoch t: ``set_epoch(t)`` points the data set at sealed epoch t-1; each step trains on
the targets of the chosen method and hands (ids, logits) to the writer; at the end the
epoch is sealed while the test set is evaluated, test (and validation) metrics are
appended to ``metrics.jsonl`` and an atomic checkpoint is written. After the last epoch
its test probabilities go to ``eval/test_probs.npz`` (what ``inspect`` draws the
reliability diagram from). A resumed run rolls the store and the metrics back to its
checkpoint and continues with the same alpha_t and the same teacher epoch.

fp32 by default, as the paper trains; ``amp`` is opt-in (bfloat16 autocast). Under it the
logits are bfloat16 and the store records the softmax of those logits upcast to fp32.

Under torchrun every rank trains a DistributedDataParallel replica on its shard of each
epoch and writes the predictions of the ids it trained on into its own staging part; at
the epoch's end rank 0 seals while all ranks evaluate their shards of the test set, and
the node's local rank 0 decodes the new teacher once for the ranks of its node. Only rank 0
writes logs, metrics and checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .accelerator import accelerator_for
from .augment import CUTOUT_HOLE, BatchAugment
from .checkpoint import (
    CheckpointDamagedError,
    checkpoint_epoch,
    checkpoint_problem,
    checkpointed,
    link_into_place,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import DataSplits, build_datasets
from .dataset import SoftTargetDataset, collate_soft_targets
from .distributed import Distributed, local_main_first, setup, teardown
from .engine import eval_loader, float32_precision, predict_sharded, train_one_epoch
from .errors import StoreDamagedError, StoreError, StoreExistsError, StoreNotFoundError
from .methods import Method, create_method
from .metrics import evaluate
from .models import create_model, input_kind
from .recipe import PLACEMENT_OPTIONS, TrainConfig
from .run_directory import RunDirectory, writing
from .seeding import seed_process
from .store import SoftTargetStore

_logger = logging.getLogger("pskd_store.train")


def configure_determinism(deterministic: bool) -> None:
    """cuDNN autotuning for fixed input shapes (the authors' ``cudnn.benchmark = True``),
    or, with ``deterministic``, PyTorch's deterministic algorithms and no autotuning, so a
    resumed run repeats an uninterrupted one bit for bit on the same GPU and software."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    if deterministic != torch.are_deterministic_algorithms_enabled():  # the call imports inductor: 1 s
        torch.use_deterministic_algorithms(deterministic)


@dataclass
class RunParts:
    """What one training run is made of, built from its config, on one rank."""

    config: TrainConfig
    method: Method
    splits: DataSplits
    network: torch.nn.Module  # the model itself: evaluated and checkpointed
    model: torch.nn.Module    # what the steps train: the network, or its DDP wrapper
    store: SoftTargetStore
    train_data: SoftTargetDataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    test_loader: DataLoader
    val_loader: DataLoader | None


def build_run(config: TrainConfig, directory: RunDirectory, env: Distributed, device: torch.device,
              splits: DataSplits | None = None) -> RunParts:
    """Data, model, store and optimizer of a run on this rank (the store is created on
    first use, by rank 0). ``splits`` replaces the data set ``config`` names (benchmarks
    on synthetic data)."""
    if splits is None:  # one rank downloads or unpacks what is missing; the others then read it
        splits = local_main_first(env, lambda: build_datasets(
            config.dataset, config.data_dir, val_split=config.val_split, train_subset=config.train_subset,
            crop_flip=config.crop_flip, seed=config.seed, download=config.download, img_size=config.img_size),
            shared_between_nodes=True)
    model_kind = input_kind(config.arch)
    if model_kind != splits.input_kind and not (model_kind == "32x32" and config.img_size == 32):
        crop = " (or --img-size 32 for its 32-pixel crops)" if model_kind == "32x32" and config.img_size else ""
        inputs = f"{config.img_size}x{config.img_size}" if config.img_size else splits.input_kind
        raise ValueError(
            f"--arch {config.arch} takes {model_kind} inputs but {config.dataset} has {inputs} inputs; see "
            f"`pskd-store train --help` for the models of each{crop}"
        )
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    network = create_model(config.arch, splits.num_classes).to(device)
    seed_process(config.seed, env.rank)  # then every rank's own streams (dropout, ShakeDrop)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    model = network
    if env.enabled:
        model = DistributedDataParallel(network, device_ids=[device] if accelerator_for(device) else None)
    store = _open_store(config, directory, splits, env)
    method = create_method(config)
    # each sample's transforms drawn by where it is drawn (seeding.py); data without random
    # transforms (MNIST-1D) skips the seeding. A method that reads no teacher has alpha_T 0.
    train_data = SoftTargetDataset(splits.train, store, method.alpha_T, config.epochs, cache_dir=config.cache_dir,
                                   seed=config.seed if splits.random_transforms else None, rank=env.rank)
    optimizer = torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.milestones, config.lr_gamma)
    # Built once: persistent workers instead of new processes for every epoch's evaluation.
    def evaluation(data: Dataset) -> DataLoader:
        return eval_loader(_shard(data, env), 2 * config.batch_size, config.workers, device)

    return RunParts(config, method, splits, network, model, store, train_data, optimizer, scheduler,
                    evaluation(splits.test), evaluation(splits.val) if splits.val is not None else None)


def _open_store(config: TrainConfig, directory: RunDirectory, splits: DataSplits,
                env: Distributed) -> SoftTargetStore:
    """Rank 0 creates (or reopens) the store (RUN/store, or ``--store``); the others open it
    once it exists. A run with a checkpoint continues from the store's teachers: it must
    find its store, never a new empty one."""
    url = config.store or str(directory.store)
    store = None
    if env.is_main and directory.checkpoint.is_file():
        try:
            store = SoftTargetStore.open(url, labels=splits.train_labels, num_classes=splits.num_classes,
                                         names=splits.train_names)
        except StoreNotFoundError as err:
            raise StoreError(f"{directory.path} is checkpointed and continues from the teachers of its store, "
                             f"which is gone from {url}: restore the store there, or train the run anew into "
                             "another --output") from err
    elif env.is_main:
        store = SoftTargetStore.open_or_create(url, splits.train_labels, splits.num_classes, names=splits.train_names,
                                               dtype=config.store_dtype, topk=config.store_topk)
        if config.store is not None and not directory.config.exists():
            # a new run (its config.json comes after the store): the store is recorded as its own
            run = _run_id(directory)
            owner = store.claim_run(run)
            if owner != run:
                raise StoreExistsError(_another_runs_store(config.store, owner))
    env.barrier()
    return store or SoftTargetStore.open(url, labels=splits.train_labels, num_classes=splits.num_classes,
                                         names=splits.train_names)


def refuse_a_new_run_into(directory: RunDirectory) -> None:
    """A new run goes into a directory that holds no run and is no store, refused before
    anything is written there."""
    if directory.config.exists():
        raise ValueError(f"{directory.path} already holds a run: continue it with --resume {directory.path}, "
                         "or choose another --output")
    if (directory.path / "zarr.json").exists():
        raise ValueError(f"{directory.path} is a store, not a run directory: choose another --output (a run keeps "
                         "its store in RUN/store, or where --store says)")
    written = [path.name for path in (directory.metrics, directory.summary, directory.checkpoint.parent,
                                      directory.eval_probs().parent) if path.exists()]
    if written:  # a user's files, or a run's whose config.json is gone: the run would write over them
        raise ValueError(f"{directory.path} holds {', '.join(written)} but no run (no config.json): a new run "
                         "would write over them; choose another --output, or move them away")


def _refuse_another_runs_store(config: TrainConfig, directory: RunDirectory) -> None:
    """A new run with ``--store`` needs a store of its own there, refused before the run
    directory holds anything: its seal would find another run's epochs, and a resume of a
    run without a checkpoint rolls its store back to nothing, that run's epochs with it. The
    store records the run that first trains into it (``SoftTargetStore.claim_run``); one that
    records this run (the same command, interrupted), or none and has nothing sealed, is taken."""
    if config.store is None:  # RUN/store, in a directory that holds no run yet
        return
    try:
        store = SoftTargetStore.open(config.store, read_only=True)
    except StoreNotFoundError:
        return
    if not store.sealed_epochs and store.run in (None, _run_id(directory)):
        return
    raise StoreExistsError(_another_runs_store(config.store, store.run))


def _run_id(directory: RunDirectory) -> str:
    """How a store records the run that trains into it: its directory."""
    return str(directory.path.resolve())


def _another_runs_store(url: str, owner: str | None) -> str:
    run = f"the run in {owner}" if owner else "another run"
    return (f"a store already exists at {url}, {run}'s: give this run one of its own (another --store, or none "
            f"for RUN/store), or continue {run} with --resume{f' {owner}' if owner else ''}")


def _shard(data: Dataset, env: Distributed) -> Dataset:
    """Every world_size-th sample from this rank's index: the test set split without padding."""
    return data if not env.enabled else Subset(data, range(env.rank, len(data), env.world_size))


def train(config: TrainConfig, directory: Path, *, resume: bool = False, from_epoch: int | None = None,
          quiet: bool = False, splits: DataSplits | None = None) -> dict | None:
    """Train (or resume) the run in ``directory``; returns the final summary on rank 0
    (None on the other ranks of a torchrun launch). A resumed run continues after its last
    checkpoint, or with ``from_epoch`` after the kept checkpoint of that epoch (the
    previous one: when the last checkpoint or the newest teacher is damaged). ``splits``
    replaces the data set ``config`` names (benchmarks on synthetic data)."""
    env, device = setup(config.device, timedelta(seconds=config.dist_timeout))
    run_directory = RunDirectory(Path(directory))
    try:
        with run_directory.lock() if env.is_main else nullcontext(), float32_precision(config.tf32):
            return _train(config, run_directory, env, device, resume=resume or from_epoch is not None,
                          from_epoch=from_epoch, quiet=quiet or not env.is_main, splits=splits)
    finally:
        teardown()


def _train(config: TrainConfig, directory: RunDirectory, env: Distributed, device: torch.device, *,
           resume: bool, from_epoch: int | None, quiet: bool, splits: DataSplits | None) -> dict | None:
    if env.is_main:
        _logger.info("run directory %s", directory.path)  # the log's first line, once this process holds the run
    if config.world_size not in (None, env.world_size):  # None: a config made before the field, or by hand
        if not resume:
            raise ValueError(
                f"this config was resolved for {config.world_size} process(es) (a batch of {config.batch_size} "
                f"each), but trains in {env.world_size}: build and resolve it in each process "
                "(TrainConfig(...).resolved() reads torchrun's environment)")
        raise ValueError(
            f"the run in {directory.path} trains in {config.world_size} process(es) with a batch of "
            f"{config.batch_size} each (world_size in its config): run it in as many (torchrun --nproc-per-node "
            f"{config.world_size}), not {env.world_size}, or its batch of {config.world_size * config.batch_size} "
            "would change")
    if env.is_main:
        directory.remove_temporary_files()
        if not resume:
            refuse_a_new_run_into(directory)
            _refuse_another_runs_store(config, directory)
    configure_determinism(config.deterministic)
    run = build_run(config, directory, env, device, splits)
    if env.is_main and not resume:  # once the data set, the model and the store took the config
        with writing(directory.config):
            config.save(directory.config)
    start = 1
    if resume:
        start = _restore(run, directory, env, device, from_epoch) + 1
    loader, sampler = train_loader(run.method, run.train_data, run.splits, config, env, device)
    augment = None
    if config.aug != "none":
        augment = BatchAugment(config.aug, run.splits.num_classes, cutmix_prob=config.cutmix_prob,
                               cutout_hole=CUTOUT_HOLE if config.cutout_hole is None else config.cutout_hole,
                               seed=config.seed, rank=env.rank)
    test_predictions = None
    for epoch in range(start, config.epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        _set_teacher(run.train_data, run.store, env, directory, epoch)
        train_stats = _train_epoch(run.model, run.method, loader, run.optimizer, run.store, config, env, device,
                                   epoch, augment, quiet)
        row = {"epoch": epoch, "alpha_t": run.method.alpha(epoch, config.epochs),
               "lr": run.scheduler.get_last_lr()[0], "train": train_stats}
        run.scheduler.step()
        env.barrier()  # every rank's writer has closed its part
        env.share_buffers(run.network)
        evaluate_on = dict(env=env, device=device, amp=config.amp, channels_last=config.channels_last)
        with ThreadPoolExecutor(1) as background:  # the seal's I/O overlaps the evaluation
            # a baseline whose every batch CutMix mixed recorded nothing: its ids carry forward
            sealing = background.submit(run.store.seal, epoch, allow_empty=True) if env.is_main else None
            test_predictions = predict_sharded(run.network, run.test_loader, **evaluate_on)
            if run.val_loader is not None:
                val_predictions = predict_sharded(run.network, run.val_loader, **evaluate_on)
            if sealing is not None:
                sealing.result()
        env.barrier()  # the epoch is sealed before any rank reads it as the next teacher
        rng = env.gather_to_main(rng_state(device))
        if not env.is_main:
            continue
        row["test"] = evaluate(*test_predictions, n_bins=config.ece_bins)
        if run.val_loader is not None:
            row["val"] = evaluate(*val_predictions, n_bins=config.ece_bins)
        row["epoch_seconds"] = time.perf_counter() - started  # steps, seal and evaluation
        directory.append_metrics(row)
        with writing(directory.checkpoint):
            state = dict(model=run.network.state_dict(), optimizer=run.optimizer.state_dict(),
                         scheduler=run.scheduler.state_dict(), epoch=epoch, config=config.__dict__, rng=rng,
                         seal_token=run.store.epoch_info(epoch)["seal_token"])
            save_checkpoint(directory.checkpoint, state, previous=directory.previous_checkpoint)
        _log_epoch(row, config.epochs)
    env.barrier()  # the last checkpoint is written before any rank leaves
    if start > config.epochs and not directory.eval_probs().is_file():  # every rank agrees: a collective
        # resumed with nothing left to train, killed after the last checkpoint and before this file
        test_predictions = predict_sharded(run.network, run.test_loader, env=env, device=device, amp=config.amp,
                                           channels_last=config.channels_last)
    if not env.is_main:
        return None
    if test_predictions is not None:  # else resumed with nothing left to train: the file is there
        directory.write_eval_probs(*test_predictions, sources=[str(directory.checkpoint)])
    summary = {"run": str(directory.path), "config": config.__dict__, "epochs": config.epochs,
               "world_size": env.world_size, **summarize_metrics(directory.metrics_rows()),
               "store": run.store.summary()}
    directory.write_summary(summary)
    return summary


def summarize_metrics(rows: list[dict]) -> dict:
    """``final``: the last epoch's test (and val) metrics; ``best``: those of the epoch with
    the lowest test top-1 error, the first such epoch on a tie (what the authors' code
    reports as its best accuracy)."""
    best = min(rows, key=lambda row: row["test"]["top1_err"])  # min keeps the first of equals
    splits = ("test", "val")
    return {"final": {"epoch": rows[-1]["epoch"], **{k: v for k, v in rows[-1].items() if k in splits}},
            "best": {"epoch": best["epoch"], **{k: v for k, v in best.items() if k in splits}}}


def train_loader(method: Method, data: SoftTargetDataset, splits: DataSplits, config: TrainConfig,
                 env: Distributed, device: torch.device) -> tuple[DataLoader, Sampler]:
    """This rank's shard of each epoch, batched as ``method`` draws them, and the sampler to
    ``set_epoch``: the order depends only on the seed and the epoch, so a resumed run sees
    the same batches."""
    # a generator of its own: the workers' base seed (unused: items are seeded by where
    # they are drawn) is not taken from the process's stream, which a resume restores
    common = dict(num_workers=config.workers, persistent_workers=config.workers > 0,
                  pin_memory=accelerator_for(device) is not None, collate_fn=collate_soft_targets,
                  generator=torch.Generator().manual_seed(config.seed))
    batching, sampler = method.sampling(data, splits.train_labels, config.batch_size, num_replicas=env.world_size,
                                        rank=env.rank, seed=config.seed)
    return DataLoader(data, **batching, **common), sampler


def _set_teacher(data: SoftTargetDataset, store: SoftTargetStore, env: Distributed, directory: RunDirectory,
                 epoch: int) -> None:
    """Point the data set at sealed epoch ``epoch - 1``: the node's local rank 0 decodes it
    into the node's cache first, then the node's other ranks map that same file. A damaged
    teacher stops the run with the one command that resumes it before that epoch."""
    try:
        local_main_first(env, lambda: data.set_epoch(epoch))
    except StoreDamagedError as err:
        raise StoreDamagedError(f"{err}. {_teacher_advice(directory, store, epoch - 1)}") from err


def _teacher_advice(directory: RunDirectory, store: SoftTargetStore, damaged: int) -> str:
    """How to go on when the teacher of epoch ``damaged`` cannot be read."""
    previous = directory.previous_checkpoint
    if previous.is_file() and checkpoint_problem(previous) is None and checkpoint_epoch(previous) == damaged - 1:
        if not _predictions_kept(store, damaged - 1):
            return (f"The checkpoint of epoch {damaged - 1} is kept, but not that epoch's predictions, which "
                    f"resuming from it needs (the store keeps {store.teacher_epochs}): restore the store from a "
                    "backup, or train the run anew")
        return (f"Train epoch {damaged} again from the checkpoint before it (the store keeps epoch "
                f"{damaged - 1}'s teacher): pskd-store train --resume {directory.path} --from-epoch {damaged - 1}")
    return "No checkpoint of the epoch before it is kept: restore the store from a backup, or train the run anew"


def _predictions_kept(store: SoftTargetStore, epoch: int) -> bool:
    """Whether a run can resume from its checkpoint of ``epoch``: the next epoch trains on
    that epoch's teacher, which a later seal may have pruned (``keep_epochs``)."""
    store.refresh()
    return epoch in store.teacher_epochs


def _train_epoch(model: torch.nn.Module, method: Method, loader: DataLoader, optimizer: torch.optim.Optimizer,
                 store: SoftTargetStore, config: TrainConfig, env: Distributed, device: torch.device, epoch: int,
                 augment: BatchAugment | None, quiet: bool) -> dict:
    """One epoch's steps on this rank, its predictions written to the store; the statistics
    of every rank's shard."""
    steps = len(loader) if config.steps_per_epoch is None else min(len(loader), config.steps_per_epoch)
    started = time.perf_counter()
    with store.writer(epoch, rank=env.rank, world_size=env.world_size) as writer:
        totals = train_one_epoch(model, method, loader, optimizer, writer, device, epoch=epoch,
                                 epochs=config.epochs, steps=steps, augment=augment, amp=config.amp,
                                 channels_last=config.channels_last, quiet=quiet)
    seconds = time.perf_counter() - started
    if env.enabled:
        torch.distributed.all_reduce(totals)  # the whole epoch, every rank's shard
    loss_sum, correct, seen = totals.tolist()
    return {"loss": loss_sum / seen, "top1_err": 100.0 * (1 - correct / seen), "samples": int(seen),
            "samples_per_s": seen / seconds, "seconds": seconds}


def _restore(run: RunParts, directory: RunDirectory, env: Distributed, device: torch.device,
             from_epoch: int | None) -> int:
    """Load the checkpoint to resume from (every rank); rank 0 rolls the store, the metrics
    and, with ``from_epoch``, the later checkpoint back to it. Returns its epoch: 0 for a
    run killed before its first checkpoint, which then starts over with an empty store."""
    path = _checkpoint_of(directory, from_epoch)
    if path is None:
        if checkpointed(run.store.sealed_epochs):
            raise ValueError(f"{directory.path} has no checkpoint, but its store has sealed epochs "
                             f"{run.store.sealed_epochs}: its checkpoints were deleted or moved. Put them back "
                             "in checkpoints/, or train the run anew into another --output")
        return _roll_back(run.store, directory, env, 0)
    try:
        state = load_checkpoint(path)
    except CheckpointDamagedError as err:
        raise CheckpointDamagedError(f"{err}; {_resume_advice(directory, run.store, path)}") from err
    _require_the_checkpoints_config(run.config, state["config"], directory, path)
    if env.is_main:
        _say_what_computes_otherwise(state["config"], run.config, device)
    _require_the_epoch_it_sealed(run.store, state, path)
    run.network.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rng) != env.world_size:
        raise ValueError(
            f"{directory.path} was checkpointed by {len(rng)} process(es); resume it with as many "
            f"(torchrun --nproc-per-node ...), not {env.world_size}, so that every rank's "
            "random state and data shard carry on"
        )
    set_rng_state(rng[env.rank], device)
    _require_the_metrics_of(directory, state["epoch"])
    return _roll_back(run.store, directory, env, state["epoch"], checkpoint=path)


def _require_the_epoch_it_sealed(store: SoftTargetStore, state: dict, path: Path) -> None:
    """The store's epoch a checkpoint was saved after is the one its run sealed (the seal
    token it recorded): another run writing into the same --store may have rolled it back
    and sealed its own, whose teacher this run would train on; a store that lost the epoch
    has no teacher for the next. Refused before anything changes; a checkpoint from before
    tokens were recorded is checked for its epoch only."""
    epoch, token = state["epoch"], state.get("seal_token")
    if epoch not in store.sealed_epochs:
        raise StoreError(
            f"{store.url} has sealed epochs {store.sealed_epochs}, but the checkpoint {path} was taken after epoch "
            f"{epoch}: the store lost epochs this run trained on. Nothing was changed; restore the store from a "
            "backup, or resume from the kept checkpoint of an epoch it holds (--from-epoch)")
    if token is None:
        return
    sealed = store.epoch_info(epoch)["seal_token"]
    if sealed != token:
        raise StoreError(
            f"epoch {epoch} of {store.url} is not the one this run sealed before its checkpoint {path} (seal token "
            f"{sealed}, the checkpoint's {token}): another run has sealed epochs into this store (two runs given "
            "one --store?), and its teachers are not this run's. Nothing was changed; train this run anew with a "
            "store of its own")


def _require_the_metrics_of(directory: RunDirectory, epoch: int) -> None:
    """A resumed run's metrics.jsonl keeps the rows of the epochs its checkpoint trained, which
    summary.json's best and final epochs are chosen from; refused, before anything changes,
    when some were deleted."""
    missing = directory.missing_metrics(epoch)
    if missing:
        raise ValueError(f"{directory.metrics} lacks the rows of epochs {missing}, which the checkpoint of epoch "
                         f"{epoch} trained: put them back (a backup), or evaluate the checkpoint alone with "
                         f"pskd-store eval {directory.path}")


def _require_the_checkpoints_config(config: TrainConfig, saved: dict, directory: RunDirectory, path: Path) -> None:
    """A resumed run trains on as its checkpoint did: a config.json edited since (the
    epochs, on which alpha_t = alpha_T·t/T depends, alpha_T, the method) would change the
    targets from the next epoch on without a word. Where and how fast it computes may change."""
    resumed = json.loads(json.dumps(config.__dict__))  # as config.json holds it: lists, not tuples
    saved = json.loads(json.dumps(saved))
    changed = [key for key in sorted(saved.keys() & resumed.keys())
               if key not in PLACEMENT_OPTIONS and saved[key] != resumed[key]]
    if changed:
        differences = ", ".join(f"{key} {resumed[key]!r} (trained with {saved[key]!r})" for key in changed)
        raise ValueError(f"{directory.config} differs from the run its checkpoint {path} trained: {differences}; "
                         "a resumed run trains on as it began: restore config.json, or train a new run with "
                         "these settings")


def _say_what_computes_otherwise(saved: dict, config: TrainConfig, device: torch.device) -> None:
    """A resume may change --amp and --tf32 (a run moved to another machine), but the epochs
    after it then compute otherwise than those before: the log says so. TF32 exists on an
    accelerator alone (NVIDIA's from Ampere on), where runs made before --tf32 ran cuDNN's
    TF32 convolutions and full-float32 matrix products: neither setting resumes them as they were."""
    changes = []
    if saved.get("amp", False) != config.amp:
        changes.append(f"amp={config.amp} (trained with amp={saved.get('amp', False)})")
    if accelerator_for(device) is not None and saved.get("tf32") != config.tf32:
        before = "TF32 convolutions and float32 matrix products, made before --tf32" if "tf32" not in saved else \
            f"tf32={saved['tf32']}"
        changes.append(f"tf32={config.tf32} (trained with {before}; on GPUs with TF32, Ampere and later)")
    if changes:
        _logger.warning("resuming with %s: the epochs from here compute otherwise than those before",
                        "; ".join(changes))


def _checkpoint_of(directory: RunDirectory, from_epoch: int | None) -> Path | None:
    """The last checkpoint (None when there is none: a run killed before its first), or the
    kept one of ``from_epoch``. A run whose last checkpoint is gone but whose previous one is
    there lost the last by hand (a checkpoint is renamed into place, never removed): it is
    refused, not started over past the epochs that previous one holds."""
    if from_epoch is None:
        if directory.checkpoint.is_file():
            return directory.checkpoint
        previous = directory.previous_checkpoint
        if previous.is_file() and checkpoint_problem(previous) is None:
            epoch = checkpoint_epoch(previous)
            raise ValueError(f"{directory.checkpoint} is gone, but {previous} keeps epoch {epoch}: resume from it "
                             f"with --resume {directory.path} --from-epoch {epoch}, or train the run anew into "
                             "another --output")
        return None
    kept = {}
    for path in (directory.checkpoint, directory.previous_checkpoint):
        if path.is_file() and checkpoint_problem(path) is None:
            kept[checkpoint_epoch(path)] = path
    if from_epoch not in kept:
        raise ValueError(f"--from-epoch {from_epoch}: {directory.path} keeps intact checkpoints of epochs "
                         f"{sorted(kept) or 'none'}; resume from one of those")
    return kept[from_epoch]


def _resume_advice(directory: RunDirectory, store: SoftTargetStore, damaged: Path) -> str:
    """The one command that resumes past a damaged checkpoint, or what else to do."""
    previous = directory.previous_checkpoint
    if damaged != previous and previous.is_file() and checkpoint_problem(previous) is None:
        epoch = checkpoint_epoch(previous)
        if not _predictions_kept(store, epoch):  # killed after the next seal pruned them, before its checkpoint
            return (f"the checkpoint of epoch {epoch} is intact, but not that epoch's predictions, which resuming "
                    f"from it needs (the store keeps {store.teacher_epochs}): restore it from a backup, or train "
                    "the run anew into another --output")
        return (f"resume from epoch {epoch}, whose checkpoint is intact: "
                f"pskd-store train --resume {directory.path} --from-epoch {epoch}")
    if checkpointed(store.sealed_epochs):  # a run without checkpoints is refused then (_restore)
        return "restore it from a backup, or train the run anew into another --output"
    return "restore it from a backup, or delete it to train the run again from epoch 1"


def _roll_back(store: SoftTargetStore, directory: RunDirectory, env: Distributed, epoch: int,
               checkpoint: Path | None = None) -> int:
    """Rank 0 forgets what came after ``epoch`` (sealed epochs, metrics rows, a later last
    checkpoint than ``checkpoint``, the one resumed from); all wait."""
    if env.is_main:
        dropped = store.rollback(epoch)
        directory.keep_metrics_through(epoch)
        if checkpoint is not None and checkpoint != directory.checkpoint:
            with writing(directory.checkpoint):
                link_into_place(checkpoint, directory.checkpoint)
        _logger.info("resuming %s after epoch %d%s", directory.path, epoch,
                     f" (dropped unfinished epochs {dropped} from the store)" if dropped else "")
    env.barrier()
    store.refresh()
    return epoch


def _log_epoch(row: dict, epochs: int) -> None:
    train, test = row["train"], row["test"]
    _logger.info(
        "epoch %d/%d  alpha_t %.3f  lr %.4g  train loss %.4f err %.2f%%  %.0f samples/s  |  "
        "test err %.2f%%  nll %.4f  ece %.2f%%  aurc %.2f",
        row["epoch"], epochs, row["alpha_t"], row["lr"], train["loss"], train["top1_err"],
        train["samples_per_s"], test["top1_err"], test["nll"], test["ece"], test["aurc"],
    )
