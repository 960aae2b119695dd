import math

import pytest
import torch

from kdrepro.distill import build
from kdrepro.distill.fitnet import fitnet_loss
from kdrepro.distill.kd import kd_loss
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

CHANNELS = {"c3": 4, "c4": 6, "decoder": 3, "logits": 2}
TEACHER_CHANNELS = {"c3": 8, "c4": 12, "decoder": 5, "logits": 2}


def _hand_kd(student, teacher, temperature):
    """Explicit per-pixel loop: Σ_k p_t log(p_t / p_s), averaged over pixels, times T²."""
    total, count = 0.0, 0
    batch, classes, height, width = student.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                s = [student[b, k, i, j].item() / temperature for k in range(classes)]
                t = [teacher[b, k, i, j].item() / temperature for k in range(classes)]
                zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
                total += sum(math.exp(t[k]) / zt * (t[k] - math.log(zt) - s[k] + math.log(zs)) for k in range(classes))
                count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_explicit_loop(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    assert float(kd_loss(student, teacher, temperature)) == pytest.approx(_hand_kd(student, teacher, temperature), rel=1e-5)


def test_kd_loss_two_class_closed_form():
    # one pixel, student uniform, teacher (ln 3, 0) -> p_t = (3/4, 1/4): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    student = torch.zeros(1, 2, 1, 1)
    teacher = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(kd_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)


def test_kd_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 19, 4, 4)
    assert float(kd_loss(logits, logits.clone(), 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_ignore_mask_excludes_pixels():
    torch.manual_seed(1)
    student, teacher = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    valid = torch.tensor([[[True, False], [False, False]]])
    expected = _hand_kd(student[..., :1, :1], teacher[..., :1, :1], 1.0)
    assert float(kd_loss(student, teacher, 1.0, valid)) == pytest.approx(expected, rel=1e-5)


def test_fitnet_loss_is_mse():
    a, b = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[0.0, 4.0]]]])
    assert float(fitnet_loss(a, b)) == pytest.approx((1 + 4) / 2)


def _outputs(requires_grad=True):
    torch.manual_seed(0)
    student = SegOutput(
        logits=torch.randn(2, 2, 4, 4, requires_grad=requires_grad),
        features={"c3": torch.randn(2, 4, 4, 4), "c4": torch.randn(2, 6, 4, 4), "decoder": torch.randn(2, 3, 4, 4, requires_grad=requires_grad)},
    )
    teacher = SegOutput(
        logits=torch.randn(2, 2, 4, 4),
        features={"c3": torch.randn(2, 8, 4, 4), "c4": torch.randn(2, 12, 4, 4), "decoder": torch.randn(2, 5, 4, 4)},
    )
    return student, teacher, torch.randint(0, 2, (2, 32, 32))


def test_composite_config_combines_weighted_terms():
    student, teacher, target = _outputs()
    distiller = build({"name": "kd_fitnet", "terms": {"kd": {"weight": 2.0}, "fitnet": {"weight": 10.0}}}, CHANNELS, TEACHER_CHANNELS)
    losses = distiller(student, teacher, target)
    assert set(losses) == {"kd", "fitnet"}
    assert losses["kd"].item() == pytest.approx(2.0 * kd_loss(student.logits, teacher.logits).item(), rel=1e-6)
    sum(losses.values()).backward()
    assert student.logits.grad is not None
    assert student.features["decoder"].grad is not None
    assert distiller.terms["fitnet"].regressor[0].weight.grad is not None


def test_none_method_has_no_terms():
    distiller = build({"name": "none", "terms": {}}, CHANNELS, CHANNELS)
    assert len(distiller.terms) == 0 and distiller.pretrain_iterations == 0 and not distiller.needs_teacher_aux
    student, teacher, target = _outputs()
    assert distiller(student, teacher, target) == {}


def test_unknown_method_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown distillation method 'bogus'.*kd"):
        build({"name": "x", "terms": {"bogus": {}}}, CHANNELS, TEACHER_CHANNELS)


def test_bad_option_is_config_error():
    with pytest.raises(ConfigError, match="bad options for distillation method 'kd'"):
        build({"name": "x", "terms": {"kd": {"tempreature": 2}}}, CHANNELS, TEACHER_CHANNELS)
