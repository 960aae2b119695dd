"""Intra-class feature variation distillation (IFVD): Wang, Zhou, Jiang, Bai, Xu, "Intra-class Feature Variation
Distillation for Semantic Segmentation", ECCV 2020, Sec. 3 (class prototypes, IFV maps, IFVD loss). Released code:
github.com/YukangWang/IFVD (``utils/criterion.py:CriterionIFV``, ``options.py``); the same criterion is in
TorchDistiller ``SemSeg-distill/utils/criterion.py`` and CIRKD ``losses/ifvd.py``. The paper's equation numbers were
not available to us; the formulas follow the released code.

For a feature map ``f`` of shape ``(C, h, w)`` of one image and its labels ``y`` nearest-downsampled to ``(h, w)``:

* class prototype (feature centre) of class ``k`` present in the image::

      p_k = Σ_{i: y_i = k} f_i / (|{i: y_i = k}| + 1e-6)

* IFV map: cosine similarity of every pixel's feature to its own class prototype, ``M_i = cos(f_i, p_{y_i})``;
* loss: mean squared difference between the student's and the teacher's IFV maps over all ``B·h·w`` pixels::

      L_ifv = (1 / (B·h·w)) Σ_b Σ_i (M^s_bi − M^t_bi)²

  Pixels without a valid label (255, or outside ``[0, K)``) keep their own feature as "prototype" in the release,
  so both maps are exactly 1 there: they add 0 to the sum but count in the ``B·h·w`` denominator. We reproduce
  that normalisation (the sum over labelled pixels divided by all pixels), because the released λ was tuned with it.

Prototypes are per image (the release sums over the spatial axes only). Student gradients flow through both the
pixel features and the student's prototypes, as in the release.

Defaults (``conf/method/ifvd.yaml``): λ = 200 on the decoder output (YukangWang/IFVD ``options.py --lambda-ifv``,
``preds[2]`` = PSP bottleneck output). The authors' full recipe adds logit KD (λ = 10 on an element-wise mean, i.e.
kdrepro's ``kd`` × 10 / K) and the adversarial term (``adv``, λ = 0.001). The published rows used for comparison
(CIRKD ``train_scripts/train_kd/train_ifvd.sh``) use λ = 20 + KD λ = 1 + CIRKD's hinge adversarial term:
``conf/method/ifvd_published.yaml``.

Deliberate deviations from the released code:

* Vectorised: prototypes are built with ``scatter_add`` over ``K + 1`` slots (the extra slot collects unlabelled
  pixels) instead of a Python loop over classes; the result is the same.
* The releases read the decoder output after its ``Dropout2d(0.1)`` (train mode); kdrepro's ``decoder`` feature is
  the same map before the dropout (``SegOutput`` contract).
* If student and teacher feature maps differ in size (not at output stride 8), the student's IFV map is bilinearly
  resized to the teacher's; the release assumes equal sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrepro.distill.base import Channels, Distiller, register, require_feature, require_same_classes
from kdrepro.models.output import SegOutput, resize_labels, resize_logits

PROTOTYPE_EPS = 1e-6  # added to the pixel count of a class, as in the release
COSINE_EPS = 1e-8  # torch.nn.CosineSimilarity's default, used by the release


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-image class prototypes.

    Args:
        features: ``(B, C, h, w)``.
        labels: ``(B, h, w)`` int64 labels already at the feature resolution; values outside ``[0, K)`` are ignored.
        num_classes: ``K``.

    Returns:
        ``prototypes`` of shape ``(B, K + 1, C)`` (slot ``K`` collects unlabelled pixels and is never used) and the
        ``(B, h·w)`` slot index of every pixel.
    """
    batch, channels = features.shape[:2]
    valid = (labels >= 0) & (labels < num_classes)
    slot = torch.where(valid, labels, torch.full_like(labels, num_classes)).flatten(1)
    pixels = features.flatten(2).transpose(1, 2)
    zeros = pixels.new_zeros(batch, num_classes + 1, channels)
    sums = zeros.scatter_add(1, slot[..., None].expand(-1, -1, channels), pixels)
    counts = pixels.new_zeros(batch, num_classes + 1).scatter_add(1, slot, torch.ones_like(slot, dtype=pixels.dtype))
    return sums / (counts[..., None] + PROTOTYPE_EPS), slot


def ifv_map(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """IFV map ``cos(f_i, p_{y_i})`` of shape ``(B, h, w)``; 1 at unlabelled pixels (the release's behaviour).

    ``labels`` are ``(B, H, W)`` at any resolution; they are nearest-resized to the feature size.
    """
    batch, channels, height, width = features.shape
    labels = resize_labels(labels, (height, width))
    prototypes, slot = class_prototypes(features, labels, num_classes)
    pixels = features.flatten(2).transpose(1, 2)
    own_prototype = prototypes.gather(1, slot[..., None].expand(-1, -1, channels))
    labelled = (slot < num_classes)[..., None]
    own_prototype = torch.where(labelled, own_prototype, pixels)
    return F.cosine_similarity(pixels, own_prototype, dim=2, eps=COSINE_EPS).view(batch, height, width)


def ifvd_loss(student_features: Tensor, teacher_features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``mean_{b,i} (M^s − M^t)²`` over all pixels (unlabelled ones contribute 0), unweighted."""
    student_map = ifv_map(student_features.float(), labels, num_classes)
    teacher_map = ifv_map(teacher_features.float(), labels, num_classes)
    student_map = resize_logits(student_map[:, None], tuple(teacher_map.shape[-2:]))[:, 0]
    return (student_map - teacher_map).pow(2).mean()


@register("ifvd")
class IntraClassFeatureVariation(Distiller):
    """IFVD on one feature map; returns ``{"ifvd": weight · L_ifv}``.

    Args:
        weight: λ (IFVD release: 200; CIRKD's published script: 20).
        feature: ``SegOutput.features`` entry (``decoder``, the release's PSP output).
    """

    def __init__(self, student_channels: Channels, teacher_channels: Channels, weight: float = 200.0, feature: str = "decoder"):
        super().__init__()
        require_feature("ifvd", feature, student_channels, teacher_channels)
        self.num_classes = require_same_classes("ifvd", student_channels, teacher_channels)
        self.weight = float(weight)
        self.feature = feature

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        loss = ifvd_loss(student.features[self.feature], teacher.features[self.feature], target, self.num_classes)
        return {"ifvd": self.weight * loss}
