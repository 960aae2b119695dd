"""Segmentation models: dilated ResNetV1c backbones, PSP/ASPP/FCN heads, the ``Segmentor`` and weight loading."""

from kdrepro.models.output import SegOutput, resize_labels, resize_logits
from kdrepro.models.segmentor import Segmentor, build_segmentor, count_flops, count_parameters

__all__ = [
    "SegOutput",
    "Segmentor",
    "build_segmentor",
    "count_flops",
    "count_parameters",
    "resize_labels",
    "resize_logits",
]
