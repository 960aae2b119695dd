"""DIST: Pearson relations against numpy's corrcoef, segmentation reshaping, auxiliary term, distiller, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.distill import build, build_term
from kdrepro.distill.dist import dist_loss, inter_class_relation, intra_class_relation, pearson_correlation
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

CHANNELS = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER_CHANNELS = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


def make_output(batch: int = 2, size: int = 8, grad: bool = False, aux: bool = True) -> SegOutput:
    def tensor(channels: int) -> torch.Tensor:
        return torch.randn(batch, channels, size, size, requires_grad=grad)

    return SegOutput(logits=tensor(19), aux_logits=tensor(19) if aux else None, features={"decoder": tensor(8)})


def numpy_softmax(logits: np.ndarray, tau: float) -> np.ndarray:
    scaled = np.exp(logits / tau - (logits / tau).max(axis=1, keepdims=True))
    return scaled / scaled.sum(axis=1, keepdims=True)


def numpy_dist(student: torch.Tensor, teacher: torch.Tensor, beta: float, gamma: float, tau: float) -> float:
    """DIST with an explicit pixel loop and numpy's corrcoef (instances = pixels of all images)."""
    batch, classes, height, width = student.shape
    rows_s, rows_t = [], []
    for n in range(batch):
        for i in range(height):
            for j in range(width):
                rows_s.append(student[n, :, i, j].double().numpy())
                rows_t.append(teacher[n, :, i, j].double().numpy())
    probs_s, probs_t = numpy_softmax(np.stack(rows_s), tau), numpy_softmax(np.stack(rows_t), tau)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(probs_s, probs_t, strict=True)])
    intra = 1 - np.mean([np.corrcoef(probs_s[:, k], probs_t[:, k])[0, 1] for k in range(classes)])
    return tau**2 * (beta * inter + gamma * intra)


def test_pearson_correlation_matches_numpy_and_is_affine_invariant() -> None:
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = [np.corrcoef(a, b)[0, 1] for a, b in zip(first, second, strict=True)]
    result = pearson_correlation(torch.from_numpy(first), torch.from_numpy(second))
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-7)
    shifted = pearson_correlation(torch.from_numpy(3.0 * first + 2.0), torch.from_numpy(second))
    np.testing.assert_allclose(shifted.numpy(), expected, rtol=1e-7)


def test_relations_closed_form() -> None:
    # Arithmetic rows: reversing them gives ρ = −1 exactly, so the inter-class relation is 1 − (−1) = 2.
    probs = torch.tensor([[0.1, 0.3, 0.5], [0.2, 0.3, 0.4]], dtype=torch.float64)
    assert inter_class_relation(probs, probs).item() == pytest.approx(0.0, abs=1e-6)
    assert inter_class_relation(probs.flip(1), probs).item() == pytest.approx(2.0, abs=1e-6)
    # Columns over the two instances: (0.5, 0.4) vs (0.1, 0.2) -> −1; constant (0.3, 0.3) -> 0 (ε guard); -> −1.
    assert intra_class_relation(probs.flip(1), probs).item() == pytest.approx(1 - (-2 / 3), abs=1e-5)


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_loss_matches_pixel_loop(beta: float, gamma: float, tau: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = numpy_dist(student, teacher, beta, gamma, tau)
    assert dist_loss(student, teacher, beta, gamma, tau).item() == pytest.approx(expected, rel=1e-6)  # ε = 1e-8


def test_dist_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 19, 8, 8)
    assert dist_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-4)
    assert dist_loss(torch.randn_like(logits), logits).item() > 0.5


def test_distiller_value_aux_term_and_gradients() -> None:
    torch.manual_seed(2)
    distiller = build_term("dist", {"aux_weight": 0.4}, CHANNELS, TEACHER_CHANNELS)  # the released train_kd.py
    student, teacher = make_output(grad=True), make_output()
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    loss = distiller(student, teacher, target)["dist"]
    main = numpy_dist(student.logits.detach(), teacher.logits, 1.0, 1.0, 1.0)
    aux = numpy_dist(student.aux_logits.detach(), teacher.aux_logits, 1.0, 1.0, 1.0)
    assert loss.item() == pytest.approx(main + 0.4 * aux, rel=1e-5)
    loss.backward()
    assert student.logits.grad.abs().sum() > 0 and student.aux_logits.grad.abs().sum() > 0
    teacher.aux_logits = None  # kdrepro's teacher in eval mode: the auxiliary term is skipped
    assert distiller(student, teacher, target)["dist"].item() == pytest.approx(main, rel=1e-5)


def test_the_default_leaves_the_auxiliary_head_alone() -> None:
    torch.manual_seed(2)
    distiller = build_term("dist", {}, CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(grad=True), make_output()
    loss = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))["dist"]
    assert loss.item() == pytest.approx(numpy_dist(student.logits.detach(), teacher.logits, 1.0, 1.0, 1.0), rel=1e-5)
    loss.backward()
    assert student.aux_logits.grad is None and not distiller.needs_teacher_aux


def test_a_fresh_heads_near_uniform_probabilities_get_a_huge_gradient() -> None:
    """Why the auxiliary term is off: ρ_p is scale-invariant, so its gradient grows like 1 / ‖x − x̄‖. Logits of a
    head just initialised with normal(0, 0.01) weights (100x smaller here) get a gradient many times larger."""
    torch.manual_seed(5)
    teacher = torch.randn(2, 19, 16, 16) * 5
    shape = torch.randn(2, 19, 16, 16)
    norms = []
    for scale in (1.0, 0.01):
        student = (shape * scale).requires_grad_()
        dist_loss(student, teacher).backward()
        norms.append(student.grad.norm().item())
    assert norms[1] > 20 * norms[0]


def test_student_equal_to_teacher_gives_zero_and_labels_are_unused() -> None:
    torch.manual_seed(3)
    distiller = build_term("dist", {"weight": 2.0}, CHANNELS, TEACHER_CHANNELS)
    output = make_output()
    loss = distiller(output, output, torch.full((2, 64, 64), 255, dtype=torch.long))["dist"]
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    student = make_output()
    with_ignore = distiller(student, output, torch.full((2, 64, 64), 255, dtype=torch.long))["dist"]
    with_labels = distiller(student, output, torch.randint(0, 19, (2, 64, 64)))["dist"]
    assert torch.equal(with_ignore, with_labels)


def test_batch_size_one_determinism_and_state_dict() -> None:
    torch.manual_seed(4)
    distiller = build_term("dist", {}, CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(batch=1, grad=True, aux=False), make_output(batch=1, aux=False)
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    first = distiller(student, teacher, target)["dist"]
    assert torch.isfinite(first) and first.item() > 0
    restored = build_term("dist", {}, CHANNELS, TEACHER_CHANNELS)
    restored.load_state_dict(distiller.state_dict())
    assert torch.equal(restored(student, teacher, target)["dist"], first)


def test_bad_options_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        build_term("dist", {"temperature": -1.0}, CHANNELS, TEACHER_CHANNELS)
    with pytest.raises(ConfigError):
        build_term("dist", {}, CHANNELS, {**TEACHER_CHANNELS, "logits": 150})


def test_method_config_holds_the_released_defaults_without_the_auxiliary_term(method_yaml) -> None:
    config = OmegaConf.to_container(method_yaml("dist"))
    assert config["terms"]["dist"] == {
        "weight": 1.0,
        "inter_weight": 1.0,
        "intra_weight": 1.0,
        "temperature": 1.0,
        "aux_weight": 0.0,
    }
    assert build(config, CHANNELS, TEACHER_CHANNELS).terms["dist"].aux_weight == 0.0
