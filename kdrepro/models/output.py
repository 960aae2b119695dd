"""The one thing every KD method reads: a segmentor's output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SegOutput:
    """Output of :class:`kdrepro.models.Segmentor`.

    Attributes:
        logits: ``(B, K, h, w)`` class scores at the decoder's resolution (output stride 8, i.e. ``h = ceil(H / 8)``),
            *not* upsampled to the input size; losses upsample them to the label size (mmsegmentation protocol).
        aux_logits: ``(B, K, h, w)`` scores of the FCN auxiliary head on ``c3``, or ``None`` in eval mode / without
            an auxiliary head.
        features: named intermediate maps, at least ``"c3"`` (backbone stage 3), ``"c4"`` (backbone stage 4) and
            ``"decoder"`` (PSP/ASPP output before the classifier dropout and 1x1 classifier).
    """

    logits: Tensor
    aux_logits: Tensor | None = None
    features: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> SegOutput:
        return SegOutput(
            logits=self.logits.detach(),
            aux_logits=None if self.aux_logits is None else self.aux_logits.detach(),
            features={name: value.detach() for name, value in self.features.items()},
        )

    def float(self) -> SegOutput:
        """A copy in fp32 (teachers may run under bf16 autocast)."""
        return SegOutput(
            logits=self.logits.float(),
            aux_logits=None if self.aux_logits is None else self.aux_logits.float(),
            features={name: value.float() for name, value in self.features.items()},
        )


def resize_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of score maps to ``size`` (``align_corners=False``, as mmsegmentation's ``resize``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of integer label maps ``(B, H, W)`` to ``size``; keeps the ignore index intact."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].to(torch.long)
