"""One battery over every method config and every registered term, as timm tests every registered model."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from kdrepro import distill
from kdrepro.config import load_config, options
from kdrepro.models.output import SegOutput

STUDENT = {"c1": 8, "c2": 16, "c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c1": 16, "c2": 32, "c3": 64, "c4": 128, "decoder": 32, "logits": 19}
METHOD_CONFIGS = [name for name in options("method") if name != "none"]
#: Terms whose loss is exactly zero when student and teacher outputs are identical (same channels, no projector).
ZERO_WHEN_EQUAL = {"kd", "cwd", "dist", "at", "ifvd", "bpkd"}


def method_cfg(name: str) -> dict:
    cfg = OmegaConf.to_container(load_config([f"method={name}", "reference_iterations=8"]).method, resolve=True)
    # keep memory banks tiny in tests
    for options_ in (cfg.get("terms") or {}).values():
        for key in list(options_ or {}):
            if "queue" in key or "memory_size" in key:
                options_[key] = min(int(options_[key]), 64)
            if "contrast_size" in key:
                options_[key] = min(int(options_[key]), 16)
    return cfg


def target(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 19, (batch, size, size), generator=generator)
    labels[:, :4, :] = 255
    return labels


def build(name: str, student=STUDENT, teacher=TEACHER) -> distill.CompositeDistiller:
    torch.manual_seed(0)
    return distill.build(method_cfg(name), student, teacher)


def test_every_config_names_registered_terms():
    known = set(distill.available())
    for name in METHOD_CONFIGS:
        cfg = method_cfg(name)
        assert cfg["name"] == name, f"{name}.yaml must say name: {name}"
        assert set(cfg["terms"]) <= known, f"{name}.yaml uses unknown terms {set(cfg['terms']) - known}"


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_finite_loss_and_gradients_reach_student_and_method(seg_output, name):
    distiller = build(name)
    student, teacher = seg_output(STUDENT, grad=True, seed=1), seg_output(TEACHER, seed=2)
    with torch.no_grad():  # teachers run without autograd
        teacher = SegOutput(teacher.logits.clone(), None, {k: v.clone() for k, v in teacher.features.items()})
    for _ in range(max(distiller.pretrain_iterations and 1, 0)):
        distiller.pretrain_step(teacher, target())
    losses = distiller(student, teacher, target())
    assert losses, f"{name} returned no loss terms"
    for term, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{name}: term {term} = {value}"
    total = sum(losses.values())
    total.backward()
    grads = [t.grad for t in [student.logits, *student.features.values()] if t.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads), f"{name}: no gradient reaches the student"
    own = [p for p in distiller.student_parameters() if p.requires_grad]
    if own:
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in own), f"{name}: its own parameters get no gradient"


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_batch_size_one(seg_output, name):
    distiller = build(name)
    losses = distiller(seg_output(STUDENT, batch=1, grad=True), seg_output(TEACHER, batch=1, seed=3), target(batch=1))
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_deterministic_with_seed_and_state_dict_round_trip(seg_output, name):
    first = build(name)
    second = build(name)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    second.load_extra_state(copy.deepcopy(first.extra_state()))
    student, teacher, labels = seg_output(STUDENT, seed=4), seg_output(TEACHER, seed=5), target(seed=6)
    torch.manual_seed(123)
    a = first(student, teacher, labels)
    torch.manual_seed(123)
    b = second(student, teacher, labels)
    assert a.keys() == b.keys()
    for term in a:
        assert torch.allclose(a[term], b[term]), f"{name}: term {term} differs after a state_dict round trip"


@pytest.mark.parametrize("term", sorted(ZERO_WHEN_EQUAL & set(distill.available())))
def test_zero_loss_when_student_equals_teacher(seg_output, term):
    distiller = distill.build({"name": term, "terms": {term: {}}}, TEACHER, TEACHER)
    same = seg_output(TEACHER, seed=7)
    losses = distiller(same, same, target())
    for name, value in losses.items():
        assert float(value) == pytest.approx(0.0, abs=1e-5), f"{term}: {name} = {float(value)} for identical outputs"
