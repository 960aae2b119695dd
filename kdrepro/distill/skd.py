"""Structured knowledge distillation (SKD) and its adversarial (holistic) term on its own (``adv``).

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

Defaults of ``adv`` (the holistic term alone, as other methods' releases add it: TorchDistiller ``SemSeg-distill``
and YukangWang/IFVD ``options.py`` + ``networks/kd_model.py``): λ_adv = 0.001 on the student, λ_d = 0.1, WGAN-GP with
λ_gp = 10, D optimizer Adam lr 4e-4 betas (0.9, 0.99), poly decay. CIRKD's ``train_kd.py`` -- the source of the
published CWD/SKD/IFVD rows -- uses a *hinge* critic loss without gradient penalty and a constant Adam lr:
``loss_type: hinge``, ``d_lr_schedule: constant`` in ``conf/method/*_published.yaml``. CIRKD's "SKD" row is pair-wise
only (fixed 2×2 pooling patch, ``F.normalize``, λ = 10) + logit KD + this adversarial term.

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

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from kdrepro.distill.base import Channels, Distiller, register, require_feature, require_same_classes, softmax_kl_terms
from kdrepro.distributed import average_gradients_if_distributed
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits

LOSS_TYPES = ("wgan-gp", "hinge")


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


# ---------------------------------------------------------------------------------------------------- discriminator
class SelfAttention(nn.Module):
    """SAGAN self-attention: ``x + γ · V softmax(QᵀK)ᵀ`` with ``γ`` initialised to 0 (``sagan_models.Self_Attn``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, max(1, channels // 8), kernel_size=1)
        self.key = nn.Conv2d(channels, max(1, channels // 8), kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        query, key, value = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)
        return x + self.gamma * (value @ attention.transpose(1, 2)).view_as(x)


def _down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv2d(in_channels, out_channels, 4, 2, 1)), nn.LeakyReLU(0.1))


class Discriminator(nn.Module):
    """SKD's critic (``networks/sagan_models.Discriminator`` with ``imsize 65``, ``preprocess-GAN-mode 1``).

    Input ``(B, K, h, w)`` scores, output ``(B, 1, h', w')`` critic values. Channels ``d, 2d, 4d, 8d`` (d = 64).
    """

    def __init__(self, num_classes: int, conv_dim: int = 64, min_input_size: int = 64):
        super().__init__()
        self.min_input_size = int(min_input_size)
        self.preprocess = nn.BatchNorm2d(num_classes)
        self.block1 = _down_block(num_classes, conv_dim)
        self.block2 = _down_block(conv_dim, 2 * conv_dim)
        self.block3 = _down_block(2 * conv_dim, 4 * conv_dim)
        self.attention3 = SelfAttention(4 * conv_dim)
        self.block4 = _down_block(4 * conv_dim, 8 * conv_dim)
        self.attention4 = SelfAttention(8 * conv_dim)
        self.last = nn.Conv2d(8 * conv_dim, 1, kernel_size=4)

    def forward(self, scores: Tensor) -> Tensor:
        short_side = min(scores.shape[-2:])
        if short_side < self.min_input_size:
            factor = self.min_input_size / short_side
            size = (math.ceil(scores.shape[-2] * factor), math.ceil(scores.shape[-1] * factor))
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        x = self.block2(self.block1(self.preprocess(scores)))
        x = self.attention4(self.block4(self.attention3(self.block3(x))))
        return self.last(x)


# -------------------------------------------------------------------------------------------- adversarial losses
def generator_loss(student_critic: Tensor) -> Tensor:
    """Student's holistic term ``−E[D(s)]`` (the same for WGAN-GP and hinge in every release)."""
    return -student_critic.mean()


def critic_loss(student_critic: Tensor, teacher_critic: Tensor, loss_type: str = "wgan-gp") -> Tensor:
    """Critic loss without penalty: WGAN ``E[D(s)] − E[D(t)]``; hinge ``E[relu(1 − D(t))] + E[relu(1 + D(s))]``."""
    if loss_type == "wgan-gp":
        return student_critic.mean() - teacher_critic.mean()
    if loss_type == "hinge":
        return F.relu(1.0 - teacher_critic).mean() + F.relu(1.0 + student_critic).mean()
    raise ConfigError(f"adversarial loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def gradient_penalty(discriminator: nn.Module, student_scores: Tensor, teacher_scores: Tensor, alpha: Tensor | None = None) -> Tensor:
    """WGAN-GP penalty ``E[(‖∇_x D(x)‖₂ − 1)²]`` at ``x = α t + (1 − α) s``, α ~ U(0, 1) per image (Gulrajani et al.)."""
    if alpha is None:
        alpha = torch.rand(teacher_scores.shape[0], 1, 1, 1, device=teacher_scores.device, dtype=teacher_scores.dtype)
    mixed = (alpha * teacher_scores.detach() + (1.0 - alpha) * student_scores.detach()).requires_grad_(True)
    (gradient,) = torch.autograd.grad(discriminator(mixed).sum(), mixed, create_graph=True)
    return (gradient.flatten(1).norm(dim=1) - 1.0).pow(2).mean()


@contextmanager
def _no_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Build the graph through ``module`` without gradients for its parameters (inputs still get theirs)."""
    parameters = list(module.parameters())
    flags = [parameter.requires_grad for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


@register("adv")
class HolisticDistiller(Distiller):
    """The adversarial (holistic) term alone: ``{"adv": weight · (−E[D(s)])}`` plus ``D``'s own update.

    Args:
        weight: λ_adv on the student's term (TorchDistiller/IFVD/CIRKD: 0.001; SKD's own release: 0.1).
        d_weight: λ_d on the critic loss (0.1 everywhere).
        loss_type: ``wgan-gp`` (SKD, TorchDistiller, IFVD) or ``hinge`` (CIRKD ``train_kd.py``).
        gp_weight: λ_gp (10); used with ``wgan-gp`` only, as in the releases.
        d_optimizer: ``adam`` (TorchDistiller, IFVD, CIRKD) or ``sgd`` (SKD's own release).
        d_lr, d_betas, d_momentum, d_weight_decay: the critic optimizer's settings.
        d_lr_schedule: ``poly`` (``(1 − progress)^d_lr_power``, SKD/TorchDistiller/IFVD) or ``constant`` (CIRKD).
        d_conv_dim: width of D's first convolution (64).
        d_min_input_size: score maps with a shorter side are upsampled to it inside D (64).
    """

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 0.001,
        d_weight: float = 0.1,
        loss_type: str = "wgan-gp",
        gp_weight: float = 10.0,
        d_optimizer: str = "adam",
        d_lr: float = 4e-4,
        d_betas: Sequence[float] = (0.9, 0.99),
        d_momentum: float = 0.9,
        d_weight_decay: float = 0.0,
        d_lr_schedule: str = "poly",
        d_lr_power: float = 0.9,
        d_conv_dim: int = 64,
        d_min_input_size: int = 64,
    ):
        super().__init__()
        num_classes = require_same_classes("adv", student_channels, teacher_channels)
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"adv: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if d_lr_schedule not in ("poly", "constant"):
            raise ConfigError(f"adv: d_lr_schedule must be 'poly' or 'constant', got {d_lr_schedule!r}")
        self.weight = float(weight)
        self.d_weight = float(d_weight)
        self.loss_type = loss_type
        self.gp_weight = float(gp_weight)
        self.d_lr = float(d_lr)
        self.d_lr_schedule = d_lr_schedule
        self.d_lr_power = float(d_lr_power)
        self.discriminator = Discriminator(num_classes, int(d_conv_dim), int(d_min_input_size))
        self.optimizer = _make_optimizer(
            self.discriminator.parameters(), d_optimizer, self.d_lr, d_betas, d_momentum, d_weight_decay
        )

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        with _no_parameter_grads(self.discriminator):
            critic = self.discriminator(student.logits)
        return {"adv": self.weight * generator_loss(critic)}

    def separately_optimized_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def current_d_lr(self, progress: float | None) -> float:
        """D's learning rate at ``progress`` ∈ [0, 1] (base lr when the schedule is constant or progress unknown)."""
        if self.d_lr_schedule == "constant" or progress is None:
            return self.d_lr
        return self.d_lr * max(0.0, 1.0 - float(progress)) ** self.d_lr_power

    def extra_step(self, student: SegOutput, teacher: SegOutput, progress: float | None = None) -> dict[str, float]:
        """One critic update on detached student/teacher logits (after the student's step, as in every release)."""
        lr = self.current_d_lr(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        student_scores = student.logits.detach().float()
        teacher_scores = teacher.logits.detach().float()
        with torch.autocast(device_type=student_scores.device.type, enabled=False):
            adversarial = critic_loss(self.discriminator(student_scores), self.discriminator(teacher_scores), self.loss_type)
            penalty = torch.zeros((), device=student_scores.device)
            if self.loss_type == "wgan-gp" and self.gp_weight > 0:
                penalty = gradient_penalty(self.discriminator, student_scores, teacher_scores)
            loss = self.d_weight * (adversarial + self.gp_weight * penalty)
            loss.backward()
        average_gradients_if_distributed(self.discriminator.parameters())
        self.optimizer.step()
        return {"d_loss": loss.detach(), "d_gradient_penalty": penalty.detach(), "d_lr": lr}

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "optimizer" in state:  # a deep copy: Optimizer.load_state_dict would alias same-device state tensors
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


def _make_optimizer(
    parameters: Iterator[nn.Parameter], name: str, lr: float, betas: Sequence[float], momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adam":
        beta1, beta2 = (float(beta) for beta in betas)
        return torch.optim.Adam(parameters, lr=lr, betas=(beta1, beta2), weight_decay=float(weight_decay))
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=float(momentum), weight_decay=float(weight_decay))
    raise ConfigError(f"adv: d_optimizer must be 'adam' or 'sgd', got {name!r}")


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
