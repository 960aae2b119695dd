"""CIRKD: cross-image relational KD (Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic
Segmentation", CVPR 2022, Sec. 3). Released code: github.com/winycg/CIRKD, ``train_cirkd.py`` (defaults, loss
weights), ``losses/cirkd_mini_batch.py`` (``CriterionMiniBatchCrossImagePair``) and ``losses/cirkd_memory.py``
(``StudentSegContrast``). The paper's full text was not in the stored corpus; the equations below are written from the
released code, and named after the paper's sections rather than numbered.

All three relational terms read the ``decoder`` feature (the released ``s_outputs[-1]`` / ``t_outputs[-1]``: the
PSP/ASPP bottleneck output). With ``f`` the L2-normalised feature of a pixel (over channels):

* **Mini-batch pixel-to-pixel** (``CriterionMiniBatchCrossImagePair``). For an ordered image pair ``(i, j)`` of a
  pairing group, ``A^{ij}_{uv} = f_{i,u}·f_{j,v}`` (``N × N`` over the ``N = h·w`` pixels). Rows are softmaxed at
  temperature ``τ`` and the teacher's rows distil into the student's:
  ``L_mb = 1/|pairs| Σ_{(i,j)} 1/N Σ_u KL( softmax(A_T^{ij}[u]/τ) ‖ softmax(A_S^{ij}[u]/τ) )``.
  No projection: the relation matrices are ``N × N`` whatever the channel counts (the release passes the raw student
  feature). Pixels with the ignore label are included, as released.
* **Memory pixel-to-pixel / pixel-to-region** (``StudentSegContrast``). Student embeddings go through a projection
  head ``conv1×1(C_s→D) – BN – ReLU – conv1×1(D→D)`` (``D`` = teacher decoder channels; the teacher's are used
  unprojected), both L2-normalised. Every labelled pixel ``u`` of the local batch is an anchor; its similarities to a
  contrast set ``Q`` sampled from the class queues (``n = size // K + 1`` entries of every class, at the same random
  queue positions) are distilled with
  ``L_mem = T² / |U| Σ_u KL( softmax(t_u·Q/(τ T)) ‖ softmax(s_u·Q/(τ T)) )`` (``T`` = ``contrast_kd_temperature``),
  once with the pixel queue (``L_p2p``) and once with the region queue (``L_p2r``). The current batch's teacher
  embeddings are enqueued *before* sampling, as released (see :mod:`kdrepro.distill.cirkd_memory`).
* **Total** (``train_cirkd.py``): ``L = L_task + λ_kd L_kd + λ_mb L_mb + λ_p2p L_p2p + λ_p2r L_p2r``. The logit KD
  term is NOT computed here: configs add the registered ``kd`` term (``kdrepro.distill.kd``), which is exactly
  CIRKD's ``CriterionKD`` (pixel-wise KL at the logits' resolution, mean over pixels, ×T², no ignore mask).

Defaults (``train_cirkd.py`` argparse; the published scripts ``train_scripts/train_cirkd/*`` pass none of them):
``--lambda-kd 1``, ``--kd-temperature 1``, ``--lambda-minibatch-pixel 1``, ``--lambda-memory-pixel 0.1``,
``--lambda-memory-region 0.1``, ``--contrast-temperature 0.1`` (τ, both the mini-batch and the memory terms),
``--contrast-kd-temperature 1``, ``--pixel-memory-size 20000``, ``--region-memory-size 2000``,
``--pixel-contrast-size 4096``, ``--region-contrast-size 1024`` (divided by K, +1, per class: 216 and 54 on
Cityscapes), 16 pixels per class per image enqueued. The published rows ran ``train_cirkd.py`` on 8 GPUs × 2 images
(batch 16); unlike ``train_kd.py`` it has no adversarial term and no discriminator step.

Deliberate deviations from the release (and why):

1. **Pairing groups instead of the local batch.** The release loops over all ``B²`` ordered pairs of the *local*
   batch (its gather is commented out), i.e. pairs of 2 images on 8 GPUs × 2. Here ``pair_group_size`` images form a
   group (default 2, matching the published runs whatever the number of processes; ``null`` = the whole local
   batch); the batch is reshaped into groups and the pairs are computed one at a time, as released. A last,
   smaller group takes the remainder. The loss averages over all pairs. Memory: two ``N²`` matrices per pair kept for
   backward (at 512×1024 crops, N = 8192: 0.27 GB each in fp32) plus one pair's temporaries.
2. **One process or DDP.** The release hard-codes ``SyncBatchNorm`` in the head and ``all_gather`` in the memory,
   and crashes on one GPU (CIRKD issues #18, #30). Here the head uses ``BatchNorm2d`` (convert it with
   ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP to match the release), and gathering happens only under an
   initialised process group with world size > 1. The mini-batch term and the anchors of the memory terms are local,
   as released; only the enqueue uses the gathered batch.
3. **Ignored anchors are masked, not removed**: the KL of every pixel is computed and weighted by the label mask,
   which avoids a host sync and gives the same value. All-ignored batches give an exact zero (still in the graph).
4. The ``decoder`` feature is taken before the head's dropout (the release takes it after the dropout layer).
5. The release samples "class-c" pixels for the pixel queue from the first ``n_c`` raster positions of the image
   (an indexing slip); here among the class's pixels, unless ``released_pixel_sampling: true``
   (``cirkd_published.yaml``). See :mod:`kdrepro.distill.cirkd_memory`.
"""

from __future__ import annotations

import torch.nn.functional as F
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
from kdrepro.distill.cirkd_memory import ClassEmbeddingQueues
from kdrepro.distributed import gather_from_all_ranks
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_labels, resize_logits


def _relation_kl_sum(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Summed row-wise KL over all ordered pairs of every group. Inputs ``(groups, G, C, N)``, L2-normalised over C.

    One ordered pair at a time, as released: autograd keeps two ``N × N`` matrices per pair and the temporaries of
    one pair are alive at a time. (All pairs in one batched matmul kept ~8 ``(G·N)²`` tensors alive: 9.4 GB for two
    512×1024 crops, four times that for 8 images on one GPU; the FLOPs are the same.)
    """
    groups, size = student.shape[:2]
    total = student.new_zeros(())
    for group in range(groups):
        for i in range(size):
            for j in range(size):
                relation_student = student[group, i].T @ student[group, j]  # (N, N) = A^{ij}
                relation_teacher = teacher[group, i].T @ teacher[group, j]
                total = total + softmax_kl_terms(relation_student, relation_teacher, dim=-1, temperature=temperature).sum()
    return total


def minibatch_pixel_pair_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    temperature: float = 0.1,
    pair_group_size: int | None = 2,
    pooling: bool = False,
) -> Tensor:
    """CIRKD mini-batch pixel-to-pixel relation loss ``L_mb`` (module docstring; ``CriterionMiniBatchCrossImagePair``).

    Args:
        student_features: ``(B, C_s, h, w)``; the student's decoder feature (no projection needed).
        teacher_features: ``(B, C_t, h, w)``; resized student maps are used if the sizes differ.
        temperature: ``τ`` of the relation softmax (released ``--contrast-temperature 0.1``).
        pair_group_size: images per pairing group (released runs: 2 per GPU); ``None`` = the whole batch.
        pooling: 2×2 average pooling first (released option ``pooling``, off by default).
    """
    student_features = resize_logits(student_features, tuple(teacher_features.shape[-2:]))
    if pooling:
        student_features = F.avg_pool2d(student_features, kernel_size=2, stride=2, ceil_mode=True)
        teacher_features = F.avg_pool2d(teacher_features, kernel_size=2, stride=2, ceil_mode=True)
    student = F.normalize(student_features.flatten(2), dim=1)  # (B, C, N)
    teacher = F.normalize(teacher_features.flatten(2), dim=1)
    batch, pixels = student.shape[0], student.shape[2]
    group = batch if pair_group_size is None else min(pair_group_size, batch)
    full = (batch // group) * group
    total = _relation_kl_sum(
        student[:full].reshape(-1, group, *student.shape[1:]),
        teacher[:full].reshape(-1, group, *teacher.shape[1:]),
        temperature,
    )
    pairs = (batch // group) * group**2
    if full < batch:  # remainder group
        rest = batch - full
        total = total + _relation_kl_sum(student[None, full:], teacher[None, full:], temperature)
        pairs += rest**2
    return total / (pixels * pairs)


def memory_contrast_loss(
    student_anchors: Tensor,
    teacher_anchors: Tensor,
    contrast: Tensor,
    temperature: float = 0.1,
    kd_temperature: float = 1.0,
    valid: Tensor | None = None,
) -> Tensor:
    """CIRKD memory-based relation loss ``L_p2p`` / ``L_p2r`` (module docstring; ``StudentSegContrast``).

    Args:
        student_anchors: ``(M, D)`` projected, L2-normalised student embeddings.
        teacher_anchors: ``(M, D)`` L2-normalised teacher embeddings.
        contrast: ``(Q, D)`` entries sampled from a teacher queue.
        temperature: ``τ`` of the similarities (released ``--contrast-temperature 0.1``).
        kd_temperature: ``T`` of the distillation softmax, loss ×T² (released ``--contrast-kd-temperature 1``).
        valid: optional ``(M,)`` bool mask; the mean runs over valid anchors only.
    """
    scale = temperature * kd_temperature
    per_anchor = softmax_kl_terms(student_anchors @ contrast.T, teacher_anchors @ contrast.T, dim=1, temperature=scale)
    per_anchor = per_anchor.sum(dim=1)
    if valid is None:
        return per_anchor.mean() * kd_temperature**2
    weights = valid.to(per_anchor.dtype)
    return (per_anchor * weights).sum() / weights.sum().clamp(min=1) * kd_temperature**2


def embedding_head(in_channels: int, dim: int) -> nn.Sequential:
    """The released student projection head: conv1×1 → BN → ReLU → conv1×1 (no biases)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, dim, 1, bias=False),
        nn.BatchNorm2d(dim),
        nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 1, bias=False),
    )


@register("cirkd")
class CIRKD(Distiller):
    """CIRKD's relational terms (mini-batch pixel pairs + memory pixel/region contrast); add ``kd`` for the logit term.

    ``weight`` multiplies all three terms; ``lambda_*`` are the released per-term weights. Returned keys:
    ``cirkd_minibatch_pixel``, ``cirkd_memory_pixel``, ``cirkd_memory_region`` (each already weighted).
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        lambda_minibatch_pixel: float = 1.0,
        lambda_memory_pixel: float = 0.1,
        lambda_memory_region: float = 0.1,
        contrast_temperature: float = 0.1,
        contrast_kd_temperature: float = 1.0,
        pixel_memory_size: int = 20000,
        region_memory_size: int = 2000,
        pixel_contrast_size: int = 4096,
        region_contrast_size: int = 1024,
        pixels_per_image: int = 16,
        pair_group_size: int | None = 2,
        minibatch_pooling: bool = False,
        released_pixel_sampling: bool = False,
        feature: str = "decoder",
        ignore_index: int = 255,
    ):
        super().__init__()
        _check_options(
            feature,
            student_channels,
            teacher_channels,
            contrast_temperature,
            contrast_kd_temperature,
            pixel_memory_size,
            region_memory_size,
            pixel_contrast_size,
            region_contrast_size,
            pixels_per_image,
            pair_group_size,
        )
        num_classes, dim = int(student_channels["logits"]), int(teacher_channels[feature])
        self.weight = float(weight)
        self.lambda_minibatch_pixel = float(lambda_minibatch_pixel)
        self.lambda_memory_pixel = float(lambda_memory_pixel)
        self.lambda_memory_region = float(lambda_memory_region)
        self.contrast_temperature = float(contrast_temperature)
        self.contrast_kd_temperature = float(contrast_kd_temperature)
        self.pixel_contrast_per_class = pixel_contrast_size // num_classes + 1  # as train_cirkd.py
        self.region_contrast_per_class = region_contrast_size // num_classes + 1
        self.pair_group_size = pair_group_size
        self.minibatch_pooling = bool(minibatch_pooling)
        self.feature = feature
        self.ignore_index = ignore_index
        self.embed_head = embedding_head(int(student_channels[feature]), dim)
        self.memory = ClassEmbeddingQueues(
            num_classes,
            dim,
            pixel_memory_size,
            region_memory_size,
            pixels_per_image,
            ignore_index,
            released_pixel_sampling,
        )

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        student_feature = student.features[self.feature]
        teacher_feature = teacher.features[self.feature].detach().float()
        losses: dict[str, Tensor] = {}
        if self.lambda_minibatch_pixel != 0:
            loss = minibatch_pixel_pair_loss(
                student_feature,
                teacher_feature,
                self.contrast_temperature,
                self.pair_group_size,
                self.minibatch_pooling,
            )
            losses["cirkd_minibatch_pixel"] = self.weight * self.lambda_minibatch_pixel * loss
        if self.lambda_memory_pixel != 0 or self.lambda_memory_region != 0:
            pixel_loss, region_loss = self._memory_losses(student_feature, teacher_feature, target)
            losses["cirkd_memory_pixel"] = self.weight * self.lambda_memory_pixel * pixel_loss
            losses["cirkd_memory_region"] = self.weight * self.lambda_memory_region * region_loss
        return losses

    def _memory_losses(self, student_feature: Tensor, teacher_feature: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Enqueue the (gathered) teacher batch, then distil anchor-to-queue relations of the local batch."""
        size = tuple(teacher_feature.shape[-2:])
        labels = resize_labels(target, size)
        teacher_embed = F.normalize(teacher_feature, dim=1)
        self.memory.enqueue(gather_from_all_ranks(teacher_embed), gather_from_all_ranks(labels))
        student_embed = self.embed_head(student_feature)
        student_embed = resize_logits(student_embed, size)
        student_anchors = F.normalize(student_embed, dim=1).permute(0, 2, 3, 1).reshape(-1, teacher_embed.shape[1])
        teacher_anchors = teacher_embed.permute(0, 2, 3, 1).reshape(-1, teacher_embed.shape[1])
        valid = ((labels != self.ignore_index) & (labels >= 0) & (labels < self.memory.num_classes)).flatten()
        pixel_contrast = self.memory.sample(self.memory.pixel_queue, self.pixel_contrast_per_class)
        region_contrast = self.memory.sample(self.memory.region_queue, self.region_contrast_per_class)
        temperatures = (self.contrast_temperature, self.contrast_kd_temperature)
        pixel_loss = memory_contrast_loss(student_anchors, teacher_anchors, pixel_contrast, *temperatures, valid=valid)
        region_loss = memory_contrast_loss(
            student_anchors, teacher_anchors, region_contrast, *temperatures, valid=valid
        )
        return pixel_loss, region_loss


def _check_options(
    feature: str, student_channels: Channels, teacher_channels: Channels, *numbers: float | None
) -> None:
    """Raise :class:`ConfigError` for options that cannot work."""
    require_feature("cirkd", feature, student_channels, teacher_channels)
    require_same_classes("cirkd", student_channels, teacher_channels)
    names = (
        "contrast_temperature",
        "contrast_kd_temperature",
        "pixel_memory_size",
        "region_memory_size",
        "pixel_contrast_size",
        "region_contrast_size",
        "pixels_per_image",
        "pair_group_size",
    )
    require_positive("cirkd", **dict(zip(names, numbers, strict=True)))
    pixel_memory_size, pixels_per_image = numbers[2], numbers[6]
    if pixel_memory_size < pixels_per_image:
        raise ConfigError(
            f"cirkd pixel_memory_size ({pixel_memory_size}) must be at least pixels_per_image ({pixels_per_image})"
        )


__all__ = ["CIRKD", "embedding_head", "memory_contrast_loss", "minibatch_pixel_pair_loss"]
