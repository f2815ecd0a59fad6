"""Model families of the harness; each uses ``nn.BatchNorm2d``, swapped per variant."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from safenorm.evaluation.registry import Registry
from torch import Tensor, nn

__all__ = [
    "MODELS",
    "BasicBlock",
    "ResNet",
    "SmallCNN",
    "WSConv2d",
    "build_model",
    "digits_dp_cnn",
    "swap_batchnorm",
    "weight_standardized",
]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 with one max-pool and a linear head; sized for 8x8 digits.

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the first convolution (the others use ``2 * width``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w2 = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(4 * w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def digits_dp_cnn(num_classes: int = 10) -> nn.Module:
    """The 2-conv BatchNorm CNN of the DP-SGD studies on 8x8 digits (DESIGN.md §3.1's family).

    Conv-BN-ReLU-MaxPool twice and a linear head on the 32x2x2 features.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, num_classes),
    )


def swap_batchnorm(model: nn.Module, make: Callable[[int], nn.Module]) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` (in place) by ``make(num_features)``."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, make(child.num_features))
        else:
            swap_batchnorm(child, make)
    return model


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with scaled weight standardization (Qiao et al. 2019, scaled as in Brock et
    al. 2021; with GroupNorm the DP recipe of De et al. 2022): each output filter is
    standardized over its ``fan_in = in_channels * kernel`` weights to mean 0 and variance
    ``1 / fan_in`` before the convolution (``eps`` added to the variance), so an input of unit
    variance gives outputs of about unit variance. (GroupNorm after it is blind to the scale; a
    layer normalizing with running statistics is not.)

    Opacus looks grad samplers up by exact type, so this subclass does not get ``Conv2d``'s
    (which would treat the standardized weights as the parameters): its per-sample gradients
    come from Opacus' functorch fallback, through the standardization.
    """

    def __init__(self, *args: Any, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        w = self.weight
        dims = tuple(range(1, w.dim()))
        mean = w.mean(dims, keepdim=True)
        var = w.var(dims, unbiased=False, keepdim=True)
        fan_in = math.prod(w.shape[1:])
        return (w - mean) * torch.rsqrt((var + self.eps) * fan_in)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
            self.groups,
        )  # fmt: skip


def weight_standardized(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` of ``model`` (in place) by a :class:`WSConv2d` with its
    weights (``padding_mode="zeros"`` only)."""
    for name, child in model.named_children():
        if type(child) is nn.Conv2d:
            if child.padding_mode != "zeros":
                raise ValueError(f"weight_standardized: {name} has padding_mode != 'zeros'")
            ws = WSConv2d(
                child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                padding=child.padding, dilation=child.dilation, groups=child.groups,
                bias=child.bias is not None,
            )  # fmt: skip
            ws.load_state_dict(child.state_dict())
            setattr(model, name, ws)
        else:
            weight_standardized(child)
    return model


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet (ResNet-20 family: three stages of basic blocks).

    Args:
        in_channels: input channels.
        num_classes: output classes.
        width: channels of the first stage (stages use ``width``, ``2 width``, ``4 width``).
        blocks: basic blocks per stage (3 gives ResNet-20).
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width: int = 16, blocks: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.layers(self.stem(x))).flatten(1))


ModelBuilder = Callable[[int, int], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")
MODELS.register("small-cnn", lambda c, k: SmallCNN(c, k), aliases=("cnn", "digits-cnn"))
# twice the channels (32-64-64), about 4x the multiply-adds: the second width of the study
MODELS.register("small-cnn-wide", lambda c, k: SmallCNN(c, k, width=32), aliases=("wide-cnn",))
MODELS.register("resnet", lambda c, k: ResNet(c, k), aliases=("resnet-cifar", "resnet14"))
MODELS.register("resnet20", lambda c, k: ResNet(c, k, blocks=3))
MODELS.register("digits-dp-cnn", lambda c, k: digits_dp_cnn(k))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int = 8) -> nn.Module:
    """Build a registered model; ``auto`` picks ``small-cnn`` below 16 px, else ``resnet``."""
    if name == "auto":
        name = "small-cnn" if image_size < 16 else "resnet"
    return MODELS.get(name)(in_channels, num_classes)
