"""ImageNet-sized classifiers, taken from torchvision by name.

The paper's ImageNet runs use standard architectures, so there is nothing to
gain from re-implementing them: torchvision's model registry already provides
every classification model, randomly initialised when `weights=None`. torchvision is
imported when one is listed or built: it takes seconds, and the other models need none of it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["create_torchvision_model", "torchvision_classifiers"]

# Models that, by default, return a namedtuple with auxiliary logits in
# training mode; the training loop expects a plain logits tensor.
_AUX_LOGITS_MODELS = frozenset({"googlenet", "inception_v3"})


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image-classification models (not detection, video, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_torchvision_model(name: str, num_classes: int) -> nn.Module:
    """Build torchvision model `name` from scratch with a `num_classes`-way head."""
    extra: dict[str, bool] = {}
    if name in _AUX_LOGITS_MODELS:
        # init_weights=True keeps their designed init and silences torchvision's FutureWarning.
        extra = {"aux_logits": False, "init_weights": True}
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
