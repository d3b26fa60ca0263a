"""From-scratch networks for small images. All take RGB in [0, 1] and normalise inside."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallConvNet(nn.Module):
    """A four-stage convnet: cheap enough for CPU surrogates and victims.

    ``width`` scales every stage: 16 makes a surrogate that runs a min-min fit on a laptop CPU,
    32-64 a victim that reaches ~70 % on 8k CIFAR images.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.norm = Normalize()
        self.features = nn.Sequential(
            _conv_bn(3, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.norm(x)))


class TinyConvNet(nn.Module):
    """Three conv stages with early pooling (~3 M multiply-adds per 32x32 image): the CPU surrogate.

    Error-minimizing noise only needs a model that can pick up a shortcut, so the fast presets
    use this net; it is about 5x cheaper than ``SmallConvNet(width=16)``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.norm = Normalize()
        self.features = nn.Sequential(
            _conv_bn(3, w),
            nn.MaxPool2d(2),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.norm(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, option_a: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.option_a = option_a and (stride != 1 or cin != cout)
        self.pad = cout // 4
        self.shortcut = nn.Sequential()
        if not option_a and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.option_a:  # parameter-free shortcut of the CIFAR "option A" ResNets
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = self.shortcut(x)
        return F.relu(out + short)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), as in the EM/REM/SEM papers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.norm(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-20/56 with option-A shortcuts (key names match shared pretrained weights)."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.norm = Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin, stages = 16, []
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(cin, cout, stride, option_a=True)]
            blocks += [BasicBlock(cout, cout, 1, option_a=True) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d pooled features (the input of the final linear layer)."""
        out = F.relu(self.bn1(self.conv1(self.norm(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


# the nets whose width (channels of the first stage; later stages double it) can be chosen, with their own
WIDTHS = {"tinycnn": 16, "smallcnn": 16, "convnet": 32}

BUILTIN = {
    "tinycnn": lambda num_classes, width=WIDTHS["tinycnn"]: TinyConvNet(num_classes, width=width),
    "smallcnn": lambda num_classes, width=WIDTHS["smallcnn"]: SmallConvNet(num_classes, width=width),
    "convnet": lambda num_classes, width=WIDTHS["convnet"]: SmallConvNet(num_classes, width=width),
    "resnet18": lambda num_classes: ResNet18(num_classes),
    "resnet20": lambda num_classes: CifarResNet(20, num_classes),
    "resnet56": lambda num_classes: CifarResNet(56, num_classes),
}
