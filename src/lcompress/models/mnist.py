"""Networks for 28x28 grey images (MNIST, Fashion-MNIST) and generic MLPs."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LeNet300", "LeNet5", "MLP", "lenet300", "lenet300_classic", "lenet5", "mlp"]

_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; known: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


class MLP(nn.Module):
    """Fully connected net with layer sizes ``sizes`` (input first, classes last).

    Layers are named ``fc1``, ``fc2``, ...; the activation is applied after
    every layer but the last.  Any input of shape (N, ...) is flattened.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"MLP needs at least two positive layer sizes, got {sizes}")
        self.sizes = sizes
        self.activation = activation
        self._act = _activation(activation)
        self.n_layers = len(sizes) - 1
        for i in range(self.n_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.n_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n_layers:
                x = self._act(x)
        return x


class LeNet300(MLP):
    """LeNet300: 784-300-100-10 MLP (fc1, fc2, fc3), 266,610 parameters.

    ``activation`` is ``"relu"`` (default) or ``"tanh"`` (the classic net).
    Input (N, 1, 28, 28) or (N, 784).
    """

    def __init__(self, activation: str = "relu", num_classes: int = 10):
        super().__init__([784, 300, 100, num_classes], activation=activation)


class LeNet5(nn.Module):
    """Caffe-style LeNet5 for 28x28 inputs, 431,080 parameters.

    conv1 (1->20, 5x5) - maxpool 2 - conv2 (20->50, 5x5) - maxpool 2 -
    fc1 (800->500) - ReLU - fc2 (500->10).  Caffe's original applies no
    nonlinearity after the convolutions; here ReLU follows each pooled
    convolution by default (``conv_relu=True``), which changes no parameter
    count; pass ``conv_relu=False`` for the exact Caffe net.
    """

    def __init__(self, num_classes: int = 10, conv_relu: bool = True):
        super().__init__()
        self.conv_relu = conv_relu
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], 1, 28, 28)
        x = F.max_pool2d(self.conv1(x), 2)
        if self.conv_relu:
            x = F.relu(x)
        x = F.max_pool2d(self.conv2(x), 2)
        if self.conv_relu:
            x = F.relu(x)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def lenet300(activation: str = "relu", num_classes: int = 10) -> LeNet300:
    return LeNet300(activation=activation, num_classes=num_classes)


def lenet300_classic(num_classes: int = 10) -> LeNet300:
    """LeNet300 with tanh activations."""
    return LeNet300(activation="tanh", num_classes=num_classes)


def lenet5(num_classes: int = 10, conv_relu: bool = True) -> LeNet5:
    return LeNet5(num_classes=num_classes, conv_relu=conv_relu)


def mlp(sizes: Sequence[int] = (784, 1024, 1024, 10), activation: str = "relu") -> MLP:
    return MLP(sizes, activation=activation)
