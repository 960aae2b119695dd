"""``Segmentor``: dilated ResNetV1c backbone + PSP/ASPP decode head + FCN auxiliary head -> :class:`SegOutput`.

This is mmsegmentation's ``EncoderDecoder`` for ``pspnet_r{18,50,101}-d8`` and ``deeplabv3_r{18,50,101}-d8``
(decode head on c4, auxiliary FCN head on c3 with loss weight 0.4 applied by the training loop). Logits stay at the
decoder's resolution (output stride 8); losses and evaluation resize them (``resize_logits``).

Size of the paper's models, measured (``tests/models/test_models.py``; auxiliary head included in the parameters, not in
the FLOPs, which are counted in eval mode):

===========  ==========================  ============================  =====================================
model        parameters (19 / 150 cls)   FLOPs, 512x1024, 19 classes   BPKD README (mmcv, params / FLOPs)
===========  ==========================  ============================  =====================================
PSPNet-R18   12,790,086 / 12,815,500     216.9 G (108.5 GMAC)          12.82 M / 54.53 G
PSPNet-R101  67,967,622 / 68,068,492     1023.5 G (511.7 GMAC)         68.07 M / 256.89 G
===========  ==========================  ============================  =====================================

BPKD's (and mmsegmentation's ``get_flops``-style) numbers are those of the **ADE20K** models: 150 classes and a
512x512 input, reused unchanged in their Cityscapes table. With 150 classes our counts round to exactly 12.82 M and
68.07 M; with 19 classes they are 0.23 % and 0.15 % lower (the two 1x1 classifiers: ``(channels + 1) x 131``
parameters fewer). Their "GFLOPs" are mmcv multiply-adds at 512x512 with 150 classes: we count 54.30 / 256.18 GMAC
of convolutions there, and adding what mmcv also counts (2 per BN element, 1 per ReLU/pooling element) gives
54.40 / 256.93 G against their 54.53 / 256.89 G (within 0.25 %).

``count_flops`` reports ``torch.utils.flop_counter`` FLOPs: 2 per multiply-add, convolutions and matrix products
only, so they are about twice mmcv's numbers. Width-16 versions (the embedded profile), 19 classes: PSPNet-R18
802,350 and PSPNet-R101 4,271,742 parameters; 13.6 and 64.0 GFLOPs at 512x1024.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdrepro.errors import ConfigError
from kdrepro.models.heads import ASPPHead, DecodeHead, FCNHead, PSPHead, init_head_weights
from kdrepro.models.output import SegOutput
from kdrepro.models.resnet import ARCH_SETTINGS, STEM_KINDS, ResNetV1c

ARCHS: dict[str, type[PSPHead] | type[ASPPHead]] = {"pspnet": PSPHead, "deeplabv3": ASPPHead}
MODEL_KEYS: tuple[str, ...] = (
    "name",
    "arch",
    "depth",
    "base_width",
    "stem",
    "head_channels",
    "aux_channels",
    "dropout",
    "pretrained",
)


class Segmentor(nn.Module):
    """Backbone + decode head (+ auxiliary head); ``forward(x) -> SegOutput``.

    ``features`` holds ``"c1".."c4"`` (backbone stages; c3/c4 at output stride 8) and ``"decoder"`` (PSP/ASPP
    bottleneck output, before dropout and ``conv_seg``). ``aux_logits`` is computed in training mode, and in eval
    mode too when ``aux_in_eval`` is set (a frozen teacher whose auxiliary scores a KD method reads, e.g. DIST, MasKD).
    """

    def __init__(self, backbone: ResNetV1c, decode_head: DecodeHead, auxiliary_head: DecodeHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = decode_head.num_classes
        self.aux_in_eval = False

    @property
    def channels(self) -> dict[str, int]:
        """Feature name -> channels (``"c1".."c4"``, ``"decoder"``) and ``"logits"`` -> number of classes."""
        stages = {f"c{index + 1}": width for index, width in enumerate(self.backbone.out_channels)}
        return {**stages, "decoder": self.decode_head.channels, "logits": self.num_classes}

    def forward(self, x: Tensor) -> SegOutput:
        c1, c2, c3, c4 = self.backbone(x)
        decoder, logits = self.decode_head(c4)
        aux_logits = None
        if (self.training or self.aux_in_eval) and self.auxiliary_head is not None:
            aux_logits = self.auxiliary_head(c3)[1]
        features = {"c1": c1, "c2": c2, "c3": c3, "c4": c4, "decoder": decoder}
        return SegOutput(logits=logits, aux_logits=aux_logits, features=features)


def _plain_dict(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return dict(model_cfg)
    if isinstance(model_cfg, DictConfig):
        return OmegaConf.to_container(model_cfg, resolve=True)  # type: ignore[return-value]
    return dict(model_cfg)


def _scaled(channels: int, base_width: int, key: str) -> int:
    """``channels * base_width / 64`` (config widths are given for the standard width 64)."""
    scaled = channels * base_width // 64
    if scaled < 1:
        raise ConfigError(f"model.{key}={channels} at base_width={base_width} scales to 0 channels; raise either")
    return scaled


def build_segmentor(model_cfg: Mapping[str, Any], num_classes: int) -> Segmentor:
    """Build a segmentor from a ``kdrepro/conf/model/*.yaml`` config (dict or DictConfig).

    Keys: ``arch`` (pspnet | deeplabv3), ``depth`` (18 | 50 | 101), ``base_width`` (64 = paper), ``stem``
    (deep | basic; default deep), ``head_channels`` / ``aux_channels`` (widths at base width 64, scaled by
    ``base_width / 64``; ``aux_channels`` null or 0 = no auxiliary head), ``dropout``, ``pretrained`` (path to
    ImageNet backbone weights, loaded with :func:`kdrepro.models.weights.load_backbone_weights`; null = random init).
    """
    cfg = _plain_dict(model_cfg)
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown model config keys {unknown}; valid keys: {', '.join(MODEL_KEYS)}")
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ConfigError(f"unknown model arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    depth = cfg.get("depth")
    if depth not in ARCH_SETTINGS:
        raise ConfigError(f"unknown model depth {depth!r}; valid depths: {', '.join(map(str, ARCH_SETTINGS))}")
    stem = cfg.get("stem") or "deep"
    if stem not in STEM_KINDS:
        raise ConfigError(f"unknown model stem {stem!r}; valid stems: {', '.join(STEM_KINDS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    base_width = cfg.get("base_width", 64)
    dropout = float(cfg.get("dropout", 0.1))
    backbone = ResNetV1c(depth, base_width=base_width, stem=stem)
    head_channels = _scaled(int(cfg.get("head_channels", 512)), base_width, "head_channels")
    decode_head = ARCHS[arch](backbone.out_channels[3], head_channels, num_classes, dropout=dropout)
    init_head_weights(decode_head)
    auxiliary_head = None
    if cfg.get("aux_channels"):
        aux_channels = _scaled(int(cfg["aux_channels"]), base_width, "aux_channels")
        auxiliary_head = FCNHead(backbone.out_channels[2], aux_channels, num_classes, dropout=dropout)
        init_head_weights(auxiliary_head)
    if cfg.get("pretrained"):
        from pathlib import Path

        from kdrepro.models.weights import load_backbone_weights

        if not Path(str(cfg["pretrained"])).is_file():
            raise ConfigError(
                f"pretrained backbone {cfg['pretrained']} does not exist: run `kdrepro pretrain` with the same profile "
                "(`which=student` or `which=teacher`; the pipeline's pretrain stages), or set <model>.pretrained=null"
            )
        load_backbone_weights(backbone, cfg["pretrained"])
    return Segmentor(backbone, decode_head, auxiliary_head)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (all of them, buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, int, int, int] = (1, 3, 512, 1024)) -> int:
    """FLOPs of one inference forward (eval mode, no grad) counted by ``torch.utils.flop_counter.FlopCounterMode``.

    One multiply-add counts as 2 FLOPs; only convolutions and matrix products are counted. The model's
    training/eval mode is restored afterwards. A model on the ``meta`` device is counted without computing anything.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
