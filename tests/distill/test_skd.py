"""SKD (kdrepro.distill.skd): hand-computed pixel- and pair-wise losses, its holistic term, its configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrepro.config import load_config
from kdrepro.distill import build, build_term
from kdrepro.distill.skd import (
    pairwise_loss,
    pairwise_similarity,
    patch_size,
    pixelwise_loss,
)
from kdrepro.errors import ConfigError

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}
SMALL_CRITIC = {"d_conv_dim": 8}


def labels(batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, 64, 64, dtype=torch.long)


# ------------------------------------------------------------------------------------------------------ pixel-wise
def test_pixelwise_loss_hand_computed():
    student = torch.tensor([[[[0.0, 1.0]], [[0.0, -1.0]]]])  # (1, 2 classes, 1, 2)
    teacher = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    total = 0.0
    for x in range(2):
        s = [math.exp(student[0, k, 0, x].item()) for k in range(2)]
        t = [math.exp(teacher[0, k, 0, x].item()) for k in range(2)]
        p_s = [v / sum(s) for v in s]
        p_t = [v / sum(t) for v in t]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    assert pixelwise_loss(student, teacher).item() == pytest.approx(total / 2, rel=1e-6)
    assert pixelwise_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_pixelwise_loss_sums_over_batch_and_matches_released_cross_entropy_gradient():
    student = torch.randn(3, 5, 4, 4, requires_grad=True)
    teacher = torch.randn(3, 5, 4, 4)
    per_image = [pixelwise_loss(student[b : b + 1], teacher[b : b + 1]) for b in range(3)]
    loss = pixelwise_loss(student, teacher)
    assert loss.item() == pytest.approx(sum(v.item() for v in per_image), rel=1e-6)  # not divided by B
    (gradient,) = torch.autograd.grad(loss, student)
    released = (-F.softmax(teacher, 1) * F.log_softmax(student, 1)).sum() / (4 * 4)  # SKD CriterionPixelWise
    (released_gradient,) = torch.autograd.grad(released, student)
    assert torch.allclose(gradient, released_gradient, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- pair-wise
def reference_pairwise(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over batch and node pairs of squared cosine-similarity differences, with explicit loops (no pooling)."""
    batch, _, height, width = teacher.shape
    nodes = [(y, x) for y in range(height) for x in range(width)]
    total = 0.0
    for b in range(batch):
        for i in nodes:
            for j in nodes:
                a_s = F.cosine_similarity(student[b, :, i[0], i[1]], student[b, :, j[0], j[1]], dim=0).item()
                a_t = F.cosine_similarity(teacher[b, :, i[0], i[1]], teacher[b, :, j[0], j[1]], dim=0).item()
                total += (a_s - a_t) ** 2
    return total / (batch * len(nodes) ** 2)


def test_pairwise_loss_against_loops_and_zero_when_equal():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 2, 3, generator=generator)
    teacher = torch.randn(2, 7, 2, 3, generator=generator)
    # a 1x1 patch keeps every pixel as a node: pool_kernel=1
    assert pairwise_loss(student, teacher, pool_kernel=1).item() == pytest.approx(reference_pairwise(student, teacher), rel=1e-5)
    assert pairwise_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-10)
    assert pairwise_loss(2.0 * teacher.repeat(1, 2, 1, 1), teacher).item() == pytest.approx(0.0, abs=1e-10)


def test_pairwise_pooling_uses_half_map_patches_or_a_fixed_kernel():
    assert patch_size((8, 16), 0.5) == (4, 8)
    assert patch_size((65, 65), 0.5) == (32, 32)  # int(), then ceil_mode gives 3x3 nodes, as in the release
    assert patch_size((1, 1), 0.5) == (1, 1)
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 6, 8, 8, generator=generator)
    pooled_s = torch.stack([student[..., 4 * (k // 2) : 4 * (k // 2) + 4, 4 * (k % 2) : 4 * (k % 2) + 4].amax((-2, -1)) for k in range(4)], -1)
    pooled_t = torch.stack([teacher[..., 4 * (k // 2) : 4 * (k // 2) + 4, 4 * (k % 2) : 4 * (k % 2) + 4].amax((-2, -1)) for k in range(4)], -1)
    expected = reference_pairwise(pooled_s.view(1, 4, 2, 2), pooled_t.view(1, 6, 2, 2))
    assert pairwise_loss(student, teacher, pool_scale=0.5).item() == pytest.approx(expected, rel=1e-5)
    expected_kernel2 = pairwise_loss(F.max_pool2d(student, 2), F.max_pool2d(teacher, 2), pool_kernel=1)
    assert pairwise_loss(student, teacher, pool_kernel=2).item() == pytest.approx(expected_kernel2.item(), rel=1e-6)


def test_detached_norm_changes_the_gradient_not_the_value():
    features = torch.randn(1, 5, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 5, 2, 2)
    detached = pairwise_loss(features, teacher, pool_kernel=1, detach_norm=True)
    through = pairwise_loss(features, teacher, pool_kernel=1, detach_norm=False)
    assert detached.item() == pytest.approx(through.item(), rel=1e-5)
    (grad_through,) = torch.autograd.grad(through, features)
    (grad_detached,) = torch.autograd.grad(detached, features)
    # differentiating through F.normalize leaves no gradient along each node's own feature (scale invariance)
    assert (grad_through * features).sum(1).abs().max().item() < 1e-6
    assert (grad_detached * features).sum(1).abs().max().item() > 1e-4
    assert pairwise_similarity(features).shape == (1, 4, 4)


# -------------------------------------------------------------------------------------------------------- skd term
def test_skd_terms_are_weighted_and_reach_the_student(seg_output):
    torch.manual_seed(0)
    skd = build_term("skd", {"holistic": SMALL_CRITIC}, STUDENT, TEACHER)
    student, teacher = seg_output(STUDENT, grad=True), seg_output(TEACHER, seed=1)
    losses = skd(student, teacher, labels())
    assert set(losses) == {"pixelwise", "pairwise", "holistic"}
    assert losses["pixelwise"].item() == pytest.approx(10.0 * pixelwise_loss(student.logits, teacher.logits).item(), rel=1e-6)
    expected_pairwise = pairwise_loss(student.features["decoder"], teacher.features["decoder"], 0.5)
    assert losses["pairwise"].item() == pytest.approx(expected_pairwise.item(), rel=1e-6)
    assert skd.holistic is not None and skd.holistic.weight == pytest.approx(0.1)
    assert isinstance(skd.holistic.optimizer, torch.optim.SGD)
    sum(losses.values()).backward()
    assert student.logits.grad.abs().sum() > 0 and student.features["decoder"].grad.abs().sum() > 0
    assert len(skd.separately_optimized_parameters()) == len(list(skd.parameters()))
    assert "d_loss" in skd.extra_step(student.detach(), teacher, progress=0.0)


def test_skd_zero_loss_for_identical_outputs_and_batch_one(seg_output):
    skd = build_term("skd", {"holistic_weight": 0.0}, STUDENT, STUDENT)
    student = seg_output(STUDENT, batch=1, grad=True)
    twin = student.detach()
    losses = skd(student, twin, labels(1))
    assert skd.holistic is None and set(losses) == {"pixelwise", "pairwise"}
    assert all(value.item() == pytest.approx(0.0, abs=1e-6) for value in losses.values())
    assert skd.extra_step(student.detach(), twin) == {} and skd.extra_state() == {}


def test_skd_is_deterministic_under_a_seed(seg_output):
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        skd = build_term("skd", {"holistic": SMALL_CRITIC}, STUDENT, TEACHER)
        student, teacher = seg_output(STUDENT).detach(), seg_output(TEACHER, seed=1)
        skd.extra_step(student, teacher)
        results.append(skd(student, teacher, labels())["holistic"])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    ("name", "options"),
    [("skd", {"feature": "c5"}), ("skd", {"pool_scale": 0.0}), ("adv", {"loss_type": "lsgan"}),
     ("adv", {"d_optimizer": "rmsprop"}), ("adv", {"d_lr_schedule": "cosine"}), ("skd", {"lambda_pi": 10}),
     ("skd", {"holistic": {"weight": 1.0}}), ("skd", {"holistic": {"d_lr_decay": 1.0}})],
)
def test_bad_options_raise_config_error(name, options):
    with pytest.raises(ConfigError):
        build_term(name, options, STUDENT, TEACHER)


def test_configs_build_with_documented_defaults(method_yaml):
    def load(name: str):
        cfg = method_yaml(name)
        for options in cfg.terms.values():
            if "holistic" in options:
                options.holistic.d_conv_dim = 8
            if "d_conv_dim" in options:
                options.d_conv_dim = 8
        return build(cfg, STUDENT, TEACHER).terms

    skd = load("skd")["skd"]
    assert (skd.pixelwise_weight, skd.pairwise_weight, skd.pool_scale, skd.detach_norm) == (10.0, 1.0, 0.5, True)
    assert skd.holistic.loss_type == "wgan-gp" and skd.holistic.gp_weight == 10.0 and skd.holistic.d_weight == 0.1
    published = load("skd_published")
    assert set(published) == {"kd", "skd", "adv"}
    assert published["skd"].holistic is None and published["skd"].pool_kernel == 2 and not published["skd"].detach_norm
    assert published["adv"].loss_type == "hinge" and published["adv"].d_lr_schedule == "constant"
    assert isinstance(published["adv"].optimizer, torch.optim.Adam)
    assert published["adv"].optimizer.defaults["betas"] == (0.9, 0.99)
    adv = load("adv")["adv"]
    assert (adv.weight, adv.loss_type, adv.d_lr_schedule) == (0.001, "wgan-gp", "poly")


@pytest.mark.parametrize(("profile", "width"), [("synthetic", 8), ("smoke", 8), ("cityscapes", 64)])
def test_critic_width_follows_the_students_base_width(profile: str, width: int) -> None:
    """The paper's critic (64 wide) scaled with the student: at the embedded width it is not 9x the student's cost."""
    for method, path in (("skd", ("skd", "holistic")), ("skd_published", ("adv",)), ("cwd_published", ("adv",))):
        node = load_config([f"profile={profile}", f"method={method}"]).method.terms
        for key in path:
            node = node[key]
        assert node.d_conv_dim == width, (profile, method)
