"""Canonical logit distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015), per pixel.

For every pixel ``i`` with student scores ``s_i`` and teacher scores ``t_i`` (``K`` classes):

    L_kd = T² · (1 / |P|) · Σ_{i∈P} KL( softmax(t_i / T) ‖ softmax(s_i / T) )                      (Hinton, Sec. 2)

with ``P`` all pixels of the batch (``B·h·w``), or only the labelled ones when ``ignore_index`` is set. This is
CIRKD's ``CriterionKD`` normalisation (mean over pixels, ×T², λ=1; ``train_kd.py --lambda-kd 1.0``); TorchDistiller
and SKD instead average over all ``N·C·H·W`` elements and use λ=10, i.e. the same loss divided by ``K`` and ×10.
The loss is computed at the logits' own resolution (output stride 8); labels are nearest-downsampled to it when
ignored pixels are excluded.
"""

from __future__ import annotations

from torch import Tensor

from kdrepro.distill.base import (
    Channels,
    Distiller,
    register,
    require_positive,
    require_same_classes,
    softmax_kl_terms,
    zero_loss,
)
from kdrepro.models.output import SegOutput, resize_labels


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, valid: Tensor | None = None) -> Tensor:
    """Pixel-wise KL(softmax(t/T) ‖ softmax(s/T)) averaged over (valid) pixels, times T².

    Args:
        student_logits: ``(B, K, h, w)``.
        teacher_logits: ``(B, K, h, w)``.
        temperature: softmax temperature ``T``.
        valid: optional ``(B, h, w)`` bool mask of the pixels that count.
    """
    per_pixel = softmax_kl_terms(student_logits, teacher_logits, dim=1, temperature=temperature).sum(dim=1)
    if valid is not None:
        per_pixel = per_pixel[valid]
        if per_pixel.numel() == 0:
            return zero_loss(student_logits)
    return per_pixel.mean() * temperature**2


@register("kd")
class LogitKD(Distiller):
    """Hinton KD on the segmentation logits. Defaults: T=1, λ=1 (CIRKD ``train_kd.py``); the paper sweeps T ∈ {1, 4}."""

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        temperature: float = 1.0,
        ignore_index: int | None = None,
    ):
        super().__init__()
        require_same_classes("kd", student_channels, teacher_channels)
        require_positive("kd", temperature=temperature)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.ignore_index = ignore_index

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        valid = None
        if self.ignore_index is not None:
            valid = resize_labels(target, tuple(student.logits.shape[-2:])) != self.ignore_index
        loss = kd_loss(student.logits, teacher.logits, self.temperature, valid)
        return {"kd": self.weight * loss}
