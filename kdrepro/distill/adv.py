"""The adversarial (holistic) term on its own (``adv``), also the holistic term of structured KD
(:mod:`kdrepro.distill.skd`, whose docstring cites the release this follows).

A SAGAN-style critic ``D`` (spectral-normalised 4×4 stride-2 convolutions with LeakyReLU 0.1,
self-attention after the 3rd and 4th, BatchNorm on the input scores) scores segmentation maps; the student adds
``ℓ_ho = −E[D(s)]`` and ``D`` is trained by its own optimizer, once per iteration after the student's step, on the
Wasserstein critic loss with gradient penalty (WGAN-GP)::

    ℓ_D = λ_d · ( E[D(s)] − E[D(t)] + λ_gp · E[(‖∇D(α t + (1−α) s)‖₂ − 1)²] )


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
* The poly decay of ``D``'s lr needs the training progress; the loop passes it to ``extra_step(..., progress=...)``.
  Called without it, ``D`` trains at its base lr.
* ``D``'s parameters are excluded from the student's backward (``requires_grad`` off during the student's forward);
  the releases compute those gradients and then discard them with ``zero_grad``. Same maths, less work.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from kdrepro.distill.base import Channels, Distiller, register, require_same_classes
from kdrepro.distributed import average_gradients_if_distributed
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

LOSS_TYPES = ("wgan-gp", "hinge")


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
