"""The PS-KD paper's CIFAR architectures, for 32x32 inputs.

Each computes what the PS-KD authors' CIFAR code computes (their copies of
pytorch-cifar's PreAct ResNet-18, ResNet-101 and DenseNet-121, the CIFAR
ResNeXt and the PyramidNet authors' code, with and without ShakeDrop): the
same layers in the same order, the same parameter counts as the paper's
Table 1 at 100 classes, and the same initialisation where their code departs
from PyTorch's defaults (ResNeXt, PyramidNet).  The stems are 3x3 with
stride 1: on 32x32 images an ImageNet 7x7/stride-2 stem plus max-pool would
throw away most of the resolution, which is why these cannot simply be
torchvision's models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CIFAR_MODELS",
    "ShakeDrop",
    "densenet121",
    "preact_resnet18",
    "pyramidnet200",
    "pyramidnet200_shakedrop",
    "resnet101",
    "resnext29_8x64d",
]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Bias-free because every conv here feeds a BatchNorm that has its own shift.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class _Classifier(nn.Module):
    """Global average pool + linear, optionally after a final BN-ReLU.

    Pre-activation networks (DenseNet, PyramidNet) end on an un-normalised
    residual sum, so they normalise once more before pooling.
    """

    def __init__(self, in_ch: int, num_classes: int, final_bn_relu: bool) -> None:
        super().__init__()
        self.norm = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)) if final_bn_relu else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Network(nn.Module):
    """Stem -> feature stages -> classifier; the shape all these models share."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, head: _Classifier) -> None:
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _stem(out_ch: int, bn: bool, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [_conv3x3(3, out_ch)]
    if bn:
        layers.append(nn.BatchNorm2d(out_ch))
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _stages(
    make_block: Callable[[int, int, int], nn.Module],
    stage_specs: list[tuple[int, int, int]],
    in_ch: int,
) -> tuple[nn.Sequential, int]:
    """Stack stages of blocks; returns the stages and their output width.

    `stage_specs` holds (num_blocks, out_channels, stride) per stage and
    `make_block(in_ch, out_ch, stride)` builds one block; only the first block
    of a stage changes resolution.
    """
    blocks: list[nn.Module] = []
    for num_blocks, out_ch, stride in stage_specs:
        for i in range(num_blocks):
            blocks.append(make_block(in_ch, out_ch, stride if i == 0 else 1))
            in_ch = out_ch
    return nn.Sequential(*blocks), in_ch


def _projection(in_ch: int, out_ch: int, stride: int, bn: bool) -> nn.Module:
    """1x1 shortcut used when a block changes width or resolution."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    conv = _conv1x1(in_ch, out_ch, stride)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch)) if bn else conv


# --------------------------------------------------------------------------
# PreAct ResNet-18
# --------------------------------------------------------------------------


class _PreActBlock(nn.Module):
    """BN-ReLU-conv x2 (He et al. 2016b) whose shortcut, identity or 1x1
    projection, always takes the normalised input (after the first BN-ReLU).

    That departs from He et al., whose identity shortcut carries the raw sum,
    but it is what the PS-KD authors' `PreActBlock` computes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride, bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def preact_resnet18(num_classes: int = 100) -> nn.Module:
    """PreAct ResNet-18 (the authors' `CIFAR_ResNet18_preActBasic`), 11,217,444 params at 100 classes.

    Unlike pytorch-cifar's `PreActResNet18`, the stem is conv-BN-ReLU and
    there is no BN before the head; PyTorch's default initialisation.
    """
    stages, width = _stages(
        _PreActBlock, [(2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2)], in_ch=64
    )
    return _Network(_stem(64, bn=True, relu=True), stages, _Classifier(width, num_classes, final_bn_relu=False))


# --------------------------------------------------------------------------
# ResNet-101 and ResNeXt-29: the same post-activation bottleneck, the latter
# with a grouped and wider 3x3 convolution.
# --------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (optionally grouped, carries the stride) -> 1x1 expand,
    each followed by BN, ReLU after the residual sum."""

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv1x1(in_ch, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, width, stride, groups=groups),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv1x1(width, out_ch),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = _projection(in_ch, out_ch, stride, bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet101(num_classes: int = 100) -> nn.Module:
    """CIFAR ResNet-101 (the authors' `CIFAR_ResNet101_Bottle`, blocks [3, 4, 23, 3]),
    42,697,380 params at 100 classes; PyTorch's default initialisation."""
    expansion = 4

    def block(in_ch: int, out_ch: int, stride: int) -> nn.Module:
        return _Bottleneck(in_ch, out_ch // expansion, out_ch, stride)

    stages, width = _stages(
        block, [(3, 256, 1), (4, 512, 2), (23, 1024, 2), (3, 2048, 2)], in_ch=64
    )
    return _Network(_stem(64, bn=True, relu=True), stages, _Classifier(width, num_classes, final_bn_relu=False))


def _init_he_fan_out(model: nn.Module, *, he_classifier: bool) -> None:
    """The initialisation of the CIFAR ResNeXt and PyramidNet code the paper's numbers used.

    Every conv is He-normal over its fan-out (PyramidNet's normal(0, sqrt(2 / (k*k*out)))
    is the same thing) and every BN starts as the identity. With ``he_classifier`` (ResNeXt)
    the classifier weight is He-normal over its fan-in and its bias zero; otherwise
    (PyramidNet) the classifier keeps PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and he_classifier:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def resnext29_8x64d(num_classes: int = 100) -> nn.Module:
    """ResNeXt-29 (8x64d), the authors' `CifarResNeXt`, 34,518,948 params at 100 classes.

    Cardinality 8 with 64 channels per group in the first stage gives a
    512-wide grouped 3x3 that doubles with every stage, while the block
    outputs are 256/512/1024.
    """
    cardinality, base_width = 8, 64

    def block(in_ch: int, out_ch: int, stride: int) -> nn.Module:
        width = cardinality * base_width * out_ch // 256
        return _Bottleneck(in_ch, width, out_ch, stride, groups=cardinality)

    stages, width = _stages(block, [(3, 256, 1), (3, 512, 2), (3, 1024, 2)], in_ch=64)
    model = _Network(_stem(64, bn=True, relu=True), stages, _Classifier(width, num_classes, final_bn_relu=False))
    _init_he_fan_out(model, he_classifier=True)
    return model


# --------------------------------------------------------------------------
# DenseNet-BC-121
# --------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 (4k) -> BN-ReLU-3x3 (k), concatenated onto its input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            _conv1x1(in_ch, 4 * growth),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            _conv3x3(4 * growth, growth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.body(x), x], 1)


def _transition(in_ch: int, out_ch: int) -> nn.Sequential:
    """Compression between dense blocks: BN-ReLU-1x1 conv, then halve the resolution."""
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), _conv1x1(in_ch, out_ch), nn.AvgPool2d(2))


def densenet121(num_classes: int = 100) -> nn.Module:
    """DenseNet-BC-121 (growth 32, compression 0.5; the authors' `CIFAR_DenseNet121`),
    7,048,548 params at 100 classes; PyTorch's default initialisation."""
    growth, block_sizes, reduction = 32, (6, 12, 24, 16), 0.5
    width = 2 * growth
    layers: list[nn.Module] = []
    for i, size in enumerate(block_sizes):
        for _ in range(size):
            layers.append(_DenseLayer(width, growth))
            width += growth
        if i < len(block_sizes) - 1:
            out = int(width * reduction)
            layers.append(_transition(width, out))
            width = out
    return _Network(
        _stem(2 * growth, bn=False, relu=False),
        nn.Sequential(*layers),
        _Classifier(width, num_classes, final_bn_relu=True),
    )


# --------------------------------------------------------------------------
# PyramidNet-200 (alpha 240, bottleneck), optionally with ShakeDrop
# --------------------------------------------------------------------------


def _per_sample(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (batch,) factor so that it broadcasts over `like`'s other dimensions."""
    return factor.view(-1, *([1] * (like.dim() - 1)))


class _ShakeDropFunction(torch.autograd.Function):
    """ShakeDrop's training-mode step (Yamada et al. 2019), as the authors' code does it.

    One Bernoulli(1 - p_drop) gate per call, shared by the whole batch: a kept
    branch passes unchanged both ways; a dropped one is scaled per sample by
    alpha ~ U(-1, 1) going forward and, independently, by beta ~ U(0, 1)
    coming back.  The gate stays a tensor on the input's device and selects
    with `torch.where`, so unlike the authors' `gate.item()` no block waits
    for the GPU.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, p_drop: float) -> torch.Tensor:
        keep = torch.empty((), device=x.device).bernoulli_(1.0 - p_drop).bool()
        alpha = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(-1.0, 1.0)
        ctx.save_for_backward(keep)
        return x * _per_sample(torch.where(keep, 1.0, alpha), x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        # A fresh draw: the backward scale must not reuse the forward's alpha.
        beta = torch.empty(grad.shape[0], device=grad.device, dtype=grad.dtype).uniform_(0.0, 1.0)
        return grad * _per_sample(torch.where(keep, 1.0, beta), grad), None


class ShakeDrop(nn.Module):
    """Stochastic regulariser on a residual branch; in eval mode the branch is
    scaled by its expected training-time factor, 1 - p_drop."""

    def __init__(self, p_drop: float) -> None:
        super().__init__()
        self.p_drop = p_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (1.0 - self.p_drop) * x
        return _ShakeDropFunction.apply(x, self.p_drop)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop:.4f}"


class _PyramidBottleneck(nn.Module):
    """BN-1x1-BN-ReLU-3x3-BN-ReLU-1x1-BN with a parameter-free shortcut.

    Widths grow a little in every block, so the shortcut cannot be an
    identity; PyramidNet average-pools it when the resolution halves and
    zero-pads the missing channels instead of learning a projection.  With
    `p_drop` set, ShakeDrop scales the branch before the sum.
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, p_drop: float | None = None) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            _conv1x1(in_ch, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv3x3(width, width, stride),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            _conv1x1(width, out_ch),
            nn.BatchNorm2d(out_ch),
        )
        self.shake_drop = ShakeDrop(p_drop) if p_drop is not None else nn.Identity()
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shake_drop(self.body(x))
        shortcut = self.pool(x)
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, out.shape[1] - shortcut.shape[1]))


def _pyramidnet200(num_classes: int, shakedrop: bool) -> nn.Module:
    """Depth 200 = 9 layers per bottleneck x 22 blocks x 3 stages + 2, and the
    3x3 width rises linearly by alpha / 66 per block from 16 to 16 + alpha.

    With `shakedrop`, block i of the 66 drops with probability 0.5 (i + 1) / 66
    (ShakeDrop's linear decay rule, reaching 0.5 at the last block).
    """
    depth, alpha, stem_width = 200, 240, 16
    blocks_per_stage = (depth - 2) // 9
    num_blocks = 3 * blocks_per_stage
    step = alpha / num_blocks
    layers: list[nn.Module] = []
    in_ch, width = stem_width, float(stem_width)
    for stage in range(3):
        for i in range(blocks_per_stage):
            width += step
            stride = 2 if stage > 0 and i == 0 else 1
            p_drop = 0.5 * (len(layers) + 1) / num_blocks if shakedrop else None
            layers.append(_PyramidBottleneck(in_ch, round(width), stride, p_drop))
            in_ch = round(width) * _PyramidBottleneck.expansion
    model = _Network(
        _stem(stem_width, bn=True, relu=False),
        nn.Sequential(*layers),
        _Classifier(in_ch, num_classes, final_bn_relu=True),
    )
    _init_he_fan_out(model, he_classifier=False)
    return model


def pyramidnet200(num_classes: int = 100) -> nn.Module:
    """PyramidNet-200 (alpha 240, bottleneck; the authors' `PyramidNet`), 26,844,952 params at 100 classes."""
    return _pyramidnet200(num_classes, shakedrop=False)


def pyramidnet200_shakedrop(num_classes: int = 100) -> nn.Module:
    """PyramidNet-200 with ShakeDrop (the authors' `PyramidNet_ShakeDrop`, the paper's
    "+ SD" rows); same parameters as `pyramidnet200`, ShakeDrop adds none."""
    return _pyramidnet200(num_classes, shakedrop=True)


CIFAR_MODELS: dict[str, tuple[Callable[[int], nn.Module], str]] = {
    "preact_resnet18": (preact_resnet18, "PreAct ResNet-18 (11.2M params at 100 classes)"),
    "resnet101": (resnet101, "CIFAR ResNet-101, bottleneck [3,4,23,3] (42.7M params at 100 classes)"),
    "resnext29_8x64d": (resnext29_8x64d, "ResNeXt-29, 8x64d (34.5M params at 100 classes)"),
    "densenet121": (densenet121, "DenseNet-BC-121, growth 32 (7.0M params at 100 classes)"),
    "pyramidnet200": (pyramidnet200, "PyramidNet-200, alpha 240, bottleneck (26.8M params at 100 classes)"),
    "pyramidnet200_shakedrop": (
        pyramidnet200_shakedrop,
        "PyramidNet-200, alpha 240, bottleneck, with ShakeDrop (26.8M params at 100 classes)",
    ),
}
"""Name -> (builder taking num_classes, one-line description) for the 32x32 models."""
