"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022), per pixel for segmentation.

DIST replaces KL's exact match by a *relation* match measured with the Pearson correlation ``ρ_p``
(DIST Sec. 3, distance ``d_p(u, v) = 1 − ρ_p(u, v)``). With ``Y`` the ``(M, K)`` matrix of class probabilities
``softmax(z / τ)`` of ``M`` instances, the paper's losses are

    L_inter = 1/M · Σ_i d_p(Y^S_{i,:}, Y^T_{i,:})      inter-class relation: one row per instance   (DIST Sec. 3)
    L_intra = 1/K · Σ_j d_p(Y^S_{:,j}, Y^T_{:,j})      intra-class relation: one column per class   (DIST Sec. 3)
    L_DIST  = β·τ²·L_inter + γ·τ²·L_intra                                                           (DIST Sec. 3)

For semantic segmentation every pixel is an instance: the released segmentation code (github.com/hunto/DIST_KD
``segmentation/losses/dist_kd.py``) reshapes the ``(B, K, h, w)`` logits to ``(B·h·w, K)``, so the intra-class
correlation of class ``j`` runs over *all pixels of the mini-batch* (not per image). ``ρ_p`` is a cosine similarity of
mean-centred vectors with ``ε = 1e-8`` added to the product of norms, as in the released code.

Defaults and where they come from: β = γ = 1 and τ = 1 (no temperature at all in ``segmentation/losses/dist_kd.py``;
mmrazor's ``DISTLoss`` has ``tau=1.0, inter_loss_weight=1.0, intra_loss_weight=1.0`` and multiplies both terms by τ²),
λ = 1 (``segmentation/train_kd.py --lambda-kd 1.``, the PSPNet-R18 script ``train_scripts/train_kd/pspnet_res18.sh``
keeps the default).

Deviation from the release, on by default: the auxiliary FCN head is not distilled (``aux_weight = 0``). The paper's
loss (Sec. 3) is defined on the predictions only; the released ``train_kd.py`` adds
``kd_loss += 0.4 · λ · DIST(s_aux, t_aux)``, and ``aux_weight: 0.4`` restores it. Why it is off: ``ρ_p`` is invariant to
the scale of its inputs, so its gradient is ``∝ 1 / ‖x − x̄‖`` (:func:`pearson_correlation`), and a freshly initialised
head (mmsegmentation's ``normal(0, 0.01)`` classifier) gives near-uniform probabilities whose per-class columns barely
vary over the pixels. In the embedded miniature the release's term blew the auxiliary logits up within the first
ten iterations (auxiliary cross-entropy 1500 at step 10, 2900 at step 80) and left 4 of 5 seeds at 15-33 mIoU, in fp32
as in bf16; without it every seed trains (47.8-50.3 mIoU at 640 iterations, the student alone 46.8-49.3).

Deviation: kdrepro's teacher runs in eval mode, where its ``aux_logits`` may be ``None``; the auxiliary term is then
skipped (DIST_KD's CIRKD-derived models return auxiliary logits in eval mode too). The loss is computed at the
logits' own resolution (output stride 8), as in the released code; labels are not used.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdrepro.distill.base import Channels, Distiller, register, require_positive, require_same_classes
from kdrepro.models.output import SegOutput, resize_logits

PEARSON_EPS = 1e-8


def pearson_correlation(first: Tensor, second: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Row-wise Pearson correlation of two ``(M, D)`` matrices: cosine of the mean-centred rows (``M`` values)."""
    first = first - first.mean(dim=1, keepdim=True)
    second = second - second.mean(dim=1, keepdim=True)
    return (first * second).sum(dim=1) / (first.norm(dim=1) * second.norm(dim=1) + eps)


def inter_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 − mean_i ρ_p(Y^S_{i,:}, Y^T_{i,:})`` over the ``M`` rows (instances / pixels) of ``(M, K)`` matrices."""
    return 1.0 - pearson_correlation(student_probs, teacher_probs).mean()


def intra_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """``1 − mean_j ρ_p(Y^S_{:,j}, Y^T_{:,j})`` over the ``K`` columns (classes) of ``(M, K)`` matrices."""
    return inter_class_relation(student_probs.t(), teacher_probs.t())


def pixels_as_instances(logits: Tensor) -> Tensor:
    """``(B, K, h, w)`` → ``(B·h·w, K)``; 2-D inputs pass through."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """``β·τ²·L_inter + γ·τ²·L_intra`` on per-pixel class probabilities ``softmax(z / τ)`` (DIST Sec. 3).

    Args:
        student_logits: ``(B, K, h, w)`` or ``(M, K)``.
        teacher_logits: same shape.
        inter_weight: β.
        intra_weight: γ.
        temperature: τ.
    """
    student_probs = F.softmax(pixels_as_instances(student_logits) / temperature, dim=1)
    teacher_probs = F.softmax(pixels_as_instances(teacher_logits) / temperature, dim=1)
    inter = inter_class_relation(student_probs, teacher_probs)
    intra = intra_class_relation(student_probs, teacher_probs)
    return temperature**2 * (inter_weight * inter + intra_weight * intra)


@register("dist")
class DIST(Distiller):
    """DIST on the segmentation logits (and ``aux_weight``× on the auxiliary logits when set and the teacher provides them)."""

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
        temperature: float = 1.0,
        aux_weight: float = 0.0,
    ):
        super().__init__()
        require_same_classes("dist", student_channels, teacher_channels)
        require_positive("dist", temperature=temperature)
        self.weight = float(weight)
        self.inter_weight = float(inter_weight)
        self.intra_weight = float(intra_weight)
        self.temperature = float(temperature)
        self.aux_weight = float(aux_weight)
        self.needs_teacher_aux = self.aux_weight > 0

    def _loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        teacher_logits = resize_logits(teacher_logits, tuple(student_logits.shape[-2:]))
        return dist_loss(student_logits, teacher_logits, self.inter_weight, self.intra_weight, self.temperature)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        loss = self._loss(student.logits, teacher.logits)
        if self.aux_weight > 0 and student.aux_logits is not None and teacher.aux_logits is not None:
            loss = loss + self.aux_weight * self._loss(student.aux_logits, teacher.aux_logits)
        return {"dist": self.weight * loss}


__all__ = ["DIST", "dist_loss", "inter_class_relation", "intra_class_relation", "pearson_correlation"]
