"""MasKD: hand-computed loss values, the pre-training stage and its own optimizer, gradients, state round trip."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kdrepro.distill import build_term
from kdrepro.distill.maskd import MaskedDistillation, mask_dice_loss, maskd_loss, masked_task_loss, receptive_masks
from kdrepro.errors import ConfigError

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def make_labels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 19, (batch, 64, 64), generator=torch.Generator().manual_seed(seed))


def make_maskd(seed: int = 0, **options) -> MaskedDistillation:
    torch.manual_seed(seed)
    return MaskedDistillation(STUDENT, TEACHER, **{"pretrain_iterations": 5, **options})


def test_receptive_masks_are_sigmoid_of_token_feature_products():
    tokens = torch.tensor([[1.0, 0.0], [0.5, -2.0]])
    feature = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1, 2)
    masks = receptive_masks(tokens, feature)
    expected = torch.tensor([[[[1.0, 2.0]], [[0.5 - 6.0, 1.0 + 2.0]]]]).sigmoid()
    torch.testing.assert_close(masks, expected)
    assert torch.allclose(receptive_masks(torch.zeros(3, 2), feature), torch.full((1, 3, 1, 2), 0.5))


def test_maskd_loss_matches_explicit_loops_and_is_zero_for_equal_maps():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 2, 3, generator=gen), torch.randn(2, 3, 2, 3, generator=gen)
    masks = torch.rand(2, 4, 2, 3, generator=gen)
    terms = []
    for b in range(2):
        for j in range(4):
            area = sum(masks[b, j, y, x].item() for y in range(2) for x in range(3)) + 1e-5
            for c in range(3):
                total = 0.0
                for y in range(2):
                    for x in range(3):
                        total += (masks[b, j, y, x].item() * (student[b, c, y, x] - teacher[b, c, y, x]).item()) ** 2
                terms.append(total / area)
    expected = 0.5 * sum(terms) / len(terms)
    assert maskd_loss(student, teacher, masks).item() == pytest.approx(expected, rel=1e-5)
    assert maskd_loss(teacher, teacher, masks).item() == 0.0


def test_mask_dice_loss_identical_disjoint_and_explicit():
    identical = torch.ones(1, 3, 2, 2)
    assert mask_dice_loss(identical).item() == pytest.approx(1.0)
    disjoint = torch.zeros(1, 2, 2, 2)
    disjoint[0, 0, 0] = 1.0
    disjoint[0, 1, 1] = 1.0
    assert mask_dice_loss(disjoint).item() == pytest.approx(0.0)
    assert mask_dice_loss(torch.rand(2, 1, 3, 3)).item() == 0.0  # one token: no pair
    masks = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    values = []
    for b in range(2):
        for j in range(3):
            for k in range(3):
                if j != k:
                    mj, mk = masks[b, j].flatten().tolist(), masks[b, k].flatten().tolist()
                    dot = sum(u * v for u, v in zip(mj, mk, strict=True))
                    values.append(2 * dot / (sum(u * u for u in mj) + sum(v * v for v in mk)))
    assert mask_dice_loss(masks).item() == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_masked_task_loss_explicit_with_ignored_pixels():
    gen = torch.Generator().manual_seed(3)
    logits, masks = torch.randn(1, 3, 2, 2, generator=gen), torch.rand(1, 2, 2, 2, generator=gen)
    target = torch.tensor([[[0, 2], [255, 1]]])
    losses = []
    for y in range(2):
        for x in range(2):
            label = target[0, y, x].item()
            if label == 255:
                continue
            scores = [logits[0, k, y, x].item() * (masks[0, 0, y, x] + masks[0, 1, y, x]).item() for k in range(3)]
            losses.append(math.log(sum(math.exp(s) for s in scores)) - scores[label])
    assert masked_task_loss(logits, masks, target).item() == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert masked_task_loss(logits, masks, torch.full_like(target, 255)).item() == 0.0


def test_forward_losses_gradients_and_frozen_tokens(seg_output):
    distiller = make_maskd()
    student, teacher = seg_output(STUDENT, batch=2, seed=1, grad=True, aux=True), seg_output(TEACHER, batch=2, seed=2, aux=True)
    losses = distiller(student, teacher, make_labels(2))
    assert set(losses) == {"maskd", "maskd_aux"}
    masks = receptive_masks(distiller.tokens.detach(), teacher.logits)
    assert losses["maskd"].item() == pytest.approx(maskd_loss(student.logits, teacher.logits, masks).item())
    sum(losses.values()).backward()
    assert student.logits.grad.abs().sum() > 0 and student.aux_logits.grad.abs().sum() > 0
    assert distiller.tokens.grad is None  # tokens are frozen during distillation (own optimizer only in pre-training)
    assert list(distiller.student_parameters()) == []
    assert distiller.separately_optimized_parameters() == [distiller.tokens]


def test_student_equal_to_teacher_gives_zero_and_missing_teacher_aux_skips_term(seg_output):
    distiller = make_maskd()
    teacher = seg_output(TEACHER, batch=1, seed=4, aux=False)
    losses = distiller(teacher, teacher, make_labels(1))
    assert set(losses) == {"maskd"} and losses["maskd"].item() == 0.0


def test_pretrain_step_moves_only_tokens_with_poly_learning_rate(seg_output):
    distiller = make_maskd(pretrain_iterations=4)
    assert distiller.pretrain_iterations == 4
    student = seg_output(STUDENT, batch=1, seed=1, grad=True, aux=True)
    teacher, labels = seg_output(TEACHER, batch=1, seed=2, aux=True), make_labels(1)
    before = distiller.tokens.detach().clone()
    logs = distiller.pretrain_step(teacher, labels)
    assert set(logs) == {"mask_task_loss", "mask_dice_loss", "mask_lr"} and logs["mask_lr"] == pytest.approx(0.1)
    assert not torch.equal(before, distiller.tokens.detach())
    assert student.logits.grad is None and teacher.logits.grad is None
    distiller.pretrain_step(teacher, labels)
    assert distiller.pretrain_learning_rate() == pytest.approx(0.1 * (1 - 2 / 4) ** 0.9)


def test_pretrain_first_step_is_plain_sgd_on_the_mask_objective(seg_output):
    distiller = make_maskd(pretrain_weight_decay=0.0)
    teacher, labels = seg_output(TEACHER, batch=2, seed=5, aux=True), make_labels(2, seed=5)
    tokens = distiller.tokens.detach().clone().requires_grad_(True)
    masks = receptive_masks(tokens, teacher.logits)
    (masked_task_loss(teacher.logits, masks, labels) + mask_dice_loss(masks)).backward()
    distiller.pretrain_step(teacher, labels)
    torch.testing.assert_close(distiller.tokens.detach(), tokens.detach() - 0.1 * tokens.grad)


def test_state_round_trip_restores_tokens_and_optimizer_momentum(seg_output):
    teacher, labels = seg_output(TEACHER, batch=2, seed=6, aux=True), make_labels(2, seed=6)
    original = make_maskd(seed=0)
    for _ in range(2):
        original.pretrain_step(teacher, labels)
    buffer = io.BytesIO()
    torch.save({"model": original.state_dict(), "extra": original.extra_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored = make_maskd(seed=123)
    restored.load_state_dict(saved["model"])
    restored.load_extra_state(saved["extra"])
    assert restored.pretrain_steps_done == 2
    original.pretrain_step(teacher, labels)
    restored.pretrain_step(teacher, labels)
    torch.testing.assert_close(restored.tokens, original.tokens)
    restored.load_extra_state({})  # composite passes {} for terms without saved state: a no-op


def test_deterministic_with_seed_and_registry_build():
    first, second = make_maskd(seed=7), make_maskd(seed=7)
    assert torch.equal(first.tokens, second.tokens)
    built = build_term("maskd", {"weight": 2.0, "pretrain_iterations": 3}, STUDENT, TEACHER)
    assert isinstance(built, MaskedDistillation) and built.pretrain_iterations == 3 and built.weight == 2.0


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        MaskedDistillation(STUDENT, {**TEACHER, "logits": 150})
    with pytest.raises(ConfigError):
        MaskedDistillation(STUDENT, TEACHER, num_tokens=0)
