"""Channel-wise distillation (CWD): loss values against explicit loops, the distiller's terms, projector, configs."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.distill import available, build, build_term
from kdrepro.distill.cwd import cwd_loss
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

STUDENT_CHANNELS = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER_CHANNELS = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def make_output(channels: dict[str, int], batch: int = 2, size: int = 8, grad: bool = False) -> SegOutput:
    def tensor(num_channels: int) -> torch.Tensor:
        return torch.randn(batch, num_channels, size, size, requires_grad=grad)

    features = {name: tensor(channels[name]) for name in ("c3", "c4", "decoder")}
    return SegOutput(logits=tensor(channels["logits"]), aux_logits=tensor(channels["logits"]), features=features)


def explicit_cwd(
    student: torch.Tensor, teacher: torch.Tensor, tau: float, divisor_channels: int | None = None
) -> float:
    """τ²/(N·C) Σ_n Σ_c Σ_i p_t log(p_t/p_s), with spatial softmaxes written out element by element."""
    batch, channels = student.shape[:2]
    s, t = student.flatten(2).tolist(), teacher.flatten(2).tolist()
    total = 0.0
    for n in range(batch):
        for c in range(channels):
            z_s = sum(math.exp(v / tau) for v in s[n][c])
            z_t = sum(math.exp(v / tau) for v in t[n][c])
            for v_s, v_t in zip(s[n][c], t[n][c], strict=True):
                p_s, p_t = math.exp(v_s / tau) / z_s, math.exp(v_t / tau) / z_t
                total += p_t * math.log(p_t / p_s)
    return total * tau**2 / (batch * (divisor_channels or channels))


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_loss_matches_explicit_loops(tau: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2, 3, dtype=torch.float64), torch.randn(2, 3, 2, 3, dtype=torch.float64)
    assert cwd_loss(student, teacher, tau).item() == pytest.approx(explicit_cwd(student, teacher, tau), rel=1e-10)
    assert cwd_loss(student, teacher, tau, channels=5).item() == pytest.approx(explicit_cwd(student, teacher, tau, 5))


def test_cwd_loss_closed_form_two_locations() -> None:
    # One channel, two locations, τ=1: teacher (0, 0) -> (1/2, 1/2); student (0, ln 3) -> (1/4, 3/4).
    student = torch.tensor([[[[0.0, math.log(3.0)]]]])
    teacher = torch.zeros(1, 1, 1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert cwd_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_cwd_loss_is_zero_for_equal_maps_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    maps = torch.randn(2, 5, 4, 4)
    assert cwd_loss(maps, maps.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss(maps + 0.5 * torch.randn_like(maps), maps, 4.0).item() > 1e-4
    # a per-channel constant shift does not change a spatial softmax
    assert cwd_loss(maps + torch.randn(2, 5, 1, 1), maps, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_logit_term_value_weight_and_gradients() -> None:
    torch.manual_seed(2)
    distiller = build_term("cwd", {"weight": 3.0, "temperature": 4.0}, STUDENT_CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(STUDENT_CHANNELS, grad=True), make_output(TEACHER_CHANNELS)
    losses = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))
    assert set(losses) == {"cwd"}
    expected = 3.0 * explicit_cwd(student.logits.detach().double(), teacher.logits.double(), 4.0)
    assert losses["cwd"].item() == pytest.approx(expected, rel=1e-5)
    losses["cwd"].backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert list(distiller.parameters()) == []


def test_student_equal_to_teacher_gives_zero() -> None:
    torch.manual_seed(3)
    distiller = build_term("cwd", {}, STUDENT_CHANNELS, STUDENT_CHANNELS)
    output = make_output(STUDENT_CHANNELS)
    loss = distiller(output, output, torch.zeros(2, 64, 64, dtype=torch.long))["cwd"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_feature_term_projects_and_trains_projector() -> None:
    torch.manual_seed(4)
    options = {"weight": 3.0, "feature_weight": 50.0, "feature": "decoder"}
    distiller = build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)
    assert distiller.projector.weight.shape == (32, 8, 1, 1)
    assert distiller.projector.bias is None
    student, teacher = make_output(STUDENT_CHANNELS, grad=True), make_output(TEACHER_CHANNELS)
    losses = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))
    assert set(losses) == {"cwd", "cwd_feature"}
    projected = distiller.projector(student.features["decoder"]).detach()
    expected = 50.0 * explicit_cwd(projected.double(), teacher.features["decoder"].double(), 4.0)
    assert losses["cwd_feature"].item() == pytest.approx(expected, rel=1e-5)
    sum(losses.values()).backward()
    assert student.features["decoder"].grad.abs().sum() > 0
    assert distiller.projector.weight.grad.abs().sum() > 0
    assert {id(p) for p in distiller.student_parameters()} == {id(distiller.projector.weight)}


def test_feature_normalization_student_channels_reproduces_cirkd_scale() -> None:
    torch.manual_seed(5)
    options = {"weight": 0.0, "feature_weight": 1.0}
    paper = build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)
    cirkd = build_term(
        "cwd", {**options, "feature_normalization": "student_channels"}, STUDENT_CHANNELS, TEACHER_CHANNELS
    )
    cirkd.load_state_dict(paper.state_dict())
    student, teacher = make_output(STUDENT_CHANNELS), make_output(TEACHER_CHANNELS)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    ratio = cirkd(student, teacher, target)["cwd_feature"] / paper(student, teacher, target)["cwd_feature"]
    assert ratio.item() == pytest.approx(32 / 8, rel=1e-5)  # N·C_teacher / N·C_student


def test_projector_norm_variant_and_no_projector_for_equal_channels() -> None:
    with_norm = build_term("cwd", {"feature_weight": 1.0, "projector_norm": True}, STUDENT_CHANNELS, TEACHER_CHANNELS)
    assert isinstance(with_norm.projector[1], torch.nn.BatchNorm2d)
    same = build_term("cwd", {"feature_weight": 1.0}, STUDENT_CHANNELS, STUDENT_CHANNELS)
    assert same.projector is None


def test_batch_size_one_and_resized_teacher() -> None:
    torch.manual_seed(6)
    distiller = build_term("cwd", {"feature_weight": 50.0}, STUDENT_CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(STUDENT_CHANNELS, batch=1, grad=True), make_output(TEACHER_CHANNELS, batch=1)
    losses = distiller(student, teacher, torch.zeros(1, 64, 64, dtype=torch.long))
    assert all(torch.isfinite(value) and value.item() > 0 for value in losses.values())
    teacher.logits = torch.randn(1, 19, 16, 16)  # e.g. a teacher at another output stride
    assert torch.isfinite(distiller(student, teacher, torch.zeros(1, 64, 64, dtype=torch.long))["cwd"])


def test_determinism_with_seed_and_state_dict_round_trip() -> None:
    options = {"feature_weight": 50.0}
    torch.manual_seed(7)
    first = build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)
    torch.manual_seed(7)
    second = build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(STUDENT_CHANNELS), make_output(TEACHER_CHANNELS)
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    assert torch.equal(first(student, teacher, target)["cwd_feature"], second(student, teacher, target)["cwd_feature"])
    torch.manual_seed(8)
    restored = build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)
    assert not torch.equal(restored.projector.weight, first.projector.weight)
    restored.load_state_dict(first.state_dict())
    assert torch.equal(
        restored(student, teacher, target)["cwd_feature"], first(student, teacher, target)["cwd_feature"]
    )


@pytest.mark.parametrize(
    "options",
    [
        {"weight": 0.0, "feature_weight": 0.0},
        {"temperature": 0.0},
        {"feature_weight": 1.0, "feature": "c5"},
        {"feature_weight": 1.0, "feature_normalization": "both"},
    ],
)
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        build_term("cwd", options, STUDENT_CHANNELS, TEACHER_CHANNELS)


def test_method_configs_hold_the_released_defaults(method_yaml) -> None:
    authors = OmegaConf.to_container(method_yaml("cwd"))
    assert authors["terms"]["cwd"]["weight"] == 3.0 and authors["terms"]["cwd"]["temperature"] == 4.0
    mmrazor = OmegaConf.to_container(method_yaml("cwd_mmrazor"))
    assert mmrazor["terms"]["cwd"] == {"weight": 5.0, "temperature": 1.0}
    published = OmegaConf.to_container(method_yaml("cwd_published"))
    assert set(published["terms"]) == {"kd", "cwd", "adv"}
    assert published["terms"]["cwd"]["feature_weight"] == 50.0 and published["terms"]["kd"]["weight"] == 1.0
    for config in (authors, mmrazor):
        assert len(list(build(config, STUDENT_CHANNELS, TEACHER_CHANNELS).terms)) == 1
    published_terms = {
        name: options for name, options in published["terms"].items() if name != "adv" or "adv" in available()
    }
    built = build({"terms": published_terms}, STUDENT_CHANNELS, TEACHER_CHANNELS)
    assert built.terms["cwd"].projector is not None
