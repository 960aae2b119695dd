"""Attention transfer (AT): Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017.

Activation-based attention (paper Sec. 3.1, the ``F^p_mean`` mapping with p = 2): a feature map ``A`` of shape
``(C, h, w)`` becomes the spatial map ``Q = (1/C) Σ_c A_c^p``, flattened to a vector of length ``h·w`` and
L2-normalised. The transfer loss (Sec. 3.1, the ``β/2 Σ_j ‖Q_S^j/‖Q_S^j‖ − Q_T^j/‖Q_T^j‖‖_p`` term) is, as released
(szagoruyko/attention-transfer ``cifar.py``: ``at_loss = (at(x) - at(y)).pow(2).mean()``, total
``β · Σ_groups at_loss`` with ``--beta 1e+3``)::

    L_at = β · Σ_{j ∈ layers} mean_{b, i} ( Q̂_S^j[b, i] − Q̂_T^j[b, i] )²,    Q̂ = Q / ‖Q‖₂

i.e. the squared L2 distance between normalised maps, divided by the number of map elements and the batch size
(the normalisation the paper describes for β = 10³).

Defaults (``conf/method/at.yaml``): β = 1000 (paper / authors' ``--beta 1e+3``), p = 2, applied to the backbone stages
``c3`` and ``c4`` -- the ends of the last two residual groups, the paper's placement for ResNets. The segmentation
release that reports AT (CIRKD ``train_scripts/train_kd/train_at.sh`` with ``losses/at.py``) instead applies the same
loss to the decoder output (``x_feat_after_aspp``) with λ = 10⁴ and adds logit KD λ = 1; that recipe is
``conf/method/at_published.yaml``.

Deliberate deviations from the released code:

* ``at_published``: CIRKD reads the decoder output after its ``Dropout(0.1)``; kdrepro's ``decoder`` feature is the
  map before the dropout (``SegOutput`` contract).
* When student and teacher maps differ in size (not the case at output stride 8), the student's un-normalised
  attention map is bilinearly resized to the teacher's size before normalisation. The released code assumes equal
  sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdrepro.distill.base import Channels, Distiller, register, require_feature, require_positive
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits


def spatial_attention(features: Tensor, p: float = 2.0) -> Tensor:
    """Un-normalised activation-based attention ``(1/C) Σ_c |A_c|^p`` of ``(B, C, h, w)`` features -> ``(B, h, w)``.

    For even ``p`` (the paper's p = 2) ``|A|^p = A^p``, as in the released ``x.pow(p).mean(1)``.
    """
    return features.abs().pow(p).mean(dim=1)


def attention_map(features: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """L2-normalised, flattened attention map ``Q̂`` of shape ``(B, h·w)`` (paper Sec. 3.1).

    Args:
        features: ``(B, C, h, w)`` activations.
        p: exponent of the ``F^p_mean`` mapping.
        size: if given and different from ``(h, w)``, the attention map is bilinearly resized to it first.
    """
    attention = spatial_attention(features, p)
    if size is not None:
        attention = resize_logits(attention[:, None], size)[:, 0]
    return F.normalize(attention.flatten(1), p=2.0, dim=1)


def at_loss(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss of one layer: ``mean_{b,i} (Q̂_S − Q̂_T)²`` (released ``at_loss``), unweighted.

    The student's map is resized to the teacher's spatial size if they differ; channel counts may differ freely.
    """
    teacher_size = tuple(teacher_features.shape[-2:])
    student_map = attention_map(student_features, p, size=teacher_size)
    teacher_map = attention_map(teacher_features, p)
    return (student_map - teacher_map).pow(2).mean()


@register("at")
class AttentionTransfer(Distiller):
    """AT on a list of feature maps; returns ``{"at": β · Σ_layers at_loss}``.

    Args:
        weight: β (paper: 10³; CIRKD's segmentation script: 10⁴ on the decoder output).
        features: names of ``SegOutput.features`` to transfer (default: ``c3`` and ``c4``).
        p: exponent of the attention mapping (paper: 2).
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1000.0,
        features: Sequence[str] = ("c3", "c4"),
        p: float = 2.0,
    ):
        super().__init__()
        names = [features] if isinstance(features, str) else [str(name) for name in features]
        if not names:
            raise ConfigError("at: `features` is empty; list feature names such as [c3, c4]")
        for name in names:
            require_feature("at", name, student_channels, teacher_channels)
        require_positive("at", p=p)
        self.weight = float(weight)
        self.features = names
        self.p = float(p)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        total = sum(at_loss(student.features[name], teacher.features[name], self.p) for name in self.features)
        return {"at": self.weight * total}
