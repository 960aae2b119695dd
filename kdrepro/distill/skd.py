"""Structured knowledge distillation (SKD); its holistic term is :mod:`kdrepro.distill.adv`.

Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019 (extended
as "Structured Knowledge Distillation for Dense Prediction", TPAMI 2020), Sec. 3.1. Released code:
github.com/irfanICMLL/structure_knowledge_distillation (``utils/criterion.py``, ``utils/utils.py:sim_dis_compute``,
``networks/kd_model.py``, ``networks/sagan_models.py``, ``utils/train_options.py``). The paper's equation numbers
were not available to us; the formulas below follow the section names and the released code.

* Pixel-wise distillation (``CriterionPixelWise``): per-pixel KL between the class distributions of the logits at
  output stride 8, summed over the pixels of every image and divided by ``h·w`` only -- i.e. the per-image pixel mean
  summed over the batch, *not* divided by the batch size::

      ℓ_pi = (1 / (h·w)) Σ_b Σ_i KL( softmax(t_bi) ‖ softmax(s_bi) )

* Pair-wise distillation (``CriterionPairWiseforWholeFeatAfterPool`` with ``--pool-scale 0.5``): the decoder output
  (PSP bottleneck, ``feat_ind=-5``) is max-pooled with a patch of ``int(0.5·h) × int(0.5·w)`` (stride = patch,
  ``ceil_mode``), so the graph has ~2×2 nodes; ``a_ij = f_iᵀ f_j / (‖f_i‖ ‖f_j‖)`` over the nodes and::

      ℓ_pa = (1 / (B·N²)) Σ_b Σ_{i,j} (a^s_bij − a^t_bij)²

* Holistic distillation: a SAGAN-style critic ``D`` (spectral-normalised 4×4 stride-2 convolutions with LeakyReLU 0.1,
  self-attention after the 3rd and 4th, BatchNorm on the input scores) scores segmentation maps; the student adds
  ``ℓ_ho = −E[D(s)]`` and ``D`` is trained by its own optimizer, once per iteration after the student's step, on the
  Wasserstein critic loss with gradient penalty (WGAN-GP)::

      ℓ_D = λ_d · ( E[D(s)] − E[D(t)] + λ_gp · E[(‖∇D(α t + (1−α) s)‖₂ − 1)²] )

Defaults of ``skd`` (``utils/train_options.py``): λ_pi = 10, λ_pa = 1 (``run_train_val.sh`` passes 0.5), λ_ho = λ_d =
0.1 (the release weights the student's adversarial term with ``--lambda-d``), λ_gp = 10, pool scale 0.5, D optimizer
SGD lr 4e-4 momentum 0.9 weight decay 5e-4 (the script's ``--weight-decay``), poly(0.9) decay of D's lr.

Deliberate deviations from the released code:

* ``D`` scores the raw logits (after its input BatchNorm), as every release does; the paper's conditional
  discriminator also sees the RGB image, which no release feeds it and ``SegOutput`` does not carry.
* ``D``'s four stride-2 convolutions and final 4×4 convolution need inputs of at least 64 px per side (the release ran
  on 65×65 maps). Smaller score maps (crops under 512 px, e.g. the embedded profile) are bilinearly upsampled to 64 px
  on the short side inside ``D``; larger maps are untouched.
* The releases read the decoder output after its ``Dropout2d(0.1)`` (train mode); kdrepro's ``decoder`` feature is
  the same map before the dropout (``SegOutput`` contract).
* The pixel-wise term is written as KL instead of the released cross-entropy ``Σ −p_t log p_s``: they differ by the
  teacher's entropy, a constant, so gradients are identical and the loss is 0 when student = teacher.
* The poly decay of ``D``'s lr needs the training progress; the loop passes it to ``extra_step(..., progress=...)``.
  Called without it, ``D`` trains at its base lr.
* ``D``'s parameters are excluded from the student's backward (``requires_grad`` off during the student's forward);
  the releases compute those gradients and then discard them with ``zero_grad``. Same maths, less work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdrepro.distill.adv import HolisticDistiller
from kdrepro.distill.base import Channels, Distiller, register, require_feature, require_same_classes, softmax_kl_terms
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits


# ----------------------------------------------------------------------------------------------- pixel / pair-wise
def pixelwise_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """SKD pixel-wise term: ``Σ_b Σ_i KL(softmax(t) ‖ softmax(s)) / (h·w)`` (per-image pixel mean, summed over B)."""
    student_logits = resize_logits(student_logits, tuple(teacher_logits.shape[-2:]))
    per_pixel = softmax_kl_terms(student_logits.float(), teacher_logits.float(), dim=1).sum(dim=1)
    height, width = per_pixel.shape[-2:]
    return per_pixel.sum() / (height * width)


def pool_nodes(features: Tensor, kernel: tuple[int, int]) -> Tensor:
    """Max-pool ``(B, C, h, w)`` features with non-overlapping ``kernel`` patches (``ceil_mode``): the graph nodes."""
    return F.max_pool2d(features, kernel_size=kernel, stride=kernel, padding=0, ceil_mode=True)


def patch_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """SKD's patch ``int(scale·h) × int(scale·w)`` (at least 1)."""
    return max(1, int(size[0] * scale)), max(1, int(size[1] * scale))


def pairwise_similarity(features: Tensor, detach_norm: bool = True) -> Tensor:
    """Cosine similarity between all spatial nodes: ``(B, C, h, w) -> (B, h·w, h·w)``.

    ``detach_norm=True`` is SKD's ``sim_dis_compute`` (divide by ``‖f‖ + 1e-8`` with the norm detached);
    ``False`` is CIRKD's ``F.normalize`` (the norm is differentiated).
    """
    features = features.float()
    if detach_norm:
        normalised = features / (features.norm(dim=1, keepdim=True).detach() + 1e-8)
    else:
        normalised = F.normalize(features, p=2.0, dim=1)
    nodes = normalised.flatten(2)
    return nodes.transpose(1, 2) @ nodes


def pairwise_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    pool_scale: float = 0.5,
    pool_kernel: int | None = None,
    detach_norm: bool = True,
) -> Tensor:
    """SKD pair-wise term: mean over the batch and all node pairs of ``(a^s_ij − a^t_ij)²``.

    Args:
        student_features: ``(B, C_s, h, w)``; resized bilinearly to the teacher's size if they differ.
        teacher_features: ``(B, C_t, h, w)``.
        pool_scale: patch = ``int(scale·size)`` of the teacher map (SKD: 0.5); ignored if ``pool_kernel`` is set.
        pool_kernel: fixed square patch (CIRKD: 2).
        detach_norm: see :func:`pairwise_similarity`.
    """
    size = tuple(teacher_features.shape[-2:])
    student_features = resize_logits(student_features, size)
    kernel = (pool_kernel, pool_kernel) if pool_kernel else patch_size(size, pool_scale)
    student_graph = pairwise_similarity(pool_nodes(student_features, kernel), detach_norm)
    teacher_graph = pairwise_similarity(pool_nodes(teacher_features, kernel), detach_norm)
    return (student_graph - teacher_graph).pow(2).mean()


#: SKD's own release (``utils/train_options.py``, ``networks/kd_model.py``): SGD critic, weight decay of the script.
SKD_HOLISTIC_DEFAULTS: dict[str, Any] = {
    "d_weight": 0.1,
    "loss_type": "wgan-gp",
    "gp_weight": 10.0,
    "d_optimizer": "sgd",
    "d_lr": 4e-4,
    "d_momentum": 0.9,
    "d_weight_decay": 5e-4,
    "d_lr_schedule": "poly",
}


@register("skd")
class StructuredKD(Distiller):
    """SKD: ``{"pixelwise", "pairwise", "holistic"}`` terms, each already weighted (zero-weight terms are skipped).

    Args:
        weight: overall multiplier of the three terms.
        pixelwise_weight, pairwise_weight, holistic_weight: λ_pi, λ_pa, λ_ho (10, 1, 0.1).
        feature: ``SegOutput.features`` entry of the pair-wise term (``decoder``, SKD's ``x_feat_after_psp``).
        pool_scale, pool_kernel, detach_norm: see :func:`pairwise_loss`.
        holistic: options of the critic (keys of :class:`HolisticDistiller` except ``weight``), over SKD's defaults.
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        pixelwise_weight: float = 10.0,
        pairwise_weight: float = 1.0,
        holistic_weight: float = 0.1,
        feature: str = "decoder",
        pool_scale: float = 0.5,
        pool_kernel: int | None = None,
        detach_norm: bool = True,
        holistic: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        require_feature("skd", feature, student_channels, teacher_channels)
        require_same_classes("skd", student_channels, teacher_channels)
        if not 0 < pool_scale <= 1:
            raise ConfigError(f"skd: pool_scale must be in (0, 1], got {pool_scale}")
        self.weight = float(weight)
        self.pixelwise_weight = float(pixelwise_weight)
        self.pairwise_weight = float(pairwise_weight)
        self.feature = feature
        self.pool_scale = float(pool_scale)
        self.pool_kernel = None if pool_kernel is None else int(pool_kernel)
        self.detach_norm = bool(detach_norm)
        self.holistic: HolisticDistiller | None = None
        if holistic and "weight" in holistic:
            raise ConfigError("skd: set the student's adversarial weight with holistic_weight, not holistic.weight")
        if holistic_weight:
            options = {**SKD_HOLISTIC_DEFAULTS, **dict(holistic or {})}
            self.holistic = HolisticDistiller(
                student_channels, teacher_channels, weight=self.weight * float(holistic_weight), **options
            )

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.pixelwise_weight:
            scale = self.weight * self.pixelwise_weight
            losses["pixelwise"] = scale * pixelwise_loss(student.logits, teacher.logits)
        if self.pairwise_weight:
            pairwise = pairwise_loss(
                student.features[self.feature],
                teacher.features[self.feature],
                self.pool_scale,
                self.pool_kernel,
                self.detach_norm,
            )
            losses["pairwise"] = self.weight * self.pairwise_weight * pairwise
        if self.holistic is not None:
            losses["holistic"] = self.holistic(student, teacher, target)["adv"]
        return losses

    def separately_optimized_parameters(self) -> list[nn.Parameter]:
        return [] if self.holistic is None else self.holistic.separately_optimized_parameters()

    def extra_step(self, student: SegOutput, teacher: SegOutput, progress: float | None = None) -> dict[str, float]:
        return {} if self.holistic is None else self.holistic.extra_step(student, teacher, progress)

    def extra_state(self) -> dict[str, Any]:
        return {} if self.holistic is None else self.holistic.extra_state()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.holistic is not None:
            self.holistic.load_extra_state(state)
