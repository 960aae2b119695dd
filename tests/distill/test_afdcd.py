"""Af-DCD: hand-computed omni-contrastive and mimicking losses, masks, projector sizes, gradients, state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from kdrepro.distill import build_term
from kdrepro.distill.afdcd import (
    AugmentationFreeDCD,
    EnhancedGenerator,
    feature_mimic_loss,
    omni_contrastive_loss,
    spatial_keep_mask,
)
from kdrepro.errors import ConfigError

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def explicit_omni_contrastive(student, teacher, temperature, groups, patch):
    """Loop over images, patches, positions and channel groups (no pooling)."""
    batch, channels, height, width = student.shape
    width_per_group = channels // groups
    total = 0.0
    for b in range(batch):
        for top in range(0, height, patch):
            for left in range(0, width, patch):
                positions = [(top + dy, left + dx) for dy in range(patch) for dx in range(patch)]
                keys = [(p, g) for p in positions for g in range(groups)]

                def vector(feature, position, group, image=b):
                    y, x = position
                    return feature[image, group * width_per_group:(group + 1) * width_per_group, y, x]

                for position, group in keys:
                    query = vector(student, position, group)
                    positive = -(query - vector(teacher, position, group)).abs().sum().item() / temperature
                    negatives = [-(query - vector(teacher, p, g)).abs().sum().item() / temperature
                                 for p, g in keys if g != group]
                    total += -positive + math.log(math.exp(positive) + sum(math.exp(n) for n in negatives))
    return total / (batch * height * width)


def test_omni_contrastive_matches_explicit_loops():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    expected = explicit_omni_contrastive(student, teacher, temperature=2.0, groups=2, patch=2)
    value = omni_contrastive_loss(student, teacher, temperature=2.0, num_groups=2, patch_size=(2, 2), pool_size=0)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_omni_contrastive_pools_then_contrasts():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 6, 4, 4, generator=gen), torch.randn(1, 6, 4, 4, generator=gen)
    pooled_s = torch.stack([student[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax(dim=(-2, -1))
                            for i in range(2) for j in range(2)], dim=-1).reshape(1, 6, 2, 2)
    pooled_t = torch.stack([teacher[..., 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax(dim=(-2, -1))
                            for i in range(2) for j in range(2)], dim=-1).reshape(1, 6, 2, 2)
    expected = explicit_omni_contrastive(pooled_s, pooled_t, temperature=0.5, groups=3, patch=2)
    value = omni_contrastive_loss(student, teacher, temperature=0.5, num_groups=3, patch_size=(2, 2), pool_size=2)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_omni_contrastive_closed_form_for_constant_maps():
    # All tokens equal: every similarity is 0, so each token's loss is log(1 + N2 (M - 1)); summed over M groups.
    constant = torch.ones(2, 8, 4, 4)
    value = omni_contrastive_loss(constant, constant, temperature=0.07, num_groups=4, patch_size=(2, 2), pool_size=0)
    assert value.item() == pytest.approx(4 * math.log(1 + 4 * 3), rel=1e-6)


def test_omni_contrastive_is_smaller_when_student_equals_teacher():
    gen = torch.Generator().manual_seed(2)
    teacher, other = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    matched = omni_contrastive_loss(teacher, teacher, 0.07, 4, (4, 4), 0)
    assert matched.item() < 1e-3 < omni_contrastive_loss(other, teacher, 0.07, 4, (4, 4), 0).item()


def test_omni_contrastive_crops_and_shrinks_patches_for_small_maps():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(1, 4, 5, 3, generator=gen), torch.randn(1, 4, 5, 3, generator=gen)
    value = omni_contrastive_loss(student, teacher, 1.0, 2, (4, 4), 0)  # patch shrinks to (4, 3); row 4 is cropped
    keys = [((y, x), g) for y in range(4) for x in range(3) for g in range(2)]
    total = 0.0
    for (y, x), g in keys:
        query = student[0, 2 * g:2 * g + 2, y, x]
        positive = -(query - teacher[0, 2 * g:2 * g + 2, y, x]).abs().sum().item()
        negatives = [-(query - teacher[0, 2 * h:2 * h + 2, v, u]).abs().sum().item() for (v, u), h in keys if h != g]
        total += -positive + math.log(math.exp(positive) + sum(math.exp(n) for n in negatives))
    assert value.item() == pytest.approx(total / 12, rel=1e-5)


def test_feature_mimic_loss_sums_and_divides_by_batch():
    generated, teacher = torch.zeros(2, 1, 1, 2), torch.tensor([[[[1.0, 2.0]]], [[[3.0, 0.0]]]])
    assert feature_mimic_loss(generated, teacher).item() == pytest.approx((1 + 4 + 9) / 2)
    assert feature_mimic_loss(teacher, teacher).item() == 0.0


def test_spatial_keep_masks_random_ratio_and_fixed_centre():
    torch.manual_seed(0)
    keep = spatial_keep_mask(4, 32, 32, mask_ratio=0.75)
    assert set(keep.unique().tolist()) <= {0.0, 1.0} and 0.2 < keep.mean().item() < 0.3
    fixed = spatial_keep_mask(1, 6, 9, mask_ratio=0.75, random=False)
    assert fixed[0, 0, 2:4, 3:6].sum() == 0 and fixed.sum() == 6 * 9 - 2 * 3


def test_generator_sizes_follow_teacher_channels():
    distiller = AugmentationFreeDCD(STUDENT, TEACHER)
    assert isinstance(distiller.generator, EnhancedGenerator)
    assert distiller.align.weight.shape == (128, 32, 1, 1)
    generator_params = sum(p.numel() for p in distiller.generator.parameters())
    assert generator_params == 4 * (128 * 128 * 9 + 128)
    plain = AugmentationFreeDCD(STUDENT, TEACHER, enhanced_generator=False)
    assert sum(p.numel() for p in plain.generator.parameters()) == 2 * (128 * 128 * 9 + 128)
    same = AugmentationFreeDCD(TEACHER, TEACHER)
    assert isinstance(same.align, torch.nn.Identity)


def test_forward_value_gradients_and_clipping(seg_output):
    torch.manual_seed(0)
    distiller = AugmentationFreeDCD(STUDENT, TEACHER, contrast_weight=1.0, feature_weight=1.0, max_grad_norm=1e-3)
    student, teacher = seg_output(STUDENT, batch=2, seed=1, grad=True, size=16), seg_output(TEACHER, batch=2, seed=2, size=16)
    torch.manual_seed(5)
    losses = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))
    assert set(losses) == {"afdcd_fd", "afdcd_ctr"}
    torch.manual_seed(5)
    keep = spatial_keep_mask(2, 16, 16, 0.75)
    generated = distiller.generator(distiller.align(student.features["c4"]) * keep)
    t4 = teacher.features["c4"]
    assert losses["afdcd_fd"].item() == pytest.approx(feature_mimic_loss(generated, t4).item(), rel=1e-5)
    assert losses["afdcd_ctr"].item() == pytest.approx(omni_contrastive_loss(generated, t4).item(), rel=1e-5)
    sum(losses.values()).backward()
    assert student.features["c4"].grad.abs().sum() > 0
    own = list(distiller.student_parameters())
    assert len(own) == len(list(distiller.parameters())) and all(p.grad.abs().sum() > 0 for p in own)
    distiller.before_optimizer_step()
    total_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in own))
    assert total_norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_batch_size_one_and_default_weights(seg_output):
    torch.manual_seed(0)
    distiller = build_term("afdcd", {}, STUDENT, TEACHER)
    losses = distiller(seg_output(STUDENT, batch=1, seed=3, grad=True, size=16), seg_output(TEACHER, batch=1, seed=4, size=16), None)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    assert distiller.feature_weight == 2e-6 and distiller.contrast_weight == 5e-3


def test_tiny_embedded_maps_still_give_a_loss(seg_output):
    torch.manual_seed(0)
    distiller = AugmentationFreeDCD(STUDENT, TEACHER)  # c4 8x8 -> pooled 2x2 < 4x4 patch
    losses = distiller(seg_output(STUDENT, batch=1, seed=1, grad=True, size=8), seg_output(TEACHER, batch=1, seed=2, size=8), None)
    assert torch.isfinite(losses["afdcd_ctr"]) and losses["afdcd_ctr"].item() > 0


def test_random_mask_is_seeded_by_global_rng(seg_output):
    distiller = AugmentationFreeDCD(STUDENT, TEACHER)
    student, teacher = seg_output(STUDENT, batch=2, seed=1, size=16), seg_output(TEACHER, batch=2, seed=2, size=16)
    values = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        values.append(distiller(student, teacher, None)["afdcd_fd"].item())
    assert values[0] == values[1] != values[2]


def test_state_dict_round_trip(seg_output):
    torch.manual_seed(0)
    original = AugmentationFreeDCD(STUDENT, TEACHER)
    torch.manual_seed(1)
    restored = AugmentationFreeDCD(STUDENT, TEACHER)
    restored.load_state_dict(original.state_dict())
    student, teacher = seg_output(STUDENT, batch=1, seed=1, size=16), seg_output(TEACHER, batch=1, seed=2, size=16)
    torch.manual_seed(3)
    first = original(student, teacher, None)
    torch.manual_seed(3)
    second = restored(student, teacher, None)
    assert all(first[k].item() == second[k].item() for k in first)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError):
        AugmentationFreeDCD(STUDENT, TEACHER, num_groups=7)
    with pytest.raises(ConfigError):
        AugmentationFreeDCD(STUDENT, TEACHER, mask_ratio=1.0)
