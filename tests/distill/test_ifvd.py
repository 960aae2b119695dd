"""IFVD (kdrepro.distill.ifvd): prototypes and IFV maps against a per-class loop, ignore pixels, the Distiller."""

from __future__ import annotations

import math

import pytest
import torch

from kdrepro.distill import build, build_term
from kdrepro.distill.ifvd import class_prototypes, ifv_map, ifvd_loss
from kdrepro.errors import ConfigError

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def block_labels(batch: int, num_classes: int, seed: int = 0, ignore_fraction: float = 0.2) -> torch.Tensor:
    """64x64 labels constant on 8x8 blocks (so any nearest downsampling to 8x8 agrees), some blocks ignored."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (batch, 8, 8), generator=generator)
    coarse[torch.rand(batch, 8, 8, generator=generator) < ignore_fraction] = 255
    return coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


def reference_ifv_map(features: torch.Tensor, coarse_labels: torch.Tensor, num_classes: int) -> list[list[float]]:
    """The release's per-class computation, written with explicit loops over images, classes and pixels."""
    batch, channels, height, width = features.shape
    maps = []
    for b in range(batch):
        pixels = [(y, x) for y in range(height) for x in range(width)]
        prototypes = {}
        for k in range(num_classes):
            members = [(y, x) for y, x in pixels if int(coarse_labels[b, y, x]) == k]
            if members:
                total = [sum(float(features[b, c, y, x]) for y, x in members) for c in range(channels)]
                prototypes[k] = [value / (len(members) + 1e-6) for value in total]
        values = []
        for y, x in pixels:
            f = [float(features[b, c, y, x]) for c in range(channels)]
            k = int(coarse_labels[b, y, x])
            p = prototypes.get(k, f)
            dot = sum(a * c for a, c in zip(f, p, strict=True))
            norms = math.sqrt(sum(a * a for a in f)) * math.sqrt(sum(c * c for c in p))
            values.append(dot / max(norms, 1e-8))
        maps.append(values)
    return maps


def test_prototypes_hand_computed():
    features = torch.tensor([[[[1.0, 3.0, 5.0]], [[2.0, 0.0, -1.0]]]])  # (1, C=2, 1, 3)
    labels = torch.tensor([[[0, 0, 255]]])
    prototypes, slot = class_prototypes(features, labels, num_classes=2)
    assert torch.allclose(prototypes[0, 0], torch.tensor([4.0, 2.0]) / (2 + 1e-6))
    assert torch.equal(prototypes[0, 1], torch.zeros(2))  # absent class
    assert slot.tolist() == [[0, 0, 2]]  # the ignored pixel goes to the spare slot K
    similarity = ifv_map(features, labels, num_classes=2)
    expected_first = (1 * 2 + 2 * 1) / (math.sqrt(5) * math.sqrt(5))  # cos((1,2), (2,1)) ; prototype ∝ (4, 2)
    assert similarity[0, 0, 0].item() == pytest.approx(expected_first, rel=1e-6)
    assert similarity[0, 0, 2].item() == pytest.approx(1.0)  # unlabelled: compared with itself


def test_ifv_map_matches_the_per_class_loop_with_ignore_and_label_downsampling():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 8, 8, generator=generator)
    labels = block_labels(2, num_classes=4, seed=3)
    coarse = labels[:, ::8, ::8]
    fast = ifv_map(features, labels, num_classes=4)
    slow = torch.tensor(reference_ifv_map(features, coarse, 4)).view(2, 8, 8)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast[coarse == 255], torch.ones(1), atol=1e-6)


def test_loss_hand_normalisation_counts_every_pixel():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 5, 8, 8, generator=generator)
    labels = block_labels(2, num_classes=4, seed=5, ignore_fraction=0.5)
    coarse = labels[:, ::8, ::8]
    labelled = coarse != 255
    difference = (ifv_map(student, labels, 4) - ifv_map(teacher, labels, 4)).pow(2)
    assert labelled.any() and (~labelled).any()
    loss = ifvd_loss(student, teacher, labels, 4)
    assert loss.item() == pytest.approx((difference[labelled].sum() / difference.numel()).item(), rel=1e-6)


def test_ignored_pixels_do_not_affect_the_loss(seg_output):
    student, teacher = seg_output(STUDENT, seed=1), seg_output(TEACHER, seed=2)
    labels = block_labels(2, 19, seed=6, ignore_fraction=0.4)
    ignored = (labels[:, ::8, ::8] == 255)[:, None].expand_as(student.features["decoder"])
    changed = student.features["decoder"].clone()
    changed[ignored] = torch.randn(int(ignored.sum())) * 100
    before = ifvd_loss(student.features["decoder"], teacher.features["decoder"], labels, 19)
    after = ifvd_loss(changed, teacher.features["decoder"], labels, 19)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


def test_zero_for_identical_features_and_all_ignored_labels():
    features = torch.randn(2, 6, 8, 8, requires_grad=True)
    labels = block_labels(2, 19, seed=7)
    assert ifvd_loss(features, features.detach().repeat(1, 3, 1, 1) * 2.0, labels, 19).item() == pytest.approx(0.0, abs=1e-10)
    ignored = torch.full((2, 64, 64), 255, dtype=torch.long)
    loss = ifvd_loss(features, torch.randn(2, 4, 8, 8), ignored, 19)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(features.grad).all()


def test_distiller_weight_gradients_and_batch_one(seg_output):
    distiller = build_term("ifvd", {}, STUDENT, TEACHER)
    assert distiller.weight == 200.0
    for batch in (2, 1):
        student, teacher = seg_output(STUDENT, batch=batch, grad=True), seg_output(TEACHER, batch=batch, seed=1)
        labels = block_labels(batch, 19, seed=8)
        loss = distiller(student, teacher, labels)["ifvd"]
        expected = 200.0 * ifvd_loss(student.features["decoder"], teacher.features["decoder"], labels, 19)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and loss.item() > 0
        loss.backward()
        assert student.features["decoder"].grad.abs().sum() > 0
        assert student.features["c3"].grad is None and student.logits.grad is None


def test_deterministic_and_state_dict_round_trip(seg_output):
    first = build_term("ifvd", {"weight": 20.0}, STUDENT, TEACHER)
    second = build_term("ifvd", {"weight": 20.0}, STUDENT, TEACHER)
    second.load_state_dict(first.state_dict())
    student, teacher, labels = seg_output(STUDENT), seg_output(TEACHER, seed=1), block_labels(2, 19)
    assert torch.equal(first(student, teacher, labels)["ifvd"], second(student, teacher, labels)["ifvd"])


@pytest.mark.parametrize("options", [{"feature": "c5"}, {"lambda_ifv": 200}])
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        build_term("ifvd", options, STUDENT, TEACHER)


def test_configs_build_with_documented_defaults(method_yaml):
    ifvd = build(method_yaml("ifvd"), STUDENT, TEACHER).terms
    assert set(ifvd) == {"ifvd"} and ifvd["ifvd"].weight == 200.0 and ifvd["ifvd"].feature == "decoder"
    cfg = method_yaml("ifvd_published")
    cfg.terms.adv.d_conv_dim = 8
    published = build(cfg, STUDENT, TEACHER).terms
    assert set(published) == {"kd", "ifvd", "adv"}
    assert published["ifvd"].weight == 20.0 and published["adv"].loss_type == "hinge"
    assert published["adv"].weight == 0.001 and published["adv"].d_weight == 0.1
