"""Feature distillation (FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), on the decoder.

A 1×1 convolution ``r`` (the paper's regressor, Eq. 3, here the linear case) maps the student's decoder feature to the
teacher's channels, and the loss is the mean squared error

    L_fitnet = (1 / (B·C·h·w)) · ‖ r(F_s) − F_t ‖²                                                   (FitNets, Eq. 3)

on the ``decoder`` feature (PSP/ASPP bottleneck output). Segmentation KD codebases put this hint on the last decoder
feature; the weight λ=10 follows the TorchDistiller/CIRKD-style scripts that use it with logit KD. The regressor is part
of the method: it trains with the student and its cost is inside the method's measured cost.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdrepro.distill.base import Channels, Distiller, register, require_feature
from kdrepro.models.output import SegOutput, resize_logits


def fitnet_loss(projected_student: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean squared error between the regressed student feature and the teacher feature (same shape)."""
    projected_student = resize_logits(projected_student, tuple(teacher_feature.shape[-2:]))
    return F.mse_loss(projected_student, teacher_feature)


@register("fitnet")
class FitNet(Distiller):
    """FitNets hint loss on a named feature (default ``decoder``) with a 1×1 conv + BN regressor."""

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 10.0,
        feature: str = "decoder",
        batch_norm: bool = True,
    ):
        super().__init__()
        require_feature("fitnet", feature, student_channels, teacher_channels)
        self.weight = float(weight)
        self.feature = feature
        layers: list[nn.Module] = [nn.Conv2d(student_channels[feature], teacher_channels[feature], 1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(teacher_channels[feature]))
        self.regressor = nn.Sequential(*layers)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        projected = self.regressor(student.features[self.feature])
        return {"fitnet": self.weight * fitnet_loss(projected, teacher.features[self.feature])}
