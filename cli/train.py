"""``pskd-store train``: the paper's recipe end to end, or the offline default."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

import click
from click.core import ParameterSource

from pskd_store.augment import CUTOUT_HOLE
from pskd_store.data import DATASETS
from pskd_store.methods import METHODS
from pskd_store.models import available_models, input_kind
from pskd_store.recipe import (
    ARCH_DEFAULTS,
    AUGMENTATIONS,
    DATASET_DEFAULTS,
    PLACEMENT_OPTIONS,
    TFKD_DEFAULTS,
    TrainConfig,
    absolute_if_local,
)
from pskd_store.run_directory import RunDirectory, RunError, RunHeldError
from pskd_store.store import StoreError

from .logs import setup_logging


def _models_epilog() -> str:
    by_kind: dict[str, list[str]] = {}
    for name in available_models(torchvision=False):  # torchvision's import would slow every command
        by_kind.setdefault(input_kind(name), []).append(name)
    return "\n".join([
        "\b",
        "Architectures (--arch):",
        f"  32x32 (CIFAR):    {', '.join(by_kind.get('32x32', []))}",
        f"  1-D (MNIST-1D):   {', '.join(by_kind.get('mnist1d', []))}",
        f"  28x28 (Fashion-MNIST): {', '.join(by_kind.get('28x28', []))}",
        "  224x224 (ImageNet, folder): every torchvision classifier as tv_<name>,",
        "                    e.g. tv_resnet152 (the paper's), tv_resnet50, tv_vit_b_16",
        "\b",
        "Defaults per data set (override any with its option):",
        *[f"  {name:9s} arch {d['arch']}, {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']}, "
          f"wd {d['weight_decay']}, lr x0.1 at "
          f"{', '.join(f'{m:.0%}' for m in d['milestones']) + ' of the epochs' if d['milestones'] else 'no epoch'}"
          for name, d in DATASET_DEFAULTS.items()],
        "  pyramidnet200, pyramidnet200_shakedrop: batch 64, lr 0.25, wd 1e-4",
    ])


def _per_dataset(field: str) -> str:
    return ", ".join(f"{name} {defaults[field]:g}" for name, defaults in DATASET_DEFAULTS.items())


def _per_arch(field: str) -> str:
    return _where_set(ARCH_DEFAULTS, field, TFKD_DEFAULTS[field])


def _where_set(table: dict[str, dict], field: str, otherwise: float) -> str:
    special = [f"{name} {defaults[field]:g}" for name, defaults in table.items() if field in defaults]
    return ", ".join(special + [f"else {otherwise:g}"])


# Every default is TrainConfig's: the options below only point at it.
DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}


def _choices(options: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in options.items())


# Options that define the run; --resume takes them from the run's config.json instead.
RUN_OPTIONS = ("dataset", "data_dir", "download", "arch", "method", "alpha_T", "aug", "epochs",
               "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "lr_gamma",
               "val_split", "train_subset", "crop_flip", "seed", "deterministic", "steps_per_epoch", "store_dtype",
               "store_topk", "store", "ece_bins", "cutmix_prob", "cutout_hole", "img_size", "tfkd_alpha",
               "tfkd_temperature",
               "tfkd_multiplier", "cskd_temperature", "cskd_weight", "output")


@click.command("train", epilog=_models_epilog())
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=DEFAULTS["dataset"], show_default=True,
              help=_choices(DATASETS))
@click.option("--data-dir", default=DEFAULTS["data_dir"], show_default=True, type=click.Path(file_okay=False),
              help="Where the data set is (or is downloaded / generated to).")
@click.option("--download/--no-download", default=DEFAULTS["download"], show_default=True,
              help="Let torchvision download CIFAR or Fashion-MNIST when missing (Fashion-MNIST is first "
                   "unpacked from Debian's dataset-fashion-mnist when installed).")
@click.option("--arch", help="Model (see below); default: per data set.")
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULTS["method"], show_default=True,
              help=_choices({name: method.description for name, method in METHODS.items()}))
@click.option("--alpha-T", "alpha_T", type=float, default=DEFAULTS["alpha_T"], show_default=True,
              help="PS-KD's alpha_T: weight of past predictions at the last epoch (a_t = alpha_T·t/T).")
@click.option("--aug", type=click.Choice(list(AUGMENTATIONS)), default=DEFAULTS["aug"], show_default=True,
              help=_choices(AUGMENTATIONS))
@click.option("--epochs", type=int, help="Epochs T.")
@click.option("-b", "--batch-size", type=int,
              help="Batch size of each process; default: the recipe's batch, split among torchrun's "
                   "processes (as the authors' code splits it among its GPUs).")
@click.option("--lr", type=float, help="Initial learning rate (SGD).")
@click.option("--momentum", type=float, default=DEFAULTS["momentum"], show_default=True,
              help="SGD momentum (the paper's 0.9).")
@click.option("--nesterov/--no-nesterov", default=DEFAULTS["nesterov"], show_default=True,
              help="Nesterov momentum, as the authors' main.py sets it.")
@click.option("--wd", "--weight-decay", "weight_decay", type=float, help="Weight decay.")
@click.option("--milestones", help="Epochs at which lr is multiplied by --lr-gamma, e.g. 150,225.")
@click.option("--lr-gamma", type=float, default=DEFAULTS["lr_gamma"], show_default=True,
              help="What the lr is multiplied by at each of --milestones (the paper's 0.1).")
@click.option("--val-split", type=float, default=DEFAULTS["val_split"], show_default=True,
              help="Hold out this fraction of the training set (e.g. 0.1) to tune alpha_T.")
@click.option("--train-subset", type=int,
              help="Train on this many samples, as many of each class, the same for every seed: the small-data "
                   "regime where a network memorises its labels. Default: the whole training set.")
@click.option("--crop-flip/--no-crop-flip", default=DEFAULTS["crop_flip"], show_default=True,
              help="The data set's random crop and flip (and ImageNet's colour changes) on training images. "
                   "--no-crop-flip trains on the images as they are: a departure from the recipes, to reach the "
                   "regime where a network memorises its labels.")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True,
              help="Seeds the initial weights, the data order, the hold-out split and every augmentation: the "
                   "same seed on the same device repeats a run.")
@click.option("-j", "--workers", type=int,
              help="DataLoader worker processes; default min(4, usable CPUs), 0 for MNIST-1D (in memory).")
@click.option("--device", default=DEFAULTS["device"], show_default=True,
              help="auto, cpu, cuda or cuda:N. Under torchrun each process takes cuda:LOCAL_RANK.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Node-local folder for the decoded teacher (one per node, shared by its ranks, and by "
                   "other runs: each store decodes into its own subfolder); default: beside the store when "
                   "it is a local path.")
@click.option("--amp/--no-amp", default=DEFAULTS["amp"], show_default=True,
              help="bfloat16 autocast (opt-in: the paper trains in fp32), on a GPU; a CPU runs it too, usually "
                   "slower. The store records the softmax of the bfloat16 logits upcast to fp32.")
@click.option("--tf32/--no-tf32", default=DEFAULTS["tf32"], show_default=True,
              help="TensorFloat-32 convolutions and matrix products on Ampere and later GPUs (opt-in: "
                   "faster, with 10 of float32's 23 mantissa bits; the paper's runs had none). Off, "
                   "they run in full float32, which PyTorch's cuDNN default does not.")
@click.option("--channels-last/--no-channels-last", default=DEFAULTS["channels_last"], show_default=True,
              help="channels_last memory format for image batches: faster convolutions on GPUs and on "
                   "CPUs (oneDNN); the same network (sums may round differently in the last bit).")
@click.option("--deterministic", is_flag=True,
              help="PyTorch's deterministic algorithms, no cuDNN autotuning (on by default otherwise): "
                   "a resumed run then repeats an uninterrupted one bit for bit on the same GPU. On a GPU, "
                   "torch stops networks with an operation it has no deterministic kernel for (the "
                   "7x7 adaptive pooling of tv_vgg* and tv_alexnet) at their first step.")
@click.option("--steps-per-epoch", type=int, help="Stop each epoch after this many steps (smoke tests).")
@click.option("--store-dtype", type=click.Choice(["float16", "float32"]), default=DEFAULTS["store_dtype"],
              show_default=True,
              help="How past predictions are stored: float32 keeps what the authors' table keeps; float16 "
                   "(opt-in) halves the store and its memory map, each probability rounded to 11 significant "
                   "bits (2^-24 apart below 2^-14).")
@click.option("--store-topk", type=int, default=None, metavar="K",
              help="Store only the K largest probabilities of each prediction and their classes "
                   "(the rest of the mass spread evenly when a target is rebuilt): for large numbers "
                   "of classes. Default: all of them.")
@click.option("--store", "store", default=None, metavar="URL",
              help="Keep the store elsewhere than RUN/store: a path or an fsspec URL such as "
                   "s3://bucket/run/store (pip install 's3fs'; credentials and endpoint from the usual "
                   "AWS_* environment or config, never stored in the run). The decoded teacher goes beside "
                   "a local store (STORE.mmap) when its folder is writable and the run on one node, else (a "
                   "URL, say) to a node-local cache (--cache-dir, default ~/.cache/pskd-store).")
@click.option("--img-size", type=int,
              help="imagenet/folder: side of the training crop and the evaluation centre crop (evaluation "
                   "resizes to img-size/0.875 first, as the authors' 256 for 224); 224 by default. Set it "
                   "near a folder's image size (e.g. 32 or 64) so small images are not upsampled to 224; at 32 "
                   "the 32x32 (CIFAR) models take them too.")
@click.option("--cutmix-prob", type=float,
              help="--aug cutmix with ce/ls/tfkd/cskd: chance that a batch is mixed; CutMix's authors' value "
                   f"per data set by default ({_per_dataset('cutmix_prob')}).")
@click.option("--cutout-hole", type=int, metavar="PIXELS",
              help="--aug cutout: side of the hole (samples of a 1-D signal); DeVries & Taylor's per data set "
                   f"by default ({_where_set(DATASET_DEFAULTS, 'cutout_hole', CUTOUT_HOLE)}); an odd side cuts one "
                   "less, as their code does. Scale it with --img-size on imagenet/folder.")
@click.option("--tfkd-alpha", type=float,
              help="--method tfkd: weight of the virtual teacher's KL term (authors' reg_alpha); their value "
                   f"per architecture by default ({_per_arch('tfkd_alpha')}).")
@click.option("--tfkd-temperature", type=float,
              help="--method tfkd: temperature of the virtual teacher (authors' reg_temperature); "
                   f"{_per_arch('tfkd_temperature')}.")
@click.option("--tfkd-multiplier", type=float,
              help=f"--method tfkd: scale of the KL term (authors' multiplier); {_per_arch('tfkd_multiplier')}.")
@click.option("--cskd-temperature", type=float, default=DEFAULTS["cskd_temperature"], show_default=True,
              help="--method cskd: temperature of the class-wise KL term (authors' --temp).")
@click.option("--cskd-weight", type=float, default=DEFAULTS["cskd_weight"], show_default=True,
              help="--method cskd: weight of the class-wise KL term (authors' --lamda).")
@click.option("--ece-bins", type=int, default=DEFAULTS["ece_bins"], show_default=True, help="Bins of the ECE metric.")
@click.option("--dist-timeout", type=float, default=DEFAULTS["dist_timeout"], show_default=True, metavar="SECONDS",
              help="Under torchrun: how long a rank waits at a collective, e.g. for rank 0 to seal an epoch "
                   "(and the node's first rank to decode it) before the run is declared dead. An hour covers a "
                   "dense ImageNet epoch on a slow object store or network file system.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Run directory; default runs/<dataset>-<arch>-<method>-<time>.")
@click.option("--resume", type=click.Path(file_okay=False, exists=True),
              help="Continue this run directory from its last checkpoint, with its saved config.")
@click.option("--from-epoch", type=int, metavar="E",
              help="With --resume: continue after epoch E from the checkpoint kept for it (the previous one), "
                   "rolling the store back to E: when the last checkpoint or the newest teacher is damaged.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars: one log line per epoch.")
@click.pass_context
def train_command(ctx: click.Context, resume: str | None, from_epoch: int | None, quiet: bool, **options) -> None:
    """Train a classifier with PS-KD (or a baseline), keeping every epoch's predictions
    in the run's Zarr store and reporting test error, NLL, ECE and AURC every epoch.

    With no options: PS-KD on the offline MNIST-1D data set, about 15 s on 2 CPU cores.

    \b
    Several GPUs or machines: launch with torchrun, e.g.
      torchrun --nproc-per-node 4 --no-python pskd-store train --dataset cifar100 -o runs/c100
    Left out, --batch-size splits the recipe's batch among the processes; given, it is
    each process's (the global batch is then batch size x processes).
    """
    from pskd_store.distributed import launched_by_torchrun
    from pskd_store.training import refuse_a_new_run_into, train  # torch/torchvision import only when training

    is_main = int(os.environ.get("RANK", "0")) == 0
    if from_epoch is not None and not resume:
        raise click.UsageError("--from-epoch goes with --resume RUN: it picks the checkpoint to continue from")
    directory, made = None, False
    try:
        if resume:
            given = [name for name in RUN_OPTIONS if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
            if given:
                raise click.UsageError(
                    f"--resume continues with the run's saved config.json; drop "
                    f"{', '.join('--' + n.replace('_', '-') for n in given)}"
                )
            directory = Path(resume)
            config_path = RunDirectory(directory).config
            if not config_path.is_file():
                raise click.UsageError(f"{resume} has no config.json: is it a run directory made by train?")
            config = TrainConfig.load(config_path)
            for name in PLACEMENT_OPTIONS:
                if ctx.get_parameter_source(name) != ParameterSource.DEFAULT:  # where it runs, not what it computes
                    setattr(config, name, absolute_if_local(options[name]) if name == "cache_dir" else options[name])
        else:
            _refuse_settings_not_read(ctx, options["method"], options["aug"])
            output = options.pop("output")
            if output is None and launched_by_torchrun():
                raise click.UsageError("under torchrun pass --output RUN_DIR: every process must write the same run")
            options["milestones"] = _parse_milestones(options["milestones"])
            config = TrainConfig(**options).resolved()  # the recipe's batch split among torchrun's processes
            stamp = time.strftime("%Y%m%d-%H%M%S")
            directory = Path(output or f"runs/{config.dataset}-{config.arch}-{config.method}-{stamp}")
            made = is_main and _make(directory)
        if is_main and not resume:  # before the log is opened there
            refuse_a_new_run_into(RunDirectory(directory))
        if is_main:  # one log, one progress bar: rank 0's; the file opened by train's first line, once it holds the run
            setup_logging(RunDirectory(directory).log)
        try:
            summary = train(config, directory, resume=bool(resume), from_epoch=from_epoch, quiet=quiet)
        except KeyboardInterrupt:
            if is_main and RunDirectory(directory).config.is_file():
                click.echo(f"interrupted: continue the run with pskd-store train --resume {directory}", err=True)
            elif is_main:  # before the data set, the model and the store were made: nothing to resume
                _after_a_stop(RunDirectory(directory), made, None)
                click.echo("interrupted before the run began: run the same command again", err=True)
            raise click.Abort() from None
    except (ValueError, OSError, StoreError) as err:  # each names its file and the fix
        if is_main and directory is not None:
            _after_a_stop(RunDirectory(directory), made, str(err))
        raise click.ClickException(str(err)) from err
    if summary is None:  # another rank than 0 of a torchrun launch
        return
    test = summary["final"]["test"]
    click.echo(
        f"done: {directory}  test top-1 err {test['top1_err']:.2f}%  nll {test['nll']:.4f}  "
        f"ece {test['ece']:.2f}%  aurc {test['aurc']:.2f}"
    )


def _after_a_stop(run: RunDirectory, made: bool, error: str | None) -> None:
    """The error goes into the run's log, if this process opened it (it held the run: a resume
    refused because another process trains the run writes nothing there); a directory this
    command made for a run that never began (no config.json) is removed, log and all, unless
    another process holds it by then."""
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if isinstance(handler, logging.FileHandler)]:
        if error is not None and handler.stream is not None:
            handler.emit(logging.LogRecord("pskd_store.train", logging.ERROR, __file__, 0, "stopped: %s", (error,),
                                           None))
        root.removeHandler(handler)  # and never opened again
        handler.close()
    if made:
        try:
            with run.lock():  # another process's run, if it holds it now: left alone
                _remove_unless_begun(run)
        except RunHeldError:
            pass
        except RunError:  # a file system without locks: none holds it
            _remove_unless_begun(run)


def _remove_unless_begun(run: RunDirectory) -> None:
    if not run.config.exists():
        shutil.rmtree(run.path, ignore_errors=True)


def _make(directory: Path) -> bool:
    """Make the run directory; whether this command made it (of two commands given the same
    one at once, one does)."""
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as err:
        raise RunError(f"cannot make {directory} ({err.strerror}): make its parent writable, or train into another "
                       "--output") from err
    return True


def _parse_milestones(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated epochs such as 150,225, got {text!r}",
                                 param_hint="--milestones") from None


def _refuse_settings_not_read(ctx: click.Context, method: str, aug: str) -> None:
    """A setting given for another method (or augmentation) than the run's would change
    nothing: a sweep over it would train the same run again and again."""
    readers = {name: [m for m, cls in METHODS.items() if name in cls.settings]
               for cls in METHODS.values() for name in cls.settings}
    readers["cutmix_prob"] = [m for m, cls in METHODS.items() if cls.mixes_by_chance]  # with --aug cutmix
    readers["cutout_hole"] = list(METHODS)  # with --aug cutout
    augmentation = {"cutmix_prob": "cutmix", "cutout_hole": "cutout"}  # the --aug a setting needs
    for name, methods in readers.items():
        read = method in methods and augmentation.get(name, aug) == aug
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None) and not read:
            flag = next(param.opts[0] for param in ctx.command.params if param.name == name)
            by = " or ".join(f"--method {m}" for m in methods)
            if name == "cutout_hole":
                by = "--aug cutout"
            elif name in augmentation:
                by = f"--aug {augmentation[name]} with {by}"
            raise click.UsageError(f"{flag} is read by {by}, not by --method {method} --aug {aug}: drop it")

