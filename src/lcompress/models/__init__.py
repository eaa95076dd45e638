"""Model zoo: the reference networks used in LC compression experiments.

``get_model(name, **kwargs)`` builds a model by name; ``MODELS`` maps each
name to its constructor.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .cifar import VGG16, CifarResNet, resnet20, resnet32, resnet56, resnet110, vgg16
from .mnist import MLP, LeNet5, LeNet300, lenet5, lenet300, lenet300_classic, mlp

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300,
    "lenet300_classic": lenet300_classic,
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16": vgg16,
}


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with constructor ``kwargs``.

    Raises ``ValueError`` naming the unknown model and listing known ones.
    """
    try:
        ctor = MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    return ctor(**kwargs)


__all__ = [
    "MODELS",
    "get_model",
    "MLP",
    "LeNet300",
    "LeNet5",
    "CifarResNet",
    "VGG16",
    "lenet300",
    "lenet300_classic",
    "lenet5",
    "mlp",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16",
]
