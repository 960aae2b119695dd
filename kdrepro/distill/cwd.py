"""Channel-wise distillation (CWD: Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021).

Each channel ``c`` of a map ``y`` (logits or features, ``(N, C, H, W)``) becomes a distribution over its ``H·W``
spatial locations (CWD Eq. 2), and the student mimics the teacher's distribution with a KL divergence summed over
locations, averaged over channels and images, and scaled by ``τ²`` (CWD Eq. 3–4):

    φ(y_c)_i  = exp(y_{c,i} / τ) / Σ_j exp(y_{c,j} / τ)                                        (CWD, Eq. 2)
    L_cwd     = τ² / (N·C) · Σ_n Σ_c Σ_i φ(y^T_{n,c})_i · log[ φ(y^T_{n,c})_i / φ(y^S_{n,c})_i ]   (CWD, Eq. 3–4)

This is the normalisation of the authors' code (TorchDistiller ``SemSeg-distill/utils/criterion.py``
``CriterionCWD(norm_type='channel', divergence='kl')``: ``KLDivLoss(reduction='sum') / (n·c) · τ²``) and of mmrazor's
``ChannelWiseDivergence`` (``sum(...) · τ² / (C·N)``).

Defaults, and where they come from:

* ``cwd.yaml`` -- logits only, τ=4, λ=3: the authors' script (TorchDistiller ``SemSeg-distill/README.md``:
  ``bash exp_cwd.sh channel kl 3 4 False False False``, i.e. norm=channel, divergence=kl, λ=3, τ=4, no KD, no adv,
  no feature term).
* ``cwd_mmrazor.yaml`` -- logits, τ=1, λ=5: mmrazor ``configs/distill/mmseg/cwd/
  cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py`` (``tau=1, loss_weight=5`` on
  ``decode_head.conv_seg``), the PSPNet-R101 → R18 pair this package uses (published 75.54 mIoU).
* ``cwd_published.yaml`` -- the combination of CIRKD's published CWD row (``train_scripts/train_kd/train_cwd.sh``):
  logit KD λ=1, adversarial λ=0.001, CWD on logits λ=3 and on the decoder feature λ=50, both at τ=4
  (``train_kd.py``: ``CriterionCWD(s_channels, t_channels, norm_type='channel', divergence='kl', temperature=4.)``,
  applied to ``s_outputs[-1]`` -- the PSP/ASPP head feature before the classifier -- and to the logits).

Feature term: when student and teacher channels differ, a 1×1 convolution (no bias) maps the student's feature to the
teacher's channels before the softmax, as CIRKD ``losses/cwd.py`` (mmrazor uses a biased 1×1 conv; TorchDistiller's
feature variant uses 1×1 conv + BN + ReLU: ``projector_norm=True``). The projector trains with the student.

Deliberate deviations from the released code, with reasons:

* ``log_softmax`` for the student instead of ``softmax(...).log()`` (TorchDistiller/CIRKD): same value, but no
  ``-inf`` when a spatial probability underflows at τ=1 on large maps.
* CIRKD divides the *feature* term by ``N·C_student`` because it reads ``n, c`` from the student map *before* the
  projector (``losses/cwd.py``), although the KL is summed over the projected ``C_teacher`` channels; the paper and
  TorchDistiller divide by the channels that are compared. We divide by ``N·C_teacher`` by default
  (``feature_normalization: teacher_channels``); ``feature_normalization: student_channels`` reproduces CIRKD's
  scale and is what ``cwd_published.yaml`` uses.
* Our ``decoder`` feature is read before the head's dropout; CIRKD's ``features`` are after ``Dropout(0.1)`` (which
  only matters for the student, in train mode).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from kdrepro.distill.base import (
    Channels,
    Distiller,
    register,
    require_feature,
    require_positive,
    require_same_classes,
    softmax_kl_terms,
)
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits

FeatureNormalization = Literal["teacher_channels", "student_channels"]


def cwd_loss(
    student_maps: Tensor, teacher_maps: Tensor, temperature: float = 4.0, channels: int | None = None
) -> Tensor:
    """Channel-wise KL between spatial softmaxes, ``τ² / (N·C) · Σ KL`` (CWD Eq. 3–4).

    Args:
        student_maps: ``(N, C, H, W)`` student logits or (projected) features.
        teacher_maps: ``(N, C, H, W)`` teacher maps (no gradient needed).
        temperature: softmax temperature ``τ``.
        channels: the ``C`` in the denominator; default ``student_maps.shape[1]`` (the compared channels). CIRKD's
            feature term divides by the student's channels before projection: pass them here to reproduce it.
    """
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(
            f"cwd_loss needs equal shapes, got {tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}"
        )
    batch, num_channels = student_maps.shape[:2]
    kl_sum = softmax_kl_terms(student_maps.flatten(2), teacher_maps.flatten(2), dim=-1, temperature=temperature).sum()
    return kl_sum * temperature**2 / (batch * (channels or num_channels))


def _projector(in_channels: int, out_channels: int, with_norm: bool) -> nn.Module:
    """1×1 conv student → teacher channels (CIRKD); with BN + ReLU as TorchDistiller's feature variant."""
    if not with_norm:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


@register("cwd")
class ChannelWiseDistillation(Distiller):
    """CWD on the logits (``weight``) and optionally on a feature map (``feature_weight``), see the module docstring.

    Returns ``{"cwd": λ·L_logits}`` and, with ``feature_weight > 0``, ``{"cwd_feature": λ_f·L_feature}``.
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 3.0,
        temperature: float = 4.0,
        feature_weight: float = 0.0,
        feature: str = "decoder",
        feature_temperature: float | None = None,
        feature_normalization: FeatureNormalization = "teacher_channels",
        projector_norm: bool = False,
    ):
        super().__init__()
        require_positive("cwd", temperature=temperature, feature_temperature=feature_temperature)
        if weight <= 0 and feature_weight <= 0:
            raise ConfigError("cwd needs weight > 0 (logits) or feature_weight > 0 (features); both are 0")
        if feature_normalization not in ("teacher_channels", "student_channels"):
            raise ConfigError(
                f"cwd feature_normalization must be teacher_channels or student_channels, got {feature_normalization!r}"
            )
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.feature_weight = float(feature_weight)
        self.feature = feature
        self.feature_temperature = float(feature_temperature or temperature)
        self.feature_normalization = feature_normalization
        self.projector: nn.Module | None = None
        if self.weight > 0:
            require_same_classes("cwd on logits", student_channels, teacher_channels, "set weight: 0 to distil features only")
        if self.feature_weight > 0:
            self._build_projector(student_channels, teacher_channels, projector_norm)

    def _build_projector(self, student_channels: Channels, teacher_channels: Channels, with_norm: bool) -> None:
        require_feature("cwd", self.feature, student_channels, teacher_channels)
        self.student_feature_channels = student_channels[self.feature]
        if student_channels[self.feature] != teacher_channels[self.feature]:
            self.projector = _projector(student_channels[self.feature], teacher_channels[self.feature], with_norm)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.weight > 0:
            teacher_logits = resize_logits(teacher.logits, tuple(student.logits.shape[-2:]))
            losses["cwd"] = self.weight * cwd_loss(student.logits, teacher_logits, self.temperature)
        if self.feature_weight > 0:
            losses["cwd_feature"] = self.feature_weight * self._feature_loss(student, teacher)
        return losses

    def _feature_loss(self, student: SegOutput, teacher: SegOutput) -> Tensor:
        student_feature = student.features[self.feature]
        if self.projector is not None:
            student_feature = self.projector(student_feature)
        teacher_feature = teacher.features[self.feature]
        student_feature = resize_logits(student_feature, tuple(teacher_feature.shape[-2:]))
        channels = self.student_feature_channels if self.feature_normalization == "student_channels" else None
        return cwd_loss(student_feature, teacher_feature, self.feature_temperature, channels)


__all__ = ["ChannelWiseDistillation", "cwd_loss"]
