"""Decode heads: PSP (PSPNet), ASPP (DeepLabV3) and the FCN auxiliary head, as mmsegmentation's.

Each head returns ``(decoder_feature, logits)``: the feature after the last conv-BN-ReLU (what feature-KD methods read
as ``"decoder"``) and the class scores after ``Dropout2d`` and the 1x1 classifier ``conv_seg``. Structure, defaults and
module names follow ``mmseg/models/decode_heads/{psp_head,aspp_head,fcn_head,decode_head}.py`` and mmcv's
``ConvModule`` (children ``conv``, ``bn``, ``activate``; no conv bias when a norm follows), so mmsegmentation
checkpoint keys (``decode_head.psp_modules.0.1.conv.weight``, ``decode_head.bottleneck.bn.running_mean``,
``auxiliary_head.convs.0.conv.weight``, ...) are our keys. Settings come from mmseg's ``pspnet_r50-d8.py``,
``deeplabv3_r50-d8.py`` and the ``*_r18-d8`` configs: PSP bins (1, 2, 3, 6), ASPP dilations (1, 12, 24, 36),
``align_corners=False``, dropout 0.1; FCN aux head on c3 with one 3x3 conv and no input concatenation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PSP_POOL_SCALES: tuple[int, ...] = (1, 2, 3, 6)
ASPP_DILATIONS: tuple[int, ...] = (1, 12, 24, 36)


class ConvModule(nn.Module):
    """Conv (no bias) -> BN -> ReLU, with mmcv ``ConvModule``'s child names ``conv``, ``bn``, ``activate``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def upsample_to(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinear resize of ``x`` to ``reference``'s spatial size (``align_corners=False``, as the mmseg configs)."""
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """Shared classifier part of mmseg's ``BaseDecodeHead``: ``Dropout2d`` then a 1x1 ``conv_seg`` (with bias)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def decode(self, x: Tensor) -> Tensor:
        """The head's feature map before the classifier (``"decoder"`` feature)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.decode(x)
        return feature, self.conv_seg(self.dropout(feature))


class PSPHead(DecodeHead):
    """Pyramid pooling (Zhao et al., CVPR 2017, Sec. 3.2): for each bin size, adaptive average pool -> 1x1
    ConvModule -> bilinear upsample; concatenate with the input; 3x3 ConvModule ``bottleneck``."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
        pool_scales: tuple[int, ...] = PSP_POOL_SCALES,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def decode(self, x: Tensor) -> Tensor:
        pyramid = [x] + [upsample_to(branch(x), x) for branch in self.psp_modules]
        return self.bottleneck(torch.cat(pyramid, dim=1))


class ASPPHead(DecodeHead):
    """DeepLabV3 ASPP (Chen et al., 2017, Sec. 3.3): image-pooling branch + parallel 1x1 / dilated 3x3 ConvModules;
    concatenate; 3x3 ConvModule ``bottleneck``."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
        dilations: tuple[int, ...] = ASPP_DILATIONS,
    ) -> None:
        super().__init__(channels, num_classes, dropout)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1)
            if dilation == 1
            else ConvModule(in_channels, channels, 3, padding=dilation, dilation=dilation)
            for dilation in dilations
        )
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)

    def decode(self, x: Tensor) -> Tensor:
        branches = [upsample_to(self.image_pool(x), x)] + [branch(x) for branch in self.aspp_modules]
        return self.bottleneck(torch.cat(branches, dim=1))


class FCNHead(DecodeHead):
    """FCN auxiliary head on c3 as the mmseg PSPNet/DeepLabV3 configs use it: ``num_convs=1``, kernel 3,
    ``concat_input=False``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1, num_convs: int = 1):
        super().__init__(channels, num_classes, dropout)
        layers = [ConvModule(in_channels if i == 0 else channels, channels, 3, padding=1) for i in range(num_convs)]
        self.convs = nn.Sequential(*layers)

    def decode(self, x: Tensor) -> Tensor:
        return self.convs(x)


def init_head_weights(head: DecodeHead) -> None:
    """mmseg/mmcv init of a decode head: ConvModule convs Kaiming-normal (fan_out, ReLU), BN weight 1 / bias 0,
    classifier ``conv_seg`` normal(0, 0.01) with zero bias (``BaseDecodeHead.init_cfg``)."""
    for module in head.modules():
        if isinstance(module, nn.Conv2d) and module is not head.conv_seg:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(head.conv_seg.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.conv_seg.bias)
