"""Af-DCD: augmentation-free dense contrastive distillation (Fan et al., "Augmentation-free Dense Contrastive Knowledge
Distillation for Efficient Semantic Segmentation", NeurIPS 2023).

Both terms act on the last backbone stage ``c4`` (``outputs[-2]`` of the released DeepLabV3/PSPNet models):

1. **Masked feature mimicking.** The student map is aligned to the teacher's channels by a 1×1 conv, a spatial mask
   zeroes a fraction ζ of its positions, and a generation block ``G`` of 3×3 convolutions at the teacher's width
   rebuilds the teacher map::

       F̂ = G( M ⊙ A(F^S) ),      L_fd = (1 / B) · Σ_{b,c,p} (F̂ − F^T)²                      (summed, per image)

2. **Omni-contrastive loss** between ``F̂`` and ``F^T``. Both maps are max-pooled (window 4), cut into spatial patches
   of ``4×4`` positions, and the channels into ``M = 16`` groups, so every patch holds ``N = 16·M`` *tokens* (one per
   position and channel group, each a ``C/M`` vector). With similarity ``s(u, v) = −‖u − v‖₁`` and temperature τ, each
   student token ``i`` is contrasted with its teacher counterpart (same position, same group: the positive) against
   all teacher tokens of the same patch in a *different* channel group (any position: the negatives)::

       ℓ_i = −log [ exp(s(F̂_i, F^T_i)/τ) / ( exp(s(F̂_i, F^T_i)/τ) + Σ_{k: g(k)≠g(i)} exp(s(F̂_i, F^T_k)/τ) ) ]
       L_ctr = (1 / (B·H'·W')) · Σ_i ℓ_i              (H'×W' the pooled map; a sum over the M groups, mean per pixel)

   Teacher tokens of the same group at other positions are neither positives nor negatives.

The total is ``weight · (feature_weight · L_fd + contrast_weight · L_ctr)``; the released published rows also add
Hinton logit KD (λ=1, T=1): that combination is ``conf/method/afdcd_published.yaml``.

Defaults and their sources (``OSVAI/Af-DCD``): ``feature_weight=2e-6``, ``contrast_weight=5e-3``,
``enhanced_generator=True`` from ``train_scripts/cityscape/deeplabv3_r101_deeplabv3_r18_ocmgd.sh`` (the Cityscapes
script; the MobileNetV2 one uses the same weights); ``temperature=0.07``, ``num_groups=16``, ``patch_size=4``,
``pool_size=4``, ``mask_ratio=0.75`` and the random mask from ``losses/ocmgd.py`` / ``train_ocmgd.py`` defaults;
``max_grad_norm=15`` from ``train_ocmgd.py`` (``clip_grad_norm_`` on the loss module's parameters).

About the two boolean flags: the Cityscapes script passes ``--rand_mask False --enhance_projector True``, but
``train_ocmgd.py`` declares ``--rand-mask`` / ``--enhance-projector`` with ``type=bool``. Spelled with underscores the
flags are not recognised by argparse, and spelled as declared, ``bool("False")`` is ``True``. We take what the
parser would produce for the script's values (random mask on, enhanced generator on), which for the mask is also the
code's default and the paper's description of random masking. ``random_mask: false`` gives the released fixed mask
(the central third of the map zeroed).

**Cost.** The generation block works at the teacher's full ``c4`` width. At paper scale (teacher c4 = 2048 channels)
the enhanced block has four 3×3 2048→2048 convolutions, 4 × 37.75 M ≈ 151 M parameters (≈ 604 MB in fp32, about
1.8 GB with gradients and SGD momentum) — about twelve PSPNet-R18 students; the plain block has two (≈ 75.5 M). The
1×1 aligner adds ``C_s·C_t`` (1.05 M for 512→2048). All of it trains with the student and is inside the measured cost.

Deliberate deviations from the released code:

* When the pooled map is not a multiple of the patch size, it is cropped to the largest multiple from the top-left
  (the released code crashes; its CamVid branch crops the same way), and a patch dimension larger than the pooled map
  shrinks to the map (tiny embedded crops). At the paper's 512×1024 crops neither happens.
* The 1×1 aligner is an identity when student and teacher channels match (the released code then fails).
* If the student's ``c4`` has another spatial size than the teacher's, it is bilinearly resized to it.
* Gradient clipping (max norm 15 over the aligner and generator) runs only if the training loop calls
  :meth:`AugmentationFreeDCD.before_optimizer_step` between backward and the optimizer step.
* Learning rate 0.02, weight decay 1e-4 and 40 000 iterations of the released student optimiser are loop settings,
  not part of this module.
* The contrastive loss uses a ``logsumexp`` over allowed pairs instead of gathering positives/negatives by boolean
  masks (same value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrepro.distill.base import Channels, Distiller, register, require_feature, require_positive
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits

FEATURE = "c4"


def spatial_keep_mask(
    batch: int, height: int, width: int, mask_ratio: float, random: bool = True, device: torch.device | None = None
) -> Tensor:
    """``(B, 1, H, W)`` float mask: 0 where the student feature is dropped, 1 where kept.

    Random: each position is dropped independently with probability ``mask_ratio`` (torch's global RNG). Fixed: the
    central third ``[H//3 : 2H//3, W//3 : 2W//3]`` is dropped (the released ``rand_mask=False`` option).
    """
    if random:
        return (torch.rand(batch, 1, height, width, device=device) <= 1.0 - mask_ratio).float()
    keep = torch.ones(batch, 1, height, width, device=device)
    keep[:, :, height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 0.0
    return keep


def feature_mimic_loss(generated: Tensor, teacher_feature: Tensor) -> Tensor:
    """Masked feature mimicking: squared error summed over channels and positions, averaged over the batch."""
    return (generated - teacher_feature).pow(2).sum() / generated.shape[0]


def _patch_tokens(feature: Tensor, num_groups: int, patch: tuple[int, int]) -> Tensor:
    """``(B, C, H, W)`` → ``(B·patches, Hp·Wp·M, C/M)``; token index ``(y·Wp + x)·M + g`` within a patch."""
    batch, channels, height, width = feature.shape
    patch_h, patch_w = patch
    grid = feature.reshape(batch, num_groups, channels // num_groups, height // patch_h, patch_h, width // patch_w, patch_w)
    grid = grid.permute(0, 3, 5, 4, 6, 1, 2)
    return grid.reshape(-1, patch_h * patch_w * num_groups, channels // num_groups)


def omni_contrastive_loss(
    student_feature: Tensor,
    teacher_feature: Tensor,
    temperature: float = 0.07,
    num_groups: int = 16,
    patch_size: tuple[int, int] = (4, 4),
    pool_size: int = 4,
) -> Tensor:
    """Omni-contrastive loss over spatial positions × channel groups inside local patches (see the module docstring).

    Args:
        student_feature: ``(B, C, H, W)`` generated student map (with gradients).
        teacher_feature: ``(B, C, H, W)`` teacher map.
        temperature: τ.
        num_groups: channel groups ``M`` (must divide ``C``).
        patch_size: ``(Hp, Wp)`` positions per patch after pooling.
        pool_size: max-pooling window and stride applied first; 0 disables it.
    """
    channels = student_feature.shape[1]
    if channels % num_groups:
        raise ConfigError(f"afdcd: num_groups={num_groups} must divide the teacher's c4 channels ({channels})")
    if pool_size > 0:
        student_feature = F.max_pool2d(student_feature, pool_size)
        teacher_feature = F.max_pool2d(teacher_feature, pool_size)
    height, width = student_feature.shape[-2:]
    patch = (min(patch_size[0], height), min(patch_size[1], width))
    height, width = height - height % patch[0], width - width % patch[1]
    student_tokens = _patch_tokens(student_feature[..., :height, :width], num_groups, patch)
    teacher_tokens = _patch_tokens(teacher_feature[..., :height, :width], num_groups, patch)

    logits = -torch.cdist(student_tokens, teacher_tokens, p=1) / temperature
    tokens_per_patch = logits.shape[-1]
    group = torch.arange(tokens_per_patch, device=logits.device) % num_groups
    same_token = torch.eye(tokens_per_patch, dtype=torch.bool, device=logits.device)
    allowed = (group[:, None] != group[None, :]) | same_token
    log_partition = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    per_token = log_partition - logits.diagonal(dim1=-2, dim2=-1)
    return per_token.sum() / (student_feature.shape[0] * height * width)


class EnhancedGenerator(nn.Module):
    """The released "enhanced projector": two 3×3 conv+ReLU blocks in sequence, each followed by its own 3×3 adaptor;
    the output is the mean of the two adaptor outputs."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adaptor1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adaptor2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        first = self.block1(x)
        second = self.block2(first)
        return 0.5 * (self.adaptor1(first) + self.adaptor2(second))


def plain_generator(channels: int) -> nn.Sequential:
    """The released default projector: 3×3 conv, ReLU, 3×3 conv at the teacher's width."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1)
    )


@register("afdcd")
class AugmentationFreeDCD(Distiller):
    """Af-DCD on ``c4``: masked feature mimicking (L_fd) + omni-contrastive loss (L_ctr)."""

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        feature_weight: float = 2e-6,
        contrast_weight: float = 5e-3,
        temperature: float = 0.07,
        num_groups: int = 16,
        patch_size: int | list[int] = 4,
        pool_size: int = 4,
        mask_ratio: float = 0.75,
        random_mask: bool = True,
        enhanced_generator: bool = True,
        max_grad_norm: float | None = 15.0,
    ):
        super().__init__()
        require_feature("afdcd", FEATURE, student_channels, teacher_channels)
        require_positive("afdcd", temperature=temperature)
        student_width, teacher_width = student_channels[FEATURE], teacher_channels[FEATURE]
        if teacher_width % int(num_groups):
            raise ConfigError(f"afdcd: num_groups={num_groups} must divide the teacher's c4 channels ({teacher_width})")
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"afdcd: need 0 <= mask_ratio < 1, got {mask_ratio}")
        patch = [int(patch_size)] * 2 if isinstance(patch_size, int) else [int(size) for size in patch_size]
        if len(patch) != 2 or min(patch) < 1:
            raise ConfigError(f"afdcd: patch_size must be a positive int or [height, width], got {patch_size}")
        self.weight = float(weight)
        self.feature_weight = float(feature_weight)
        self.contrast_weight = float(contrast_weight)
        self.temperature = float(temperature)
        self.num_groups = int(num_groups)
        self.patch_size = (patch[0], patch[1])
        self.pool_size = int(pool_size)
        self.mask_ratio = float(mask_ratio)
        self.random_mask = bool(random_mask)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.align = nn.Identity() if student_width == teacher_width else nn.Conv2d(student_width, teacher_width, 1)
        self.generator = EnhancedGenerator(teacher_width) if enhanced_generator else plain_generator(teacher_width)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        teacher_feature = teacher.features[FEATURE].detach()
        student_feature = student.features[FEATURE]
        student_feature = resize_logits(student_feature, tuple(teacher_feature.shape[-2:]))
        aligned = self.align(student_feature)
        batch, _, height, width = aligned.shape
        keep = spatial_keep_mask(batch, height, width, self.mask_ratio, self.random_mask, aligned.device)
        generated = self.generator(aligned * keep.to(aligned.dtype))
        mimic = feature_mimic_loss(generated, teacher_feature)
        contrast = omni_contrastive_loss(
            generated, teacher_feature, self.temperature, self.num_groups, self.patch_size, self.pool_size
        )
        return {
            "afdcd_fd": self.weight * self.feature_weight * mimic,
            "afdcd_ctr": self.weight * self.contrast_weight * contrast,
        }

    def before_optimizer_step(self) -> None:
        """Clip the gradient norm of the aligner and generator (released ``train_ocmgd.py``: max norm 15)."""
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.parameters()), max_norm=self.max_grad_norm, norm_type=2.0)


__all__ = [
    "AugmentationFreeDCD",
    "EnhancedGenerator",
    "feature_mimic_loss",
    "omni_contrastive_loss",
    "plain_generator",
    "spatial_keep_mask",
]
