"""Evaluate trained checkpoints, alone or as an ensemble (averaged softmax outputs)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_checkpoint
from .data import FOLDER_DATASETS, DataSplits, build_datasets
from .distributed import use_device
from .engine import Predictions, eval_loader, float32_precision, predict
from .metrics import evaluate
from .models import create_model
from .recipe import TrainConfig
from .run_directory import RunDirectory
from .store import Fingerprint, SoftTargetStore


def evaluate_checkpoints(
    paths: list[Path], *, split: str = "test", data_dir: str | None = None,
    device: str = "auto", ece_bins: int | None = None,
) -> tuple[dict[str, float], Predictions]:
    """Metrics and predictions of ``paths`` on ``split``: one checkpoint's, or the average
    of their probabilities (an ensemble's, whose NLL and top-k come from them: it has no logits).
    ECE takes the first run's ``ece_bins`` unless given, as its training metrics and
    ``inspect`` do."""
    states = [load_checkpoint(path) for path in paths]
    configs = [TrainConfig(**state["config"]) for state in states]
    if len({_samples_of(config, split, data_dir is None) for config in configs}) > 1:
        raise ValueError(f"an ensemble needs checkpoints trained on the same data set, whose {split} split "
                         "holds the same samples (image folders: in the same directory, or name it with --data-dir)")
    first = configs[0]
    splits = build_datasets(first.dataset, data_dir or first.data_dir, val_split=first.val_split,
                            seed=first.seed, download=False, img_size=first.img_size,
                            train_subset=first.train_subset)
    data = splits.test if split == "test" else splits.val
    if data is None:
        raise ValueError("these runs held out no validation split (train with --val-split)")
    if split == "val":
        for path in paths:
            _require_the_training_set_of(RunDirectory(path.parent.parent), splits)
    torch_device = use_device(device)
    loader = eval_loader(data, 2 * first.batch_size, first.workers, torch_device)
    members = []
    for path, state, config in zip(paths, states, configs):
        model = create_model(config.arch, splits.num_classes).to(torch_device)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # a classifier of another number of classes than the data's
            raise ValueError(f"{path} does not fit the {splits.num_classes} classes of the data in "
                             f"{data_dir or first.data_dir}: evaluate it on the data it was trained on") from err
        with float32_precision(config.tf32):  # as it trained: full float32 unless --tf32
            members.append(predict(model, loader, torch_device, amp=config.amp, channels_last=config.channels_last))
    if len(members) == 1:  # a model's NLL from its logits; an ensemble's from its averaged probabilities
        predictions = members[0]
    else:
        predictions = Predictions(sum(member.probs for member in members) / len(members), members[0].labels, None, None)
    return evaluate(*predictions, n_bins=first.ece_bins if ece_bins is None else ece_bins), predictions


def _require_the_training_set_of(run: RunDirectory, splits: DataSplits) -> None:
    """The validation split is drawn from the training set by position: from a training set
    changed since the run (an image added), it would hold samples the model trained on. The
    run's store fingerprints the training set it trained on; a run whose store is out of
    reach (a loose checkpoint, an object store without credentials) is not checked."""
    try:
        store = SoftTargetStore.open(run.store_url(), read_only=True)
    except Exception:  # none there, or out of reach (botocore's own errors too): eval needs no store
        return
    problem = store.fingerprint.mismatch(Fingerprint.of(splits.train_labels, splits.num_classes,
                                                        names=splits.train_names))
    if problem:
        raise ValueError(f"the training set is not the one {run.path} trained on ({problem}): its validation "
                         "split would now hold samples the model trained on; evaluate on the run's data")


def _samples_of(config: TrainConfig, split: str, own_data: bool) -> tuple:
    """What decides the samples of ``split`` and how they are shown to a model: the test
    split is the data set's own, whatever the training subset, hold-out or seed; the
    validation split is drawn from the training set by those. An image-folder set is its
    directory's (``own_data``: each run's, none being named for all)."""
    where = str(Path(config.data_dir).resolve()) if own_data and config.dataset in FOLDER_DATASETS else None
    if split == "test":
        return config.dataset, config.img_size, where
    return config.dataset, config.train_subset, config.val_split, config.seed, config.img_size, where
