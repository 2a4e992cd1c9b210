"""The torchvision image data sets (Fashion-MNIST, CIFAR, ImageNet and any ImageFolder
tree) with the transforms of their recipes: imported by :func:`data.build_datasets` only
for those sets, because torchvision takes seconds to import and the offline default
(MNIST-1D) needs none of it."""

from __future__ import annotations

import copy
import gzip
import os
import shutil
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.vision import StandardTransform, VisionDataset

# Normalisation constants of the authors' loader (loader/custom_dataloader.py of
# lgcnsai/PS-KD-Pytorch). Their CIFAR-100 values are the CIFAR-10 statistics commonly
# used in CIFAR code, not CIFAR-100's own; kept as they are, so inputs match theirs.
_CIFAR10_MEAN = tuple(x / 255.0 for x in (125.3, 123.0, 113.9))
_CIFAR10_STD = tuple(x / 255.0 for x in (63.0, 62.1, 66.7))
_CIFAR100_MEAN, _CIFAR100_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Fashion-MNIST's training-set pixel mean and standard deviation (of values in [0, 1]).
_FASHION_MEAN, _FASHION_STD = (0.2860,), (0.3530,)
# Where Debian's dataset-fashion-mnist package installs the four gzipped idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Principal components of ImageNet RGB pixels (AlexNet, Krizhevsky et al. 2012).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(nn.Module):
    """AlexNet-style PCA lighting noise on a (3, H, W) tensor.

    Part of the PS-KD authors' ImageNet recipe; torchvision has no such transform.
    Adds ``eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, alphastd)`` to every pixel.
    """

    def __init__(
        self,
        alphastd: float,
        eigval: Sequence[float] = IMAGENET_EIGVAL,
        eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
    ) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32))
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32))

    def forward(self, img: Tensor) -> Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


class ColorJitter(nn.Module):
    """The PS-KD authors' colour jitter on a float (3, H, W) tensor, before Lighting.

    Their ImageNet recipe (utils/custom_transform.py, after convNet.pytorch) blends the
    image towards black (brightness), its grey mean (contrast) and its grey image
    (saturation), in a random order, each by a weight drawn from U(-v, v), and clamps
    nothing. torchvision's ColorJitter works on [0, 1] images and clamps every step, so it
    would hand a bright or saturated image other pixels than theirs.
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4) -> None:
        super().__init__()
        self.strengths = (brightness, contrast, saturation)

    def forward(self, img: Tensor) -> Tensor:
        steps = [step for step in torch.randperm(3).tolist() if self.strengths[step]]
        weights = [float(torch.empty(()).uniform_(-self.strengths[step], self.strengths[step])) for step in steps]
        return self.blend(img, steps, weights)

    @staticmethod
    def blend(img: Tensor, steps: Sequence[int], weights: Sequence[float]) -> Tensor:
        """Steps 0 (brightness), 1 (contrast), 2 (saturation) in the order given, with those
        weights, computed with the authors' operations, in their order."""
        for step, weight in zip(steps, weights):
            if step == 0:
                target = torch.zeros_like(img)
            else:  # their Grayscale: ITU-R 601 luma copied into every channel
                target = img[0].mul(0.299).add_(img[1], alpha=0.587).add_(img[2], alpha=0.114).repeat(3, 1, 1)
                if step == 1:
                    target.fill_(target.mean())
            img = img.lerp(target, weight)
        return img

    def extra_repr(self) -> str:
        brightness, contrast, saturation = self.strengths
        return f"brightness={brightness}, contrast={contrast}, saturation={saturation}"


def image_sets(
    name: str, root: Path, *, download: bool, img_size: int | None, crop_flip: bool
) -> tuple[VisionDataset, VisionDataset, VisionDataset, str]:
    """(train, its view through the eval transform, test, input kind) of image set ``name``;
    with ``crop_flip`` False, train is that eval view."""
    if name == "fashionmnist":
        train_tf, eval_tf = _fashion_mnist_transforms()
        train = _load_fashion_mnist(root, train=True, transform=train_tf, download=download)
        test = _load_fashion_mnist(root, train=False, transform=eval_tf, download=download)
        input_kind = "28x28"
    elif name in ("cifar10", "cifar100"):
        train_tf, eval_tf = _cifar_transforms(name)
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        train = _load_cifar(cls, root, train=True, transform=train_tf, download=download)
        test = _load_cifar(cls, root, train=False, transform=eval_tf, download=download)
        input_kind = "32x32"
    else:
        train_tf, eval_tf = _imagenet_transforms(img_size or 224)
        test_dirs = ("val",) if name == "imagenet" else ("val", "test")  # a tree with both: val/, as runs had it
        train, test = _load_image_folders(root, test_dirs, train_tf, eval_tf)
        input_kind = "224x224"
    eval_view = _with_transform(train, eval_tf)
    return (train if crop_flip else eval_view), eval_view, test, input_kind


def _with_transform(dataset: VisionDataset, transform: Callable) -> VisionDataset:
    """Shallow copy with another transform: shares the image array / file list,
    so the validation view neither duplicates CIFAR in memory nor rescans a folder tree."""
    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, view.target_transform)
    return view


def _cifar_transforms(name: str) -> tuple[Callable, Callable]:
    mean, std = (_CIFAR10_MEAN, _CIFAR10_STD) if name == "cifar10" else (_CIFAR100_MEAN, _CIFAR100_STD)
    normalize = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return train_tf, T.Compose([T.ToTensor(), normalize])


def _fashion_mnist_transforms() -> tuple[Callable, Callable]:
    """Random crop (padding 2) and horizontal flip, as for CIFAR at 28x28 (clothes are
    left-right symmetric; digits would not be)."""
    normalize = T.Normalize(_FASHION_MEAN, _FASHION_STD)
    train_tf = T.Compose([T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return train_tf, T.Compose([T.ToTensor(), normalize])


def _load_fashion_mnist(root: Path, *, train: bool, transform: Callable, download: bool,
                        system_copy: Path | None = None) -> FashionMNIST:
    """torchvision's FashionMNIST; when its files are missing, first unpacked from the
    Debian package's copy (``system_copy``, default DEBIAN_FASHION_MNIST), so that no
    download is needed offline."""
    system_copy = system_copy or DEBIAN_FASHION_MNIST
    raw = root / "FashionMNIST" / "raw"
    wanted = [Path(url).name for url, _ in FashionMNIST.resources]
    if not all((raw / Path(name).stem).is_file() for name in wanted) and system_copy.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for name in wanted:
            if (system_copy / name).is_file() and not (raw / Path(name).stem).is_file():
                _unpack_beside(system_copy / name, raw / Path(name).stem)
    try:
        return FashionMNIST(root, train=train, transform=transform, download=download)
    # torchvision asserts an idx file's magic number: AssertionError for a page saved in its place
    except (RuntimeError, OSError, HTTPException, ValueError, AssertionError, TypeError) as err:
        if all((raw / Path(name).stem).is_file() for name in wanted):  # there, but cut short or no idx files
            raise ValueError(f"the Fashion-MNIST files in {raw} are unreadable ({err}): delete that folder, and "
                             "they are unpacked (or downloaded) again") from err
        failed = " ".join(str(err).split())  # torchvision's download error spans lines
        raise FileNotFoundError(
            f"Fashion-MNIST data not found in {raw}: install Debian's dataset-fashion-mnist package "
            f"(apt-get install dataset-fashion-mnist) or put the four idx files there"
            + (f" (the download failed: {failed})" if download else ", or allow the download (--download)")
        ) from err


def _unpack_beside(archive: Path, target: Path) -> None:
    """Unpack a .gz into a file of this process's beside ``target``, then rename it into place:
    a run started beside this one reads the whole file or none."""
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with gzip.open(archive) as source, open(partial, "wb") as unpacked:
        shutil.copyfileobj(source, unpacked)
    os.replace(partial, target)


def _imagenet_transforms(size: int) -> tuple[Callable, Callable]:
    """The PS-KD authors' ImageNet recipe (loader/custom_dataloader.py) at crop side ``size``:
    torchvision's random resized crop and flip, then their colour jitter and lighting on the
    tensor. Evaluation resizes to size/0.875 (256 for 224) and crops the centre, so small
    images are not upsampled to 224."""
    normalize = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = T.Compose([
        T.RandomResizedCrop(size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        Lighting(0.1),
        normalize,
    ])
    eval_tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(), normalize])
    return train_tf, eval_tf


def _load_cifar(
    cls: type[CIFAR10], root: Path, *, train: bool, transform: Callable, download: bool
) -> CIFAR10:
    """torchvision's loader with its md5 checks, its failures turned into an actionable error."""
    try:
        return cls(root, train=train, transform=transform, download=download)
    except (RuntimeError, OSError, HTTPException) as err:  # torchvision's check, or the download
        folder = root / cls.base_folder
        fix = f"pass --data-dir pointing at the folder that holds {cls.base_folder}/"
        if download:
            fix += f", or fetch {cls.url} and extract it into {root} (the download failed: {err})"
        else:
            fix += ", or allow the download"
        names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        if all((folder / n).is_file() for n in names):
            raise ValueError(
                f"{cls.__name__} files in {folder} fail torchvision's md5 check (incomplete or "
                f"corrupted); delete that folder and download again, or {fix}"
            ) from err
        raise FileNotFoundError(f"{cls.__name__} data not found: looked in {folder}; {fix}") from err


def _visible_image(path: str) -> bool:
    """An image file ImageFolder would take, unless hidden: a Mac copying a tree writes a
    ``._NAME.JPEG`` of metadata beside each image, which no image decoder reads."""
    return not Path(path).name.startswith(".") and has_file_allowed_extension(path, IMG_EXTENSIONS)


def _load_image_folders(
    root: Path, test_dirs: tuple[str, ...], train_tf: Callable, eval_tf: Callable
) -> tuple[ImageFolder, ImageFolder]:
    train_dir = root / "train"
    test_dir = next((root / d for d in test_dirs if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        wanted = " and ".join(["train/", " or ".join(f"{d}/" for d in test_dirs)])
        raise FileNotFoundError(
            f"expected ImageFolder trees {wanted} (one subfolder per class) in {root}; "
            "pass --data-dir pointing at the folder that holds them"
        )
    train = ImageFolder(train_dir, transform=train_tf, is_valid_file=_visible_image)
    test = ImageFolder(test_dir, transform=eval_tf, is_valid_file=_visible_image)
    if train.classes != test.classes:
        raise ValueError(
            f"class folders differ between {train_dir} and {test_dir}, so their labels would disagree"
        )
    return train, test
