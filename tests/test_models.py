"""Tests for the model registry and the hand-written architectures."""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pskd_store.models import available_models, create_model, input_kind
from pskd_store.models.cifar import ShakeDrop

# Exact parameter counts at 100 classes of the PS-KD authors' CIFAR networks
# (the paper's Table 1 rounds them to 11.22M, 42.70M, 34.52M, 7.05M, 26.84M).
CIFAR_PARAMS = {
    "preact_resnet18": 11_217_444,
    "resnet101": 42_697_380,
    "resnext29_8x64d": 34_518_948,
    "densenet121": 7_048_548,
    "pyramidnet200": 26_844_952,
    "pyramidnet200_shakedrop": 26_844_952,  # ShakeDrop has no parameters
}

# Each --arch and the PS-KD authors' network it is (tests/authors_networks: their models/,
# byte for byte): module, class, arguments.
AUTHORS = {
    "preact_resnet18": ("preact_resnet", "CIFAR_ResNet18_preActBasic", {"num_classes": 100}),
    "resnet101": ("preact_resnet", "CIFAR_ResNet101_Bottle", {"num_classes": 100}),
    "densenet121": ("densenet_cifar", "CIFAR_DenseNet121", {"num_classes": 100, "bias": True}),
    "resnext29_8x64d": ("resnext", "CifarResNeXt",
                        {"cardinality": 8, "depth": 29, "nlabels": 100, "base_width": 64, "widen_factor": 4}),
    "pyramidnet200": ("pyramid", "PyramidNet",
                      {"dataset": "cifar100", "depth": 200, "alpha": 240, "num_classes": 100, "bottleneck": True}),
    "pyramidnet200_shakedrop": ("pyramid_shake_drop", "PyramidNet_ShakeDrop",
                                {"dataset": "cifar100", "depth": 200, "alpha": 240, "num_classes": 100,
                                 "bottleneck": True}),
    "tv_resnet152": ("resnet_imagenet", "ResNet",
                     {"dataset": "imagenet", "depth": 152, "num_classes": 1000, "bottleneck": True}),
}


@functools.cache
def _built(name: str, num_classes: int = 100) -> nn.Module:
    """One seeded build per network, shared by the read-only tests (the large ones take seconds)."""
    torch.manual_seed(0)
    return create_model(name, num_classes)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_param_count_is_exact(name: str) -> None:
    assert _num_params(_built(name)) == CIFAR_PARAMS[name]
    assert input_kind(name) == "32x32"


def test_torchvision_resnet152_param_count() -> None:
    assert _num_params(_built("tv_resnet152", 1000)) == 60_192_808


def test_only_the_shakedrop_pyramidnet_has_shakedrop() -> None:
    assert _count(_built("pyramidnet200_shakedrop"), ShakeDrop) == 66
    assert _count(_built("pyramidnet200"), ShakeDrop) == 0


def _layer_settings(model: nn.Module) -> list[tuple]:
    """Every convolution, batch norm and linear layer in the order the model holds them,
    with what sets its computation."""
    settings = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            settings.append(("conv", module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, module.bias is not None))
        elif isinstance(module, nn.BatchNorm2d):
            settings.append(("bn", module.num_features, module.eps, module.momentum, module.affine))
        elif isinstance(module, nn.Linear):
            settings.append(("linear", module.in_features, module.out_features, module.bias is not None))
    return settings


@pytest.mark.parametrize("name", sorted(AUTHORS))
@pytest.mark.slow
def test_each_network_computes_what_the_authors_network_computes(name: str, monkeypatch) -> None:
    """The same layers with the same settings, the same tensors in the same order and, with
    the authors' weights copied in, the same outputs and batch-norm statistics, in eval and
    in training mode (the ShakeDrop PyramidNet's, random, in eval mode only)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "authors_networks"))
    monkeypatch.setattr(torch.cuda, "FloatTensor", torch.FloatTensor)  # their PyramidNets' zero padding, on CPU
    module, cls, kwargs = AUTHORS[name]
    theirs = getattr(importlib.import_module(f"models.{module}"), cls)(**kwargs)
    ours = create_model(name, 1000 if name.startswith("tv_") else 100)
    assert _layer_settings(ours) == _layer_settings(theirs)
    assert [(v.shape, v.dtype) for v in ours.state_dict().values()] == [
        (v.shape, v.dtype) for v in theirs.state_dict().values()]
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    size = 224 if name.startswith("tv_") else 32
    inputs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for training in (False,) if "shakedrop" in name else (False, True):
        ours.train(training), theirs.train(training)
        with torch.no_grad():
            expected = theirs(inputs)
            # float32 sums taken in another order: 2.5e-7 of the outputs' largest, which an
            # untrained 200-layer network in eval mode makes as large as 5e13
            torch.testing.assert_close(ours(inputs), expected, rtol=1.3e-6, atol=1e-5 * expected.abs().max().item())
    for (key, kept), (_, their_kept) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(kept, their_kept, msg=key)  # running statistics after the training pass


@pytest.mark.slow
def test_pyramidnet_shakedrop_trains() -> None:
    torch.manual_seed(0)
    model = create_model("pyramidnet200_shakedrop", 10).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------
# PreAct ResNet-18: the authors' variant
# --------------------------------------------------------------------------


def test_preact_identity_shortcut_takes_normalised_input() -> None:
    torch.manual_seed(0)
    model = create_model("preact_resnet18", 10).eval()
    block = model.stages[1]  # second block of stage 1: identity shortcut
    assert isinstance(block.shortcut, nn.Identity)
    with torch.no_grad():
        nn.init.zeros_(block.conv2.weight)  # silence the residual branch: the output is the shortcut
        x = torch.randn(2, 64, 8, 8)
        torch.testing.assert_close(block(x), F.relu(block.bn1(x)))


def test_preact_stem_is_conv_bn_relu_and_head_has_bias() -> None:
    model = _built("preact_resnet18")
    assert [type(m) for m in model.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert isinstance(model.head.norm, nn.Identity)
    assert model.head.fc.bias is not None


# --------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = weight[0][0].numel()
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _assert_std(weight: torch.Tensor, expected: float) -> None:
    """Sample std within 5 standard errors (relative error of a std is about 1 / sqrt(2N))."""
    tolerance = 5 / math.sqrt(2 * weight.numel())
    assert weight.std().item() == pytest.approx(expected, rel=tolerance)


def _assert_normal(weight: torch.Tensor) -> None:
    """Kurtosis 3 (normal), not 1.8 (uniform)."""
    w = weight.flatten().double()
    assert (w.pow(4).mean() / w.pow(2).mean() ** 2).item() == pytest.approx(3.0, abs=0.15)


def test_resnext_init_is_fan_out_he_normal() -> None:
    model = _built("resnext29_8x64d")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        _assert_std(conv.weight, math.sqrt(2 / _fans(conv.weight)[1]))
    # The grouped 3x3 of the last block: fan_out = 2048*9 is 8x its fan_in = 256*9.
    grouped = model.stages[-1].body[3]
    assert grouped.groups == 8 and _fans(grouped.weight) == (256 * 9, 2048 * 9)
    _assert_std(grouped.weight, math.sqrt(2 / (2048 * 9)))
    _assert_normal(grouped.weight)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    fc = model.head.fc
    _assert_std(fc.weight, math.sqrt(2 / 1024))  # fan_in; fan_out would give sqrt(2 / 100)
    _assert_normal(fc.weight)
    assert torch.all(fc.bias == 0)


@pytest.mark.parametrize("name", ["pyramidnet200", "pyramidnet200_shakedrop"])
def test_pyramidnet_init_is_fan_out_he_normal(name: str) -> None:
    model = _built(name)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        _assert_std(conv.weight, math.sqrt(2 / (k * conv.out_channels)))
    # The last block's 1x1 expansion: 256 -> 1024 channels, fan_out = 4 x fan_in.
    expand = model.stages[-1].body[7]
    assert _fans(expand.weight) == (256, 1024)
    _assert_normal(expand.weight)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # The authors leave the classifier at PyTorch's default: uniform, bias included.
    assert torch.any(model.head.fc.bias != 0)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet101", "densenet121"])
def test_other_cifar_networks_keep_pytorch_default_init(name: str) -> None:
    # Default conv/linear init is kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    model = _built(name)
    for layer in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        bound = 1 / math.sqrt(_fans(layer.weight)[0])
        assert layer.weight.abs().max().item() <= bound * (1 + 1e-6)  # float32 rounding of the bound
        _assert_std(layer.weight, bound / math.sqrt(3))
    assert torch.any(model.head.fc.bias != 0)


# --------------------------------------------------------------------------
# ShakeDrop
# --------------------------------------------------------------------------


def _per_sample_factor(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """out / inp, checked to be one factor per sample; returns the (batch,) factors."""
    ratio = out / inp
    factor = ratio.flatten(1)[:, 0]
    torch.testing.assert_close(ratio, factor.view(-1, 1, 1, 1).expand_as(ratio))
    return factor


def test_shakedrop_eval_scales_by_keep_probability() -> None:
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(ShakeDrop(0.3).eval()(x), (1 - 0.3) * x)


def test_shakedrop_keep_is_identity_both_ways() -> None:
    shake = ShakeDrop(0.0).train()
    for _ in range(5):
        x = torch.randn(8, 3, 4, 4, requires_grad=True)
        y = shake(x)
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.equal(y, x) and torch.equal(x.grad, g)


def test_shakedrop_drop_scales_forward_by_alpha_and_backward_by_independent_beta() -> None:
    torch.manual_seed(0)
    shake = ShakeDrop(1.0).train()  # always dropped
    x = torch.randn(4096, 2, 2, 2).add_(0.1).requires_grad_()  # no zeros to divide by
    y = shake(x)
    g = torch.randn_like(y)
    y.backward(g)
    alpha = _per_sample_factor(y.detach(), x.detach())
    beta = _per_sample_factor(x.grad, g)
    assert alpha.min() >= -1 and alpha.max() <= 1
    assert alpha.min() < -0.95 and alpha.max() > 0.95  # spans U(-1, 1), one draw per sample
    assert beta.min() >= 0 and beta.max() <= 1
    assert beta.min() < 0.05 and beta.max() > 0.95  # spans U(0, 1)
    # A fresh draw, not alpha reused: uncorrelated with alpha and with |alpha| (std error ~ 0.016).
    for a in (alpha, alpha.abs()):
        assert abs(torch.corrcoef(torch.stack([a, beta]))[0, 1].item()) < 0.08


def test_shakedrop_gate_is_one_draw_per_batch_with_keep_probability() -> None:
    torch.manual_seed(0)
    shake = ShakeDrop(0.25).train()
    dropped = 0
    trials = 400
    for _ in range(trials):
        x = torch.randn(4, 3, 2, 2, requires_grad=True)
        y = shake(x)
        g = torch.randn_like(y)
        y.backward(g)
        kept = torch.eq(y, x).flatten(1).all(1)
        assert kept.all() or not kept.any()  # the whole batch shares the gate
        # Backward follows the forward's gate.
        assert torch.equal(x.grad, g) == bool(kept.all())
        dropped += not kept.all()
    assert dropped / trials == pytest.approx(0.25, abs=0.07)  # std error ~ 0.022


def test_shakedrop_never_syncs_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    shake = ShakeDrop(0.5).train()
    if torch.cuda.is_available():
        x = torch.randn(8, 3, 4, 4, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(8):
                shake(x).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    # On any device: reading a tensor's value on the host is how a sync happens, so forbid it.
    def host_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("ShakeDrop read a tensor value on the host")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    for _ in range(8):
        shake(x).sum().backward()


def test_pyramidnet_shakedrop_schedule() -> None:
    p = [m.p_drop for m in _built("pyramidnet200_shakedrop").modules() if isinstance(m, ShakeDrop)]
    assert p == pytest.approx([0.5 * (i + 1) / 66 for i in range(66)])
    assert p[0] == pytest.approx(0.5 / 66) and p[-1] == pytest.approx(0.5)


def test_pyramidnet_shakedrop_scales_the_branch_not_the_shortcut() -> None:
    torch.manual_seed(0)
    model = create_model("pyramidnet200_shakedrop", 10).eval()
    block = model.stages[22]  # first block of stage 2: pooled, zero-padded shortcut
    x = torch.randn(2, block.body[0].num_features, 8, 8)
    with torch.no_grad():
        branch = block.body(x)
        shortcut = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, branch.shape[1] - x.shape[1]))
        torch.testing.assert_close(block(x), (1 - block.shake_drop.p_drop) * branch + shortcut)


@pytest.mark.parametrize("name", ["mnist1d_cnn", "mnist1d_mlp"])
def test_mnist1d_forward(name: str) -> None:
    model = create_model(name, 10)
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)
    assert input_kind(name) == "mnist1d"


def test_torchvision_model_by_prefixed_name() -> None:
    model = create_model("tv_resnet18", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert input_kind("tv_resnet18") == "224x224"


def test_cifar_names_win_over_torchvision() -> None:
    models = available_models()
    for name in ("resnet101", "densenet121"):
        assert models[name].startswith("32x32")
        assert models[f"tv_{name}"].startswith("224x224")
    assert models["pyramidnet200_shakedrop"].startswith("32x32")
    assert models["tv_resnet152"] == "224x224 ImageNet — torchvision resnet152"
    assert models["mnist1d_cnn"].startswith("1-D (MNIST-1D)")


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError) as excinfo:
        create_model("preact_resnet19", 10)
    message = str(excinfo.value)
    assert "preact_resnet19" in message
    assert "preact_resnet18" in message
    assert "pskd-store train --help" in message


def test_bare_torchvision_name_suggests_prefixed_one() -> None:
    with pytest.raises(ValueError, match="tv_resnet152"):
        input_kind("resnet152")


def test_googlenet_and_inception_train_without_auxiliary_heads() -> None:
    """Built with aux_logits=False: in train mode they return the logits tensor the loss
    and the writer take, not torchvision's (logits, aux1, aux2) named tuple."""
    model = create_model("tv_googlenet", 10).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    assert model.aux1 is None and model.aux2 is None


def test_module_reprs_name_their_settings() -> None:
    from pskd_store.image_data import Lighting
    from pskd_store.models.cifar import ShakeDrop

    assert repr(ShakeDrop(0.25)) == "ShakeDrop(p_drop=0.2500)"
    assert repr(Lighting(0.1)) == "Lighting(alphastd=0.1)"
