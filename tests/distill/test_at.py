"""Attention transfer (kdrepro.distill.at): hand-computed maps and losses, the Distiller, its configs."""

from __future__ import annotations

import math

import pytest
import torch

from kdrepro.distill import build, build_term
from kdrepro.distill.at import at_loss, attention_map
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def reference_at_loss(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The released at_loss written with explicit loops over batch, pixels and channels."""
    batch, _, height, width = teacher.shape
    total = 0.0
    for b in range(batch):
        maps = []
        for features in (student[b], teacher[b]):
            values = [sum(float(features[c, y, x]) ** 2 for c in range(features.shape[0])) / features.shape[0]
                      for y in range(height) for x in range(width)]
            norm = math.sqrt(sum(v * v for v in values))
            maps.append([v / norm for v in values])
        total += sum((s - t) ** 2 for s, t in zip(*maps, strict=True))
    return total / (batch * height * width)


def test_attention_map_hand_computed():
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    expected = torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0)  # mean of squares over channels, then L2-normalised
    assert torch.allclose(attention_map(features), expected)


def test_at_loss_hand_computed_and_against_loops():
    student = torch.tensor([[[[1.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0]]]])
    assert at_loss(student, teacher).item() == pytest.approx(1.0)  # maps [1, 0] and [0, 1]: mean of (1, 1)
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 3, 4, generator=generator)
    teacher = torch.randn(2, 5, 3, 4, generator=generator)
    assert at_loss(student, teacher).item() == pytest.approx(reference_at_loss(student, teacher), rel=1e-5)


def test_at_loss_is_zero_for_same_attention_with_other_channel_count():
    teacher = torch.randn(2, 64, 8, 8)
    student = teacher[:, :16].repeat(1, 4, 1, 1)  # different maps per channel, but ...
    teacher_same = student.repeat(1, 4, 1, 1)  # ... the same channel mean of squares
    assert at_loss(student, teacher_same).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss(2.0 * student, teacher_same).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert at_loss(student, teacher).item() > 0


def test_student_map_is_resized_to_teacher_size():
    student = torch.rand(1, 4, 4, 4)
    teacher = torch.rand(1, 8, 8, 8)
    loss = at_loss(student, teacher)
    # the un-normalised student map is resized to 8x8, then normalised
    upsampled = torch.nn.functional.interpolate(student.pow(2).mean(1, keepdim=True), size=(8, 8), mode="bilinear")
    manual = (torch.nn.functional.normalize(upsampled.flatten(1), dim=1) - attention_map(teacher)).pow(2).mean()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_distiller_weights_and_sums_layers_and_gradients_reach_student(seg_output):
    distiller = build_term("at", {"weight": 1000.0, "features": ["c3", "c4"]}, STUDENT, TEACHER)
    student, teacher = seg_output(STUDENT, grad=True), seg_output(TEACHER, seed=1)
    loss = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))["at"]
    expected = 1000.0 * sum(at_loss(student.features[n], teacher.features[n]) for n in ("c3", "c4"))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    for name in ("c3", "c4"):
        assert student.features[name].grad is not None and student.features[name].grad.abs().sum() > 0
    assert student.features["decoder"].grad is None
    assert list(distiller.parameters()) == []


def test_batch_size_one_and_zero_for_identical_outputs(seg_output):
    distiller = build_term("at", {}, STUDENT, STUDENT)
    student = seg_output(STUDENT, batch=1, grad=True)
    twin = SegOutput(student.logits.detach(), features={k: v.detach() for k, v in student.features.items()})
    assert distiller(student, twin, torch.zeros(1, 64, 64, dtype=torch.long))["at"].item() == pytest.approx(0.0, abs=1e-9)
    other = seg_output(STUDENT, batch=1, seed=3)
    loss = distiller(student, other, torch.zeros(1, 64, 64, dtype=torch.long))["at"]
    assert torch.isfinite(loss) and loss.item() > 0


def test_deterministic_and_state_dict_round_trip(seg_output):
    first = build_term("at", {"features": ["decoder"], "weight": 10.0}, STUDENT, TEACHER)
    second = build_term("at", {"features": ["decoder"], "weight": 10.0}, STUDENT, TEACHER)
    second.load_state_dict(first.state_dict())
    student, teacher, target = seg_output(STUDENT, seed=4), seg_output(TEACHER, seed=5), torch.zeros(2, 64, 64, dtype=torch.long)
    assert torch.equal(first(student, teacher, target)["at"], second(student, teacher, target)["at"])


@pytest.mark.parametrize("options", [{"features": ["c5"]}, {"features": []}, {"p": 0}, {"beta": 1}])
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        build_term("at", options, STUDENT, TEACHER)


def test_configs_build_with_documented_defaults(method_yaml):
    paper = build(method_yaml("at"), STUDENT, TEACHER).terms["at"]
    assert (paper.weight, paper.features, paper.p) == (1000.0, ["c3", "c4"], 2.0)
    published = build(method_yaml("at_published"), STUDENT, TEACHER)
    assert set(published.terms) == {"kd", "at"}
    assert (published.terms["at"].weight, published.terms["at"].features) == (10000.0, ["decoder"])
