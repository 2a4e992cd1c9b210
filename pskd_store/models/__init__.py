"""Model registry: one flat namespace of architectures, each tagged with the input it expects.

Four families live here:

* ``32x32`` — the PS-KD paper's CIFAR architectures (:mod:`.cifar`):
  ``preact_resnet18``, ``resnet101``, ``resnext29_8x64d``, ``densenet121``,
  ``pyramidnet200`` and ``pyramidnet200_shakedrop`` (the paper's "+ SD" rows).
* ``mnist1d`` — small models for the offline default data set (:mod:`.small`):
  ``mnist1d_cnn``, ``mnist1d_mlp``.
* ``28x28`` — a small CNN for Fashion-MNIST (:mod:`.small`): ``fmnist_cnn``.
* ``224x224`` — every torchvision classification model (:mod:`.imagenet`),
  registered as ``tv_<torchvision name>``, e.g. ``tv_resnet152``.

Name collisions: torchvision also has ``resnet101`` and ``densenet121``, but
those are ImageNet networks with a 7x7/stride-2 stem.  The bare names belong to
the 32x32 versions, because that is what the paper's CIFAR recipe means by
``--arch densenet121``; torchvision's models are always reached through the
``tv_`` prefix (``tv_resnet101``, ``tv_densenet121``), so no name ever refers to
two models.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .cifar import CIFAR_MODELS
from .imagenet import create_torchvision_model, torchvision_classifiers
from .small import IMAGE28_MODELS, MNIST1D_MODELS

__all__ = ["INPUT_KINDS", "TORCHVISION_PREFIX", "available_models", "create_model", "input_kind"]

TORCHVISION_PREFIX = "tv_"
"""Prefix under which torchvision's ImageNet models are registered."""

INPUT_KINDS = ("32x32", "224x224", "28x28", "mnist1d")
"""Values returned by :func:`input_kind`."""

_KIND_LABELS = {"32x32": "32x32", "224x224": "224x224 ImageNet", "28x28": "28x28 grey (Fashion-MNIST)",
                "mnist1d": "1-D (MNIST-1D)"}


@dataclass(frozen=True)
class _Entry:
    build: Callable[[int], nn.Module]
    kind: str
    summary: str

    @property
    def description(self) -> str:
        return f"{_KIND_LABELS[self.kind]} — {self.summary}"


@functools.cache
def _own_models() -> dict[str, _Entry]:
    # Grouped by family, in the order a listing should show them.
    entries = {name: _Entry(build, "32x32", summary) for name, (build, summary) in CIFAR_MODELS.items()}
    entries.update({name: _Entry(build, "mnist1d", summary) for name, (build, summary) in MNIST1D_MODELS.items()})
    entries.update({name: _Entry(build, "28x28", summary) for name, (build, summary) in IMAGE28_MODELS.items()})
    return entries


@functools.cache
def _registry() -> dict[str, _Entry]:
    """Every model: this package's, then torchvision's (which imports torchvision)."""
    entries = dict(_own_models())
    for name in torchvision_classifiers():
        build = functools.partial(create_torchvision_model, name)
        entries[TORCHVISION_PREFIX + name] = _Entry(build, "224x224", f"torchvision {name}")
    return entries


def _lookup(name: str) -> _Entry:
    if name in _own_models():  # without importing torchvision
        return _own_models()[name]
    registry = _registry()
    try:
        return registry[name]
    except KeyError:
        pass
    matches = difflib.get_close_matches(name, registry, n=3)
    # A bare torchvision name ("resnet152") most likely means its tv_ entry.
    prefixed = TORCHVISION_PREFIX + name
    if prefixed in registry:
        matches = [prefixed] + [m for m in matches if m != prefixed][:2]
    hint = f" Did you mean: {', '.join(matches)}?" if matches else ""
    raise ValueError(
        f"Unknown model {name!r}.{hint} Run `pskd-store train --help` for the list of models."
    )


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build model `name`, randomly initialised, with a `num_classes`-way output.

    Raises ValueError for an unknown name, with close matches suggested.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return _lookup(name).build(num_classes)


def available_models(*, torchvision: bool = True) -> dict[str, str]:
    """Every registered name mapped to a one-line description that starts with its input kind.

    Ordered by family: 32x32, then MNIST-1D, then torchvision (alphabetical); without
    ``torchvision`` (which takes seconds to import) this package's models only.
    """
    return {name: entry.description for name, entry in (_registry() if torchvision else _own_models()).items()}


def input_kind(name: str) -> str:
    """"32x32", "224x224", "28x28" or "mnist1d": the input `name` is built for, so callers can
    refuse a model that does not fit their data set."""
    return _lookup(name).kind
