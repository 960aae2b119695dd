"""MasKD: masked distillation with receptive tokens (Huang et al., "Masked Distillation with Receptive Tokens", ICLR 2023).

The method has two stages, and both are inside its measured cost:

1. **Mask learning** on the frozen teacher (paper Sec. 3, "receptive tokens"; released as
   ``hunto/MasKD: segmentation/train_mask_module.py`` with ``losses/maskd.py``). ``T`` learnable receptive tokens
   ``r_j ∈ R^C`` produce one soft spatial mask each by pixel-wise attention on the teacher map ``F^T``::

       M_j(p) = σ( r_j · F^T(p) )                                                            (mask of token j)

   The tokens are trained with the *task loss on the masked teacher output* plus a Dice loss that keeps the masks
   apart (diversity)::

       L_mask = CE( up( Σ_j M_j ⊙ F^T ), y ) + (1 / (T(T−1))) Σ_{j≠k} 2⟨M_j, M_k⟩ / (‖M_j‖² + ‖M_k‖²)

   The teacher stays frozen; only the tokens move (SGD, lr 0.1, momentum 0.9, weight decay 1e-3, poly 0.9 over
   10 000 iterations at batch 16). Here that stage runs through the :class:`Distiller` hooks
   ``pretrain_iterations`` / ``pretrain_step`` with the method's own optimizer, inside the training clock.

2. **Masked distillation** (paper Sec. 3, masked distillation; released ``MasKDLoss``): with the tokens frozen, the
   student reconstructs the teacher map under every mask, each mask normalised by its area::

       L_maskd = ½ · mean_{b,j,c} [ Σ_p M_j(p)² (F^S_c(p) − F^T_c(p))² / (Σ_p M_j(p) + 1e-5) ]

   (the released code squares the masked difference, hence ``M²``). The released segmentation rows add the same loss
   on the auxiliary (FCN on c3) outputs with weight 0.4, and nothing else (no logit KD): ``train_maskd.py``,
   ``loss = CE + 0.4·CE_aux + λ·L_maskd(out) + 0.4·λ·L_maskd(aux)`` with ``λ = --lambda-kd = 1``.

**Which map.** In the released segmentation code the "feature" is the network's *output* — the ``C = K`` class
score maps at output stride 8 (``MaskModule(channels=19)`` on ``outputs[0]``), not the decoder feature, and the
masked task loss is computed directly on the masked scores. So no projector is needed (student and teacher both have
``K`` channels) and the teacher's classifier is not needed either: everything reads only ``SegOutput.logits`` (and
``aux_logits``).

Defaults and their sources (``hunto/MasKD``, folder ``segmentation/``):

* ``num_tokens=8``, token init N(0, 0.01²): ``train_mask_module.py`` (``MaskModule(channels=19, num_tokens=8)``) and
  ``losses/maskd.py``.
* ``pretrain_iterations=10000``, ``pretrain_lr=0.1``, momentum 0.9, ``pretrain_weight_decay=1e-3``, poly power 0.9
  (no floor), Dice weight 1: ``train_mask_module.py`` argparse defaults (run by
  ``train_scripts/train_mask_module/deeplabv3_res101.sh``, 8 GPUs, batch 16). 10 000 mask iterations accompany a
  40 000-iteration student schedule (``train_maskd.py``), i.e. a quarter of it; at batch 8 the same number of images
  is 20 000 iterations. Profiles should scale ``pretrain_iterations`` with their student schedule.
* ``weight=1`` (``--lambda-kd 1``), ``aux_weight=0.4``: ``train_maskd.py``; ``train_scripts/train_maskd/pspnet_res18.sh``.

Deliberate deviations from the released code:

* The released mask-learning script runs the frozen teacher in ``train()`` mode (batch-norm batch statistics under
  ``no_grad``); here the teacher is in eval mode, as in the distillation stage, so the tokens learn on the same
  teacher outputs they later mask.
* Cross-entropy upsampling uses ``align_corners=False`` and ignore index 255 (mmsegmentation protocol) instead of
  CIRKD's ``align_corners=True`` and ignore −1.
* The teacher's auxiliary CE in the released mask-learning loss is a constant for the tokens (it has no masked
  input), so it is left out; it changes the logged value, not the gradient.
* The auxiliary distillation term needs ``aux_logits`` from *both* models; the released teacher returns them in eval
  mode. When the teacher's ``aux_logits`` is ``None`` the term is skipped (the loss dict then has no ``maskd_aux``).
* The masked loss is computed as ``Σ_p M² (F^S − F^T)²`` with an einsum instead of materialising the
  ``(B, T, C, h, w)`` masked tensors (same value, less memory).
* The detection variant's mask-weighting branch and student-customised masks (``mmrazor/.../maskd.py``) are not part
  of the released segmentation code and are not used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrepro.distill.base import Channels, Distiller, register, require_positive, require_same_classes, zero_loss
from kdrepro.distributed import average_gradients_if_distributed
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput, resize_logits

IGNORE_INDEX = 255


def receptive_masks(tokens: Tensor, teacher_map: Tensor) -> Tensor:
    """Soft masks ``σ(r_j · F(p))`` of ``T`` tokens ``(T, C)`` on a map ``(B, C, h, w)``; returns ``(B, T, h, w)``."""
    return torch.sigmoid(torch.einsum("tc,bchw->bthw", tokens.to(teacher_map.dtype), teacher_map))


def mask_dice_loss(masks: Tensor) -> Tensor:
    """Mean Dice coefficient over ordered pairs of distinct masks of each image (the diversity term).

    ``masks`` is ``(B, T, h, w)``; the result is ``mean_{b, j≠k} 2⟨M_j, M_k⟩ / (‖M_j‖² + ‖M_k‖²)``, in [0, 1]; it is 0
    for masks with disjoint support and 1 for identical masks. With a single token there is no pair and it is 0.
    """
    batch, tokens = masks.shape[:2]
    if tokens < 2:
        return zero_loss(masks)
    flat = masks.flatten(2)
    overlap = flat @ flat.transpose(1, 2)
    energy = flat.pow(2).sum(-1)
    dice = 2.0 * overlap / (energy[:, :, None] + energy[:, None, :] + 2e-12)
    distinct = ~torch.eye(tokens, dtype=torch.bool, device=masks.device)
    return dice[:, distinct].mean()


def masked_task_loss(teacher_logits: Tensor, masks: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy of the masked teacher scores ``Σ_j M_j ⊙ F^T`` upsampled to the labels (mask-learning task loss).

    Args:
        teacher_logits: ``(B, K, h, w)`` teacher scores.
        masks: ``(B, T, h, w)`` receptive masks.
        target: ``(B, H, W)`` labels; ``ignore_index`` pixels do not count. All-ignored batches give 0.
    """
    masked_scores = teacher_logits * masks.sum(dim=1, keepdim=True)
    masked_scores = resize_logits(masked_scores, tuple(target.shape[-2:]))
    if not bool((target != ignore_index).any()):
        return zero_loss(masked_scores)
    return F.cross_entropy(masked_scores, target, ignore_index=ignore_index)


def maskd_loss(student_map: Tensor, teacher_map: Tensor, masks: Tensor) -> Tensor:
    """Masked reconstruction loss ``½ · mean_{b,j,c} Σ_p M_j² (S_c − T_c)² / (Σ_p M_j + 1e-5)``.

    Args:
        student_map: ``(B, C, h, w)`` student scores (with gradients).
        teacher_map: ``(B, C, h, w)`` teacher scores.
        masks: ``(B, T, h, w)`` masks computed on the teacher.
    """
    squared_error = (student_map - teacher_map).pow(2)
    per_mask_channel = torch.einsum("bthw,bchw->btc", masks.pow(2), squared_error)
    area = masks.sum(dim=(2, 3)) + 1e-5
    return 0.5 * (per_mask_channel / area[:, :, None]).mean()


@register("maskd")
class MaskedDistillation(Distiller):
    """MasKD on the segmentation scores: receptive tokens pre-trained on the frozen teacher, then masked mimicking."""

    def __init__(
        self,
        student_channels: Channels,
        teacher_channels: Channels,
        weight: float = 1.0,
        num_tokens: int = 8,
        aux_weight: float = 0.4,
        pretrain_iterations: int = 10000,
        pretrain_lr: float = 0.1,
        pretrain_momentum: float = 0.9,
        pretrain_weight_decay: float = 1e-3,
        pretrain_lr_power: float = 0.9,
        dice_weight: float = 1.0,
    ):
        super().__init__()
        classes = require_same_classes("maskd", student_channels, teacher_channels)
        require_positive("maskd", num_tokens=int(num_tokens), pretrain_lr=pretrain_lr)
        if int(pretrain_iterations) < 0:
            raise ConfigError(f"maskd pretrain_iterations must be >= 0, got {pretrain_iterations}")
        self.weight = float(weight)
        self.aux_weight = float(aux_weight)
        self.needs_teacher_aux = self.aux_weight > 0
        self.dice_weight = float(dice_weight)
        self.pretrain_iterations = int(pretrain_iterations)
        self.pretrain_lr = float(pretrain_lr)
        self.pretrain_lr_power = float(pretrain_lr_power)
        self.pretrain_steps_done = 0
        self.tokens = nn.Parameter(torch.empty(int(num_tokens), classes).normal_(0.0, 0.01))
        self.token_optimizer = torch.optim.SGD(
            [self.tokens], lr=self.pretrain_lr, momentum=pretrain_momentum, weight_decay=pretrain_weight_decay
        )

    # --- stage 1: mask learning on the frozen teacher -------------------------------------------------------------
    def separately_optimized_parameters(self) -> list[nn.Parameter]:
        return [self.tokens]

    def pretrain_learning_rate(self) -> float:
        """Poly schedule of the released mask-learning script: ``lr₀ · (1 − step / total)^0.9``."""
        progress = min(self.pretrain_steps_done / max(self.pretrain_iterations, 1), 1.0)
        return self.pretrain_lr * (1.0 - progress) ** self.pretrain_lr_power

    def pretrain_step(self, teacher: SegOutput, target: Tensor) -> dict[str, float]:
        """One SGD step of the receptive tokens on ``CE(masked teacher scores) + Dice(masks)``."""
        learning_rate = self.pretrain_learning_rate()
        for group in self.token_optimizer.param_groups:
            group["lr"] = learning_rate
        with torch.enable_grad():
            teacher_logits = teacher.logits.detach().float()
            masks = receptive_masks(self.tokens, teacher_logits)
            task = masked_task_loss(teacher_logits, masks, target)
            dice = mask_dice_loss(masks)
            self.token_optimizer.zero_grad(set_to_none=True)
            (task + self.dice_weight * dice).backward()
        average_gradients_if_distributed(self.separately_optimized_parameters())
        self.token_optimizer.step()
        self.pretrain_steps_done += 1
        return {"mask_task_loss": float(task.detach()), "mask_dice_loss": float(dice.detach()), "mask_lr": learning_rate}

    # --- stage 2: masked distillation -----------------------------------------------------------------------------
    def _masked_term(self, student_map: Tensor, teacher_map: Tensor) -> Tensor:
        teacher_map = teacher_map.detach()
        with torch.no_grad():
            masks = receptive_masks(self.tokens, teacher_map)
        student_map = resize_logits(student_map, tuple(teacher_map.shape[-2:]))
        return maskd_loss(student_map, teacher_map, masks)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        losses = {"maskd": self.weight * self._masked_term(student.logits, teacher.logits)}
        if self.aux_weight > 0 and student.aux_logits is not None and teacher.aux_logits is not None:
            aux = self._masked_term(student.aux_logits, teacher.aux_logits)
            losses["maskd_aux"] = self.weight * self.aux_weight * aux
        return losses

    # --- checkpointing of the own optimizer -----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"token_optimizer": self.token_optimizer.state_dict(), "pretrain_steps_done": self.pretrain_steps_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.token_optimizer.load_state_dict(state["token_optimizer"])
        self.pretrain_steps_done = int(state["pretrain_steps_done"])


__all__ = ["MaskedDistillation", "mask_dice_loss", "masked_task_loss", "maskd_loss", "receptive_masks"]
