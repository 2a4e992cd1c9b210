"""Small models for MNIST-1D, the project's offline default data set, and for
Fashion-MNIST's 28x28 grey images.

MNIST-1D samples are float tensors of shape (1, 40) with 10 classes and only a
few thousand training examples.  These models are deliberately unregularised
(no dropout, no weight sharing tricks, no normalisation in the MLP) so that
they over-fit and become over-confident within a few epochs on a CPU — the
regime in which progressive self-knowledge distillation is supposed to help.
"""

from __future__ import annotations

from torch import nn

__all__ = ["IMAGE28_MODELS", "MNIST1D_LENGTH", "MNIST1D_MODELS", "fmnist_cnn", "mnist1d_cnn", "mnist1d_mlp"]

MNIST1D_LENGTH = 40
"""Length of one MNIST-1D sequence (the `mnist1d` package's default)."""


def mnist1d_cnn(num_classes: int = 10) -> nn.Module:
    """Three 1-D convolutions (32, 64, 64 channels) and a linear head, ~25k params.

    The two stride-2 convolutions shrink 40 -> 10 positions so the head stays
    small and one epoch of 4000 samples takes about a second on one core; the
    head reads the flattened feature map, not a pooled one, so the model can
    also memorise where things are.
    """
    length = MNIST1D_LENGTH // 4
    return nn.Sequential(
        nn.Conv1d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.Conv1d(32, 64, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(64 * length, num_classes),
    )


def mnist1d_mlp(num_classes: int = 10, hidden: int = 512) -> nn.Module:
    """Flatten, then two ReLU hidden layers of `hidden` units, ~290k params at 512."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(MNIST1D_LENGTH, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def fmnist_cnn(num_classes: int = 10) -> nn.Module:
    """Two 3x3 convolution blocks (32, 64 channels; batch norm, ReLU, 2x2 max pooling) and a
    128-unit hidden layer: the small 2-D CNN for 28x28 grey images (~420k params)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


MNIST1D_MODELS = {
    "mnist1d_cnn": (mnist1d_cnn, "3-layer 1-D conv net, 32-64 channels (~25k params)"),
    "mnist1d_mlp": (mnist1d_mlp, "MLP, two hidden layers of 512 units (~290k params)"),
}
"""Name -> (builder taking num_classes, one-line description) for the MNIST-1D models."""

IMAGE28_MODELS = {
    "fmnist_cnn": (fmnist_cnn, "2-D CNN, 32-64 channels and a 128-unit layer (~420k params)"),
}
"""The same, for 28x28 grey images (Fashion-MNIST)."""
