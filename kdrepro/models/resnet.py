"""Dilated ResNet backbones (output stride 8), pinned to mmsegmentation's ``ResNetV1c`` "-D8" variant.

The paper's teacher (PSPNet-R101, 79.8 mIoU on Cityscapes) matches mmsegmentation's public ``pspnet_r101-d8``
checkpoint, so the backbone follows ``mmseg/models/backbones/resnet.py`` with the settings of
``configs/_base_/models/pspnet_r50-d8.py``: ``ResNetV1c(depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
contract_dilation=True, style="pytorch")``. The details that distinguish it from other "dilated ResNet-18"s
(CIRKD/TorchDistiller use a 64-64-128 stem and dilate both BasicBlock convs):

* deep stem: three 3x3 conv-BN-ReLU (3 -> 32 -> 32 -> 64, the first with stride 2), then a 3x3 max-pool of stride 2;
  ``stem="basic"`` gives the torchvision/ResNetV1b 7x7 stride-2 stem instead (for torchvision ImageNet weights);
* BasicBlock dilates ``conv1`` only; ``conv2`` is a plain 3x3 with padding 1;
* Bottleneck puts the stride and the dilation on its 3x3 ``conv2`` (style "pytorch");
* contracted dilation: the first block of a stage with dilation ``d > 1`` uses ``d // 2`` (stage 3: 1, 2, 2, ...;
  stage 4: 2, 4, 4);
* downsample shortcut = 1x1 conv (with the stage stride) + BN, no average pooling (``avg_down=False``).

``base_width`` (64 = standard) scales the stem and every stage width by ``base_width / 64``: width 16 gives a
8-8-16 stem and stages of 16, 32, 64, 128 planes (times the block expansion). Module names follow mmsegmentation
(``stem``, ``layer1..4``, ``conv1``/``bn1``, ``downsample``), so its checkpoints load with an identity key map.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from kdrepro.errors import ConfigError

StemKind = Literal["deep", "basic"]

#: depth -> (block kind, number of blocks per stage), as mmseg's ``ResNet.arch_settings``.
ARCH_SETTINGS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STEM_KINDS: tuple[str, ...] = ("deep", "basic")
D8_STRIDES: tuple[int, int, int, int] = (1, 2, 1, 1)
D8_DILATIONS: tuple[int, int, int, int] = (1, 1, 2, 4)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias whose padding keeps the size (``padding = dilation``)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block as mmseg's: ``conv1`` carries stride and dilation, ``conv2`` is a plain 3x3."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block, style "pytorch": 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride=stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int,
    dilation: int,
    contract_dilation: bool = True,
) -> nn.Sequential:
    """One ResNet stage, as mmseg's ``ResLayer`` (no multi-grid, no avg-down).

    The first block gets the stride, the 1x1-conv+BN shortcut and, with ``contract_dilation``, half the dilation.
    """
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    first_dilation = dilation // 2 if (contract_dilation and dilation > 1) else dilation
    blocks = [block(in_channels, planes, stride=stride, dilation=first_dilation, downsample=downsample)]
    blocks += [block(out_channels, planes, stride=1, dilation=dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


def make_deep_stem(in_channels: int, stem_channels: int) -> nn.Sequential:
    """ResNetV1c stem: 3x3 convs ``in -> stem/2 (stride 2) -> stem/2 -> stem``, each with BN and ReLU."""
    half = stem_channels // 2
    return nn.Sequential(
        conv3x3(in_channels, half, stride=2),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        conv3x3(half, half),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        conv3x3(half, stem_channels),
        nn.BatchNorm2d(stem_channels),
        nn.ReLU(inplace=True),
    )


class ResNetV1c(nn.Module):
    """Dilated ResNet (output stride 8 with the default strides/dilations); ``forward`` returns ``(c1, c2, c3, c4)``.

    Args:
        depth: 18, 50 or 101.
        base_width: 64 for the standard network; scales the stem and all stage widths by ``base_width / 64``.
        stem: ``"deep"`` (ResNetV1c, 3x 3x3 convs; mmseg default) or ``"basic"`` (one 7x7 stride-2 conv, as
            torchvision, so torchvision ImageNet weights fit).
        strides, dilations: per stage; defaults are mmseg's "-D8" settings.
        contract_dilation: halve the dilation of the first block of each dilated stage (mmseg ``True`` for D8).
        zero_init_residual: zero the last BN weight of every block at init (mmseg ``ResNet`` default).
    """

    def __init__(
        self,
        depth: int,
        base_width: int = 64,
        stem: StemKind = "deep",
        in_channels: int = 3,
        strides: tuple[int, int, int, int] = D8_STRIDES,
        dilations: tuple[int, int, int, int] = D8_DILATIONS,
        contract_dilation: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        check_backbone_options(depth, base_width, stem)
        block_kind, stage_blocks = ARCH_SETTINGS[depth]
        block = BLOCKS[block_kind]
        self.depth, self.base_width, self.stem_kind = depth, base_width, stem
        stem_channels = base_width
        if stem == "deep":
            self.stem = make_deep_stem(in_channels, stem_channels)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = stem_channels
        self.out_channels: tuple[int, ...] = ()
        for index, num_blocks in enumerate(stage_blocks):
            planes = base_width * 2**index
            stage = make_stage(block, channels, planes, num_blocks, strides[index], dilations[index], contract_dilation)
            self.add_module(f"layer{index + 1}", stage)
            channels = planes * block.expansion
            self.out_channels += (channels,)
        init_backbone_weights(self, zero_init_residual)

    def forward_stem(self, x: Tensor) -> Tensor:
        if self.stem_kind == "deep":
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        return self.maxpool(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c1 = self.layer1(self.forward_stem(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


def check_backbone_options(depth: int, base_width: int, stem: str) -> None:
    """Raise :class:`ConfigError` for an unknown depth/stem or a width that does not halve cleanly."""
    if depth not in ARCH_SETTINGS:
        valid = ", ".join(str(d) for d in ARCH_SETTINGS)
        raise ConfigError(f"unknown ResNet depth {depth!r}; valid depths: {valid}")
    if stem not in STEM_KINDS:
        raise ConfigError(f"unknown stem {stem!r}; valid stems: {', '.join(STEM_KINDS)}")
    if not isinstance(base_width, int) or base_width < 2 or base_width % 2:
        raise ConfigError(f"base_width must be an even integer >= 2 (64 = standard), got {base_width!r}")


def init_backbone_weights(backbone: nn.Module, zero_init_residual: bool = True) -> None:
    """mmseg's random init of ``ResNet``: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, and with
    ``zero_init_residual`` the last BN of every residual block starts at 0 (weight and bias)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in backbone.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_norm.weight)
                nn.init.zeros_(module.last_norm.bias)
