from __future__ import annotations

import dataclasses
import itertools
import shutil
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch.utils.data import TensorDataset

import pskd_store.data as data
import pskd_store.image_data as image_data
from pskd_store.data import DATASETS, build_datasets, labels_of
from pskd_store.image_data import Lighting
from pskd_store.recipe import TrainConfig


def _items(dataset, n=None):
    n = len(dataset) if n is None else n
    return [dataset[i] for i in range(n)]


def _check_items(dataset, shape, num_classes, n=None):
    for x, y in _items(dataset, n):
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        assert tuple(x.shape) == shape
        assert isinstance(y, int) and 0 <= y < num_classes


def _item_labels(dataset):
    return np.array([y for _, y in _items(dataset)], dtype=np.int64)


@pytest.fixture
def small_mnist1d(monkeypatch):
    """Shrink the generated data set so each generation takes well under a second."""
    monkeypatch.setitem(data.MNIST1D_VARIANT, "num_samples", 500)


# ---------------------------------------------------------------- CIFAR


def test_cifar100_builds_from_torchvision_format(cifar100_dir):
    splits = build_datasets("cifar100", cifar100_dir, download=False)
    assert (len(splits.train), len(splits.test), splits.val) == (200, 20, None)
    assert splits.num_classes == 100 and splits.input_kind == "32x32"
    _check_items(splits.train, (3, 32, 32), 100, n=8)
    _check_items(splits.test, (3, 32, 32), 100, n=8)
    assert splits.train_labels.dtype == np.int64
    np.testing.assert_array_equal(splits.train_labels, _item_labels(splits.train))
    assert set(splits.train_labels.tolist()) == set(range(100))


def test_cifar100_eval_transform_is_deterministic_train_is_augmented(cifar100_dir):
    torch.manual_seed(0)
    splits = build_datasets("cifar100", cifar100_dir, download=False)
    assert torch.equal(splits.test[0][0], splits.test[0][0])
    assert any(not torch.equal(splits.train[0][0], splits.train[0][0]) for _ in range(5))


def test_cifar10_builds(cifar10_dir):
    splits = build_datasets("cifar10", cifar10_dir, download=False, val_split=0.2, seed=3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (80, 20, 20)
    assert splits.num_classes == 10
    _check_items(splits.val, (3, 32, 32), 10, n=4)
    np.testing.assert_array_equal(splits.train_labels, _item_labels(splits.train))


def test_val_split_sizes_disjoint_and_seeded(cifar100_dir):
    splits = build_datasets("cifar100", cifar100_dir, download=False, val_split=0.25, seed=7)
    train_idx, val_idx = set(splits.train.indices), set(splits.val.indices)
    assert (len(train_idx), len(val_idx)) == (150, 50)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(200))
    np.testing.assert_array_equal(splits.train_labels, _item_labels(splits.train))
    # the val view shares the images but not the augmentation
    base = splits.train.dataset
    assert splits.val.dataset.data is base.data
    i = splits.val.indices[0]
    assert torch.equal(splits.val[0][0], splits.val[0][0])
    assert splits.val[0][1] == base.targets[i]

    again = build_datasets("cifar100", cifar100_dir, download=False, val_split=0.25, seed=7)
    other = build_datasets("cifar100", cifar100_dir, download=False, val_split=0.25, seed=8)
    assert again.val.indices == splits.val.indices
    assert other.val.indices != splits.val.indices


def test_missing_cifar_without_download_names_folder_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        build_datasets("cifar100", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "--data-dir" in message and "cifar-100-python/" in message and "download" in message


def test_failed_download_is_wrapped(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="no route to host") as info:
        build_datasets("cifar10", tmp_path, download=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_corrupted_cifar_fails_md5_check(cifar100_dir):
    with open(cifar100_dir / "cifar-100-python" / "test", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="md5"):
        build_datasets("cifar100", cifar100_dir, download=False)


# ---------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("name", ["imagenet", "folder"])
def test_imagefolder_sets(imagefolder_dir, name):
    splits = build_datasets(name, imagefolder_dir, val_split=0.25)
    assert splits.num_classes == 3 and splits.input_kind == "224x224"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 6)
    _check_items(splits.train, (3, 224, 224), 3, n=2)
    _check_items(splits.val, (3, 224, 224), 3, n=2)
    _check_items(splits.test, (3, 224, 224), 3, n=2)
    np.testing.assert_array_equal(splits.train_labels, _item_labels(splits.train))
    # the files the store fingerprints, in the training split's order: each in its label's class folder
    folders = [name.split("/")[0] for name in splits.train_names]
    assert folders == [("ant", "bee", "cat")[y] for y in splits.train_labels]
    assert len(set(splits.train_names)) == 9
    steps = image_data._imagenet_transforms(224)[0].transforms
    assert [type(t).__name__ for t in steps] == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                                                 "ColorJitter", "Lighting", "Normalize"]  # the authors' order
    assert isinstance(steps[3], image_data.ColorJitter)  # theirs, on the tensor: not torchvision's


def test_hidden_files_in_a_folder_tree_are_no_samples(imagefolder_dir):
    """A Mac copying the tree writes ``._0.png`` (metadata) beside each image: not a sample,
    in training or evaluation, where torchvision's ImageFolder takes any name by its extension."""
    for image in list(imagefolder_dir.glob("*/*/*.png")):
        image.with_name("._" + image.name).write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    (imagefolder_dir / "train" / "ant" / "notes.txt").write_text("no image either")
    splits = build_datasets("folder", imagefolder_dir)
    assert (len(splits.train), len(splits.test)) == (12, 6)
    assert not any("/._" in path for path, _ in splits.train.samples + splits.test.samples)
    _check_items(splits.train, (3, 224, 224), 3, n=12)


def test_a_folder_tree_with_val_and_test_is_tested_on_val_as_runs_have_been(imagefolder_dir):
    shutil.copytree(imagefolder_dir / "val", imagefolder_dir / "test")
    (imagefolder_dir / "test" / "ant" / "0.png").unlink()
    assert len(build_datasets("folder", imagefolder_dir).test) == 6  # val/'s, not test/'s 5
    shutil.rmtree(imagefolder_dir / "val")
    assert len(build_datasets("folder", imagefolder_dir).test) == 5  # test/ where there is no val/


def test_mnist1d_samples_are_named_by_their_generator(data_dir):
    """Signals generated otherwise (another mnist1d release, other MNIST1D_VARIANT settings)
    have the same labels: their names tell a store they are other samples."""
    splits = build_datasets("mnist1d", data_dir, val_split=0.25)
    names = data.file_names(splits.train.dataset)
    assert names[:2] == [f"mnist1d-{data._mnist1d_key()}/train/{i}" for i in range(2)]
    assert splits.train_names == [names[i] for i in splits.train.indices]


def test_img_size_sets_a_folders_crops(imagefolder_dir):
    """--img-size: small images are cropped at their own scale, not upsampled to 224; the
    evaluation resize follows it (size / 0.875, as 256 for 224)."""
    splits = build_datasets("folder", imagefolder_dir, val_split=0.25, img_size=32)
    for split in (splits.train, splits.val, splits.test):
        _check_items(split, (3, 32, 32), 3, n=2)
    resize = next(t for t in splits.test.transform.transforms if isinstance(t, T.Resize))
    assert resize.size == 37
    assert TrainConfig(dataset="folder").resolved().img_size == 224
    with pytest.raises(ValueError, match="--img-size sets the crop of imagenet and folder images; cifar100"):
        TrainConfig(dataset="cifar100", img_size=64).resolved()
    with pytest.raises(ValueError, match="at least 8 pixels"):
        TrainConfig(dataset="folder", img_size=4).resolved()


def test_folder_accepts_test_subfolder_imagenet_does_not(imagefolder_dir):
    (imagefolder_dir / "val").rename(imagefolder_dir / "test")
    assert len(build_datasets("folder", imagefolder_dir).test) == 6
    with pytest.raises(FileNotFoundError, match="val/"):
        build_datasets("imagenet", imagefolder_dir)


def test_folder_with_mismatched_classes(imagefolder_dir):
    shutil.rmtree(imagefolder_dir / "val" / "cat")
    with pytest.raises(ValueError, match="class folders differ"):
        build_datasets("folder", imagefolder_dir)


def test_lighting_adds_one_colour_shift_per_image():
    img = torch.rand(3, 5, 7)
    assert torch.equal(Lighting(0.0)(img), img)
    torch.manual_seed(0)
    shift = Lighting(0.1)(img) - img
    assert shift.abs().max() > 0
    torch.testing.assert_close(shift, shift[:, :1, :1].expand_as(shift))


class _AuthorsJitter:
    """The PS-KD authors' utils/custom_transform.py, as written there (their Grayscale,
    Brightness, Contrast, Saturation), with the drawn weight passed in."""

    @staticmethod
    def grayscale(img):
        gs = img.clone()
        gs[0].mul_(0.299).add_(gs[1], alpha=0.587).add_(gs[2], alpha=0.114)
        gs[1].copy_(gs[0])
        gs[2].copy_(gs[0])
        return gs

    @classmethod
    def step(cls, img, which, alpha):
        if which == 0:  # Brightness
            gs = img.new().resize_as_(img).zero_()
        elif which == 1:  # Contrast
            gs = cls.grayscale(img)
            gs.fill_(gs.mean())
        else:  # Saturation
            gs = cls.grayscale(img)
        return img.lerp(gs, alpha)


@pytest.mark.parametrize("steps", list(itertools.permutations(range(3))) + [[1], [2, 0]])
def test_colour_jitter_is_the_authors_bit_for_bit_and_clamps_nothing(steps):
    from pskd_store.image_data import ColorJitter

    generator = torch.Generator().manual_seed(len(steps) * 10 + steps[0])
    img = torch.rand(3, 224, 200, generator=generator)
    weights = (torch.rand(len(steps), generator=generator) * 0.8 - 0.4).tolist()
    expected = img
    for which, alpha in zip(steps, weights):
        expected = _AuthorsJitter.step(expected, which, alpha)
    assert torch.equal(ColorJitter.blend(img, steps, weights), expected)
    grey = torch.full((3, 2, 2), 0.9)
    torch.testing.assert_close(ColorJitter.blend(grey, [0], [-0.4]), torch.full((3, 2, 2), 1.26))  # not clamped to 1


def test_colour_jitter_draws_each_order_and_weights_within_the_strengths(monkeypatch):
    from pskd_store.image_data import ColorJitter

    seen = []
    monkeypatch.setattr(ColorJitter, "blend", staticmethod(lambda img, steps, weights: seen.append((steps, weights))))
    torch.manual_seed(0)
    jitter = ColorJitter(brightness=0.4, contrast=0.2, saturation=0.0)
    for _ in range(200):
        jitter(torch.rand(3, 4, 4))
    assert {tuple(steps) for steps, _ in seen} == {(0, 1), (1, 0)}  # saturation 0: not a step, as theirs
    for steps, weights in seen:
        for step, weight in zip(steps, weights):
            assert abs(weight) <= (0.4, 0.2)[step]
    assert max(abs(w) for steps, weights in seen for s, w in zip(steps, weights) if s == 0) > 0.35
    assert repr(jitter) == "ColorJitter(brightness=0.4, contrast=0.2, saturation=0.0)"


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_items_and_sizes(tmp_path, small_mnist1d):
    splits = build_datasets("mnist1d", tmp_path, val_split=0.1, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (360, 40, 100)
    assert splits.num_classes == 10 and splits.input_kind == "mnist1d"
    _check_items(splits.train, (1, 40), 10)
    _check_items(splits.test, (1, 40), 10)
    np.testing.assert_array_equal(splits.train_labels, _item_labels(splits.train))
    assert not set(splits.train.indices) & set(splits.val.indices)


def test_mnist1d_deterministic_cached_and_leaves_global_rng_alone(tmp_path, small_mnist1d, monkeypatch):
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)
    first = build_datasets("mnist1d", tmp_path / "a")
    assert np.random.rand() == expected_draw
    elsewhere = build_datasets("mnist1d", tmp_path / "b")
    cached_files = list((tmp_path / "a").glob("*.npz"))
    assert len(cached_files) == 1

    def no_regeneration(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr("mnist1d.data.make_dataset", no_regeneration)
    cached = build_datasets("mnist1d", tmp_path / "a")
    # a cached set is read without the generator: a process that only reads never imports it
    reader = subprocess.run([sys.executable, "-c", f"""
import sys
from pskd_store import data
data.MNIST1D_VARIANT.update({data.MNIST1D_VARIANT!r})
data.build_datasets("mnist1d", {str(tmp_path / "a")!r})
print(sorted(name for name in sys.modules if name.startswith(("mnist1d", "scipy"))))
"""], capture_output=True, text=True, check=True)
    assert reader.stdout.strip() == "[]" and len(list((tmp_path / "a").glob("*.npz"))) == 1
    for splits in (elsewhere, cached):
        torch.testing.assert_close(splits.train.inputs, first.train.inputs, rtol=0, atol=0)
        torch.testing.assert_close(splits.test.inputs, first.test.inputs, rtol=0, atol=0)
        np.testing.assert_array_equal(splits.train_labels, first.train_labels)

    # another variant is another cache entry, not a stale hit
    monkeypatch.setitem(data.MNIST1D_VARIANT, "iid_noise_scale", 0.05)
    with pytest.raises(AssertionError, match="generated again"):
        build_datasets("mnist1d", tmp_path / "a")


# ---------------------------------------------------------------- arguments


def test_unknown_name_lists_available(tmp_path):
    with pytest.raises(ValueError) as info:
        build_datasets("svhn", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)


@pytest.mark.parametrize("val_split", [-0.1, 1.0, 1.5])
def test_val_split_out_of_range(tmp_path, val_split):
    with pytest.raises(ValueError, match="val_split"):
        build_datasets("mnist1d", tmp_path, val_split=val_split)


def test_labels_of_falls_back_to_items():
    ds = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 0, 2]))
    np.testing.assert_array_equal(labels_of(ds), [3, 1, 0, 2])


def test_fashion_mnist_is_unpacked_from_the_system_copy_and_read_by_torchvision(tmp_path, fashion_mnist_gz):
    import gzip

    from pskd_store.image_data import _load_fashion_mnist

    root = tmp_path / "data"
    train = _load_fashion_mnist(root, train=True, transform=None, download=False, system_copy=fashion_mnist_gz)
    test = _load_fashion_mnist(root, train=False, transform=None, download=False, system_copy=fashion_mnist_gz)
    assert len(train) == 120 and len(test) == 40
    with gzip.open(fashion_mnist_gz / "train-labels-idx1-ubyte.gz") as file:
        labels = np.frombuffer(file.read()[8:], dtype=np.uint8)
    assert train.targets.tolist() == labels.tolist()
    with gzip.open(fashion_mnist_gz / "t10k-images-idx3-ubyte.gz") as file:
        first = np.frombuffer(file.read()[16:16 + 784], dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(np.asarray(test[0][0]), first)
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    images = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    for unreadable in (images.read_bytes()[:-16], b"<html>a proxy's page</html>"):  # cut short; another file
        images.write_bytes(unreadable)
        with pytest.raises(ValueError, match=r"the Fashion-MNIST files in .*raw are unreadable \(.*\): delete "
                                             r"that folder, and they are unpacked \(or downloaded\) again"):
            _load_fashion_mnist(root, train=True, transform=None, download=False, system_copy=fashion_mnist_gz)


def test_fashion_mnist_splits_and_a_clear_error_when_missing(tmp_path, fashion_mnist_gz, monkeypatch):
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", fashion_mnist_gz)  # where the package would be
    splits = data.build_datasets("fashionmnist", tmp_path / "data", val_split=0.25, download=False)
    assert splits.input_kind == "28x28" and splits.num_classes == 10
    assert len(splits.train) == 90 and len(splits.val) == 30 and len(splits.test) == 40
    image, label = splits.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist\) or put the four idx files "
                                                r"there, or allow the download \(--download\)$"):
        data.build_datasets("fashionmnist", tmp_path / "empty", download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"there \(the download failed: Error downloading .*no route to host") \
            as failed:  # torchvision's message, on one line
        data.build_datasets("fashionmnist", tmp_path / "empty", download=True)
    assert "\n" not in str(failed.value) and "allow the download" not in str(failed.value)


def test_a_train_subset_is_balanced_the_same_for_every_seed_and_split_after(tmp_path, fashion_mnist_gz,
                                                                           monkeypatch):
    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", fashion_mnist_gz)  # 120 train images, 12 per class
    whole = data.build_datasets("fashionmnist", tmp_path / "data", download=False)
    subset = data.build_datasets("fashionmnist", tmp_path / "data", download=False, train_subset=60)
    assert np.bincount(subset.train_labels).tolist() == [6] * 10
    np.testing.assert_array_equal(subset.train_labels, whole.train_labels[subset.train.indices])
    for seed in (0, 1):  # a fixed subset: seeds differ in the validation split and in training only
        split = data.build_datasets("fashionmnist", tmp_path / "data", download=False, train_subset=60,
                                    val_split=0.5, seed=seed)
        assert len(split.train) == len(split.val) == 30
        kept = [split.train.dataset.indices[i] for i in split.train.indices]
        held_out = [split.val.dataset.indices[i] for i in split.val.indices]
        assert sorted(kept + held_out) == subset.train.indices
        assert split.val[0][0].shape == (1, 28, 28)  # the held-out images through the eval transform
    with pytest.raises(ValueError, match="must be a positive multiple of the 10 classes"):
        data.build_datasets("fashionmnist", tmp_path / "data", download=False, train_subset=65)
    with pytest.raises(ValueError, match="needs 13 samples of each class, but class 0 has 12: ask for at most 120"):
        data.build_datasets("fashionmnist", tmp_path / "data", download=False, train_subset=130)


def test_no_crop_flip_trains_on_the_images_as_the_evaluation_sees_them(tmp_path, fashion_mnist_gz, monkeypatch):
    """`train --no-crop-flip`: each training item is its image normalised, nothing drawn."""
    from pskd_store.distributed import Distributed
    from pskd_store.run_directory import RunDirectory
    from pskd_store.training import build_run

    monkeypatch.setattr(image_data, "DEBIAN_FASHION_MNIST", fashion_mnist_gz)
    runs = {}
    for crop_flip in (True, False):
        config = TrainConfig(dataset="fashionmnist", data_dir=str(tmp_path / "data"), download=False,
                             crop_flip=crop_flip, workers=0).resolved()
        runs[crop_flip] = build_run(config, RunDirectory(tmp_path / f"run{crop_flip}"), Distributed(),
                                    torch.device("cpu"))
        runs[crop_flip].train_data.set_epoch(1)
    images = runs[False].splits.train.data[:20].float() / 255
    expected = (images.unsqueeze(1) - image_data._FASHION_MEAN[0]) / image_data._FASHION_STD[0]
    plain = torch.stack([runs[False].train_data[i][0] for i in range(20)])
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-6)
    augmented = torch.stack([runs[True].train_data[i][0] for i in range(20)])
    assert not torch.allclose(augmented, expected)  # the recipe's random crops and flips
    assert not runs[False].splits.random_transforms and runs[True].splits.random_transforms


@pytest.mark.parametrize("arch", ["tv_resnet18", "preact_resnet18"])
def test_a_runs_data_follow_its_img_size(imagefolder_dir, tmp_path, arch):
    """`train --dataset folder --img-size 32` crops the training and test images to 32 pixels,
    which an ImageNet model and a CIFAR model (built for 32 pixels) both take; at another
    size the CIFAR model is refused, naming the size it takes."""
    from pskd_store.distributed import Distributed
    from pskd_store.run_directory import RunDirectory
    from pskd_store.training import build_run

    config = TrainConfig(dataset="folder", data_dir=str(imagefolder_dir), arch=arch, img_size=32,
                         workers=0, batch_size=4).resolved()
    run = build_run(config, RunDirectory(tmp_path / "run"), Distributed(), torch.device("cpu"))
    run.train_data.set_epoch(1)
    inputs = torch.stack([run.train_data[i][0] for i in range(4)])
    assert inputs.shape == (4, 3, 32, 32)
    assert next(iter(run.test_loader))[0].shape[1:] == (3, 32, 32)
    assert run.model(inputs).shape == (4, 3)
    if arch.startswith("tv_"):
        return
    with pytest.raises(ValueError, match=r"takes 32x32 inputs but folder has 64x64 inputs; .* \(or --img-size 32"):
        build_run(dataclasses.replace(config, img_size=64), RunDirectory(tmp_path / "other"), Distributed(),
                  torch.device("cpu"))


def test_the_offline_default_never_imports_torchvision(data_dir) -> None:
    """torchvision takes seconds to import (torch._dynamo with it): a MNIST-1D run, the
    train command's --help and Cutout need none of it; a tv_ model and CutMix load it."""
    script = f"""
import sys
import torch
from pskd_store.augment import BatchAugment
from pskd_store.cli.train import train_command
from pskd_store.data import build_datasets
from pskd_store.models import create_model, input_kind
build_datasets("mnist1d", {str(data_dir)!r})
create_model("mnist1d_mlp", 10)
assert input_kind("preact_resnet18") == "32x32"
BatchAugment("cutout", 10)(torch.zeros(2, 1, 40), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                           epoch=1, step=0)
assert "torchvision" not in sys.modules, "imported torchvision"
BatchAugment("cutmix", 10)
assert "torchvision" in sys.modules
assert input_kind("tv_resnet18") == "224x224"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_labels_of_items_that_are_no_pairs_name_the_fix():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return {"x": torch.zeros(2), "label": index}

    with pytest.raises(TypeError, match=r"cannot be read from its items .*: its items must be \(input, label\) "
                                        r"pairs, or pass the labels in index order \(labels=...\)"):
        labels_of(Dicts())

