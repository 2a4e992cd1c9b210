"""Tests for the model registry and the hand-written architectures."""

from __future__ import annotations

import pytest
import torch

from pskd_store.models import available_models, create_model, input_kind

# Parameter counts at 100 classes, from Table 1 of the PS-KD paper (Kim et al., ICCV 2021).
PAPER_PARAMS_M = {
    "preact_resnet18": 11.22,
    "resnet101": 42.70,
    "resnext29_8x64d": 34.52,
    "densenet121": 7.05,
    "pyramidnet200": 26.84,
}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_cifar_param_count_matches_paper(name: str) -> None:
    count = _num_params(create_model(name, 100))
    assert count / 1e6 == pytest.approx(PAPER_PARAMS_M[name], rel=0.01)
    assert input_kind(name) == "32x32"


@pytest.mark.parametrize("name", ["preact_resnet18", "densenet121"])
def test_cifar_forward(name: str) -> None:
    model = create_model(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


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
