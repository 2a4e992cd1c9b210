"""The recipe's defaults (fp32, workers, cuDNN autotuning) and the package's public names."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pskd_store.engine import float32_precision
from pskd_store.recipe import TrainConfig, default_workers
from pskd_store.training import configure_determinism


def test_top_level_names_are_the_custom_loop_api():
    from pskd_store import (
        PredictionService,
        PredictionWriter,
        SoftTargetDataset,
        SoftTargetStore,
        StoreError,
        alpha_t,
        soft_target,
    )
    from pskd_store.dataset import SoftTargetDataset as defined_dataset
    from pskd_store.store import SoftTargetStore as defined_store

    assert SoftTargetStore is defined_store and SoftTargetDataset is defined_dataset
    assert issubclass(StoreError, ValueError) and alpha_t(2, 4, 0.8) == pytest.approx(0.4)
    import pskd_store

    assert {"SoftTargetStore", "SoftTargetDataset", "alpha_t"} <= set(dir(pskd_store))  # for completion
    assert {PredictionService.__name__, PredictionWriter.__name__, soft_target.__name__} == {
        "PredictionService", "PredictionWriter", "soft_target"}
    with pytest.raises(AttributeError, match="no attribute 'SoftTargetStor'"):
        import pskd_store
        pskd_store.SoftTargetStor  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    code = "import sys, pskd_store; assert 'torch' not in sys.modules; print(sorted(pskd_store.__all__)[0])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EpochNotSealedError"


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet"])
def test_image_data_sets_default_to_fp32_and_min_4_usable_cpus_workers(dataset):
    config = TrainConfig(dataset=dataset).resolved()
    assert config.amp is False and config.deterministic is False
    assert config.workers == default_workers() == min(4, len(os.sched_getaffinity(0)))


def test_mnist1d_keeps_its_in_memory_loader_and_explicit_workers_win():
    assert TrainConfig().resolved().workers == 0
    assert TrainConfig(dataset="cifar100", workers=7).resolved().workers == 7


def test_default_workers_raise_no_dataloader_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the DataLoader warns when workers exceed usable CPUs
        assert sum(DataLoader(list(range(8)), batch_size=4, num_workers=default_workers())).sum() == 28


@pytest.mark.parametrize("arch", ["pyramidnet200", "pyramidnet200_shakedrop"])
def test_pyramidnet_recipe(arch):
    config = TrainConfig(dataset="cifar100", arch=arch).resolved()
    assert (config.batch_size, config.lr, config.weight_decay) == (64, 0.25, 1e-4)
    assert config.milestones == [150, 225] and config.epochs == 300


def test_cifar_recipe_is_the_authors():
    config = TrainConfig(dataset="cifar100").resolved()
    assert (config.arch, config.epochs, config.batch_size, config.lr, config.weight_decay) == (
        "preact_resnet18", 300, 128, 0.1, 5e-4)
    assert (config.momentum, config.nesterov, config.milestones, config.lr_gamma, config.alpha_T) == (
        0.9, True, [150, 225], 0.1, 0.8)


def test_cudnn_autotuning_by_default_deterministic_on_request():
    try:
        configure_determinism(False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_determinism(True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    finally:
        configure_determinism(False)


def test_the_recipes_batch_is_split_among_processes_and_a_given_batch_is_each_processs(monkeypatch):
    """The authors' main.py divides --batch_size by its GPUs: the paper's batch is the global one."""
    assert TrainConfig(dataset="cifar100").resolved(world_size=4).batch_size == 32
    assert TrainConfig(dataset="imagenet").resolved(world_size=8).batch_size == 32
    assert TrainConfig(dataset="cifar100", batch_size=64).resolved(world_size=4).batch_size == 64
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun tells each process: the default
    assert TrainConfig(dataset="cifar100").resolved().batch_size == 32
    with pytest.raises(ValueError, match="the recipe's batch of 128 does not split evenly among 3 processes: "
                                         "pass --batch-size"):
        TrainConfig(dataset="cifar100").resolved(world_size=3)


def test_cutouts_hole_is_devries_and_taylors_for_the_data_set():
    """uoguelph-mlrg/Cutout: 16 pixels on CIFAR-10, 8 on CIFAR-100 (the PS-KD paper's);
    CIFAR-100's for the data sets they give none; a side given is kept."""
    sides = {name: TrainConfig(dataset=name).resolved().cutout_hole for name in ("cifar10", "cifar100", "mnist1d")}
    assert sides == {"cifar10": 16, "cifar100": 8, "mnist1d": 8}
    assert TrainConfig(dataset="cifar10", cutout_hole=12).resolved().cutout_hole == 12


def _fp32_precisions() -> list[str]:
    """cuDNN's convolutions and RNNs, cuBLAS's and the CPU's (oneDNN's) matrix products."""
    return [settings.fp32_precision for settings in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn,
                                                     torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)]


def _tf32_flags() -> tuple:
    """torch's older readings of the same settings (None where unreadable: the newer set alone)."""
    readings = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, lambda: torch.backends.cuda.matmul.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            readings.append(read())
        except RuntimeError:
            readings.append(None)
    return tuple(readings)


_SETTINGS = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul,
             torch.backends.mkldnn.matmul)
CALLERS = {  # what a caller may have set before
    "torch's defaults": lambda: None,
    "the newer settings alone": lambda: [setattr(setting, "fp32_precision", "ieee") for setting in _SETTINGS[:3]],
    "TF32 backend-wide": lambda: setattr(torch.backends.cudnn, "fp32_precision", "tf32"),
    "a medium matrix-product precision": lambda: torch.set_float32_matmul_precision("medium"),
    "the CPU's bfloat16 matrix products": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
}


@pytest.mark.parametrize("callers", sorted(CALLERS))
def test_float32_math_is_full_float32_unless_tf32_is_asked_for(callers):
    """The paper's fp32: cuDNN's default TF32 convolutions (10 mantissa bits) turned off
    inside the block, each operation's setting explicitly (an unset one would inherit a
    backend-wide TF32); TF32 everywhere with ``tf32``. Both of torch's ways of reading the
    settings agree inside (torch's TunableOp reads the older), and the caller's settings
    are put back after it: the newer as they were, the older where they were readable."""
    assert TrainConfig().resolved().tf32 is False
    defaults = _fp32_precisions(), torch.backends.cudnn.fp32_precision
    CALLERS[callers]()
    try:
        before, flags_before = _fp32_precisions(), _tf32_flags()
        for tf32, inside, flags in ((True, ["tf32"] * 3, (True, True, "high")),
                                    (False, ["ieee"] * 3, (False, False, "highest"))):
            with float32_precision(tf32):  # the CPU's as the caller left it, which torch's one matmul
                # precision reading then refuses to fold in with cuBLAS's unless the caller left it unset
                readable = flags if before[3] == "none" else (*flags[:2], None)
                assert _fp32_precisions() == [*inside, before[3]] and _tf32_flags() == readable
            assert _fp32_precisions() == before
            assert all(after == flag for after, flag in zip(_tf32_flags(), flags_before) if flag is not None)
    finally:  # torch's defaults again, for the tests after this one
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.fp32_precision = defaults[1]
        for setting, value in zip(_SETTINGS, defaults[0]):
            setting.fp32_precision = value


@pytest.mark.parametrize("dataset, probability", [
    ("cifar100", 0.5), ("cifar10", 0.5), ("fashionmnist", 0.5),  # clovaai/CutMix-PyTorch: CIFAR command
    ("imagenet", 1.0), ("folder", 1.0),                          # ... and its ImageNet command
])
def test_cutmix_probability_is_the_cutmix_authors_per_setting(dataset, probability):
    assert TrainConfig(dataset=dataset).resolved().cutmix_prob == probability
    assert TrainConfig(dataset=dataset, cutmix_prob=0.3).resolved().cutmix_prob == 0.3


@pytest.mark.parametrize("arch, alpha, temperature, multiplier", [
    ("preact_resnet18", 0.1, 20.0, 100.0),  # base_resnet18/params.json
    ("densenet121", 0.1, 40.0, 1.0),        # base_densenet121/params.json (no multiplier given)
    ("resnext29_8x64d", 0.5, 40.0, 1.0),    # base_resnext29/params.json (no multiplier given)
    ("resnet101", 0.1, 20.0, 100.0),        # no config of theirs: their ResNet-18 one
])
def test_tfkd_settings_are_the_tfkd_authors_per_architecture(arch, alpha, temperature, multiplier):
    config = TrainConfig(dataset="cifar100", arch=arch, method="tfkd").resolved()
    assert (config.tfkd_alpha, config.tfkd_temperature, config.tfkd_multiplier) == (alpha, temperature, multiplier)
    assert TrainConfig(dataset="cifar100", arch=arch, tfkd_temperature=3.0).resolved().tfkd_temperature == 3.0


def test_the_distributed_timeout_defaults_to_an_hour():
    assert TrainConfig().resolved().dist_timeout == 3600.0


def _readme_recipe() -> dict[str, str]:
    """README's recipe table: setting -> default, as a reader sees them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("| setting | default | source |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    return {row.split(" | ")[0].strip("| "): row.split(" | ")[1] for row in table.splitlines()}


def _short(value: float) -> str:
    """A number as README writes it: 0.1, 300, 5e-4."""
    return f"{value:g}" if value >= 0.001 else f"{value:.0e}".replace("e-0", "e-")


def test_readmes_recipe_table_is_recipe_py():
    rows = _readme_recipe()
    for dataset in ("cifar10", "cifar100"):
        c = TrainConfig(dataset=dataset).resolved()
        assert rows["CIFAR-10/100"] == (
            f"{c.epochs} epochs, batch {c.batch_size}, lr {_short(c.lr)}, weight decay {_short(c.weight_decay)}, "
            f"lr x{_short(c.lr_gamma)} at epochs {c.milestones[0]} and {c.milestones[1]}")
        assert rows["CIFAR architecture"] == f"`{c.arch}`"
    c = TrainConfig(dataset="imagenet").resolved()
    assert rows["ImageNet"] == (
        f"`{c.arch}`, {c.epochs} epochs, batch {c.batch_size}, lr {_short(c.lr)}, weight decay "
        f"{_short(c.weight_decay)}, lr x{_short(c.lr_gamma)} at {c.milestones[0]} and {c.milestones[1]}")
    for arch in ("pyramidnet200", "pyramidnet200_shakedrop"):
        c = TrainConfig(dataset="cifar100", arch=arch).resolved()
        assert rows["PyramidNet-200 (`pyramidnet200`, `pyramidnet200_shakedrop`)"] == (
            f"batch {c.batch_size}, lr {_short(c.lr)}, weight decay {_short(c.weight_decay)}")
    c = TrainConfig().resolved()
    assert rows["alpha_T"] == _short(c.alpha_T)
    assert rows["optimizer"] == f"SGD, momentum {_short(c.momentum)}, {'Nesterov' if c.nesterov else 'no Nesterov'}"
    assert rows["ECE bins"] == str(c.ece_bins)
    assert rows["`--dist-timeout`"].startswith(f"{c.dist_timeout:.0f} s:")
    assert not c.amp and not c.tf32 and rows["precision"].startswith("fp32, TensorFloat-32 off")
    cutmix = {name: TrainConfig(dataset=name).resolved().cutmix_prob
              for name in ("cifar10", "cifar100", "mnist1d", "fashionmnist", "imagenet", "folder")}
    assert rows["CutMix probability (`--cutmix-prob`, CE/LS/TF-KD/CS-KD)"].startswith(
        f"{cutmix['cifar100']} on CIFAR and the offline sets, {cutmix['imagenet']} on ImageNet and ImageFolder trees")
    assert len({cutmix[name] for name in ("cifar10", "cifar100", "mnist1d", "fashionmnist")}) == 1
    assert cutmix["imagenet"] == cutmix["folder"]
