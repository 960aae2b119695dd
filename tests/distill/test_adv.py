"""The adversarial term (kdrepro.distill.adv): the critic, its losses and penalty, its own optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdrepro.distill import build_term
from kdrepro.distill.adv import Discriminator, critic_loss, generator_loss, gradient_penalty
from kdrepro.errors import ConfigError

STUDENT = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}
SMALL_CRITIC = {"d_conv_dim": 8}


def labels(batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, 64, 64, dtype=torch.long)

@pytest.mark.parametrize(("size", "expected"), [((65, 65), (1, 1)), ((64, 128), (1, 5)), ((8, 8), (1, 1)), ((4, 12), (1, 9))])
def test_discriminator_output_size(size, expected):
    critic = Discriminator(num_classes=3, conv_dim=8)
    assert critic(torch.randn(2, 3, *size)).shape == (2, 1, *expected)
    assert hasattr(critic.block1[0], "parametrizations")  # spectral norm on the strided convolutions


def test_critic_and_generator_losses_hand_computed():
    student, teacher = torch.tensor([-2.0, 0.0]), torch.tensor([0.5])
    assert critic_loss(student, teacher, "wgan-gp").item() == pytest.approx(-1.0 - 0.5)
    assert critic_loss(student, teacher, "hinge").item() == pytest.approx(0.5 + 0.5)  # relu(0.5); mean(relu(-1), relu(1))
    assert generator_loss(student).item() == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        critic_loss(student, teacher, "lsgan")


class LinearCritic(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).flatten(1).sum(1)


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    critic = LinearCritic((3, 2, 2))
    student, teacher = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    penalty = gradient_penalty(critic, student, teacher)
    expected = (critic.weight.norm() - 1.0) ** 2  # ∇_x D = weight at every interpolate
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()  # second-order: the penalty trains the critic
    expected_grad = 2 * (critic.weight.norm() - 1.0) * critic.weight / critic.weight.norm()
    assert torch.allclose(critic.weight.grad, expected_grad.detach(), atol=1e-5)


def test_adv_student_term_and_critic_step(seg_output):
    torch.manual_seed(0)
    adv = build_term("adv", {**SMALL_CRITIC, "weight": 0.001}, STUDENT, TEACHER)
    student, teacher = seg_output(STUDENT, grad=True), seg_output(TEACHER, seed=1)
    critic_before = copy.deepcopy(adv.discriminator)  # each forward advances the spectral-norm power iteration
    loss = adv(student, teacher, labels())["adv"]
    assert loss.item() == pytest.approx(-0.001 * critic_before(student.logits).mean().item(), rel=1e-5)
    loss.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.discriminator.parameters())  # only the critic's own step trains it
    assert all(p.requires_grad for p in adv.discriminator.parameters())
    assert list(adv.student_parameters()) == []
    assert {id(p) for p in adv.separately_optimized_parameters()} == {id(p) for p in adv.discriminator.parameters()}
    before = [p.detach().clone() for p in adv.discriminator.parameters()]
    logs = adv.extra_step(student.detach(), teacher, progress=0.5)
    assert logs["d_lr"] == pytest.approx(4e-4 * 0.5**0.9) and logs["d_gradient_penalty"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, adv.discriminator.parameters(), strict=True))
    assert adv.current_d_lr(None) == pytest.approx(4e-4)


def test_hinge_critic_has_no_penalty_and_constant_lr(seg_output):
    adv = build_term("adv", {**SMALL_CRITIC, "loss_type": "hinge", "d_lr_schedule": "constant"}, STUDENT, TEACHER)
    logs = adv.extra_step(seg_output(STUDENT).detach(), seg_output(TEACHER, seed=1), progress=0.9)
    assert logs["d_gradient_penalty"] == 0.0 and logs["d_lr"] == pytest.approx(4e-4)


def test_adv_state_round_trip_gives_identical_next_step(seg_output):
    torch.manual_seed(0)
    first = build_term("adv", SMALL_CRITIC, STUDENT, TEACHER)
    student, teacher = seg_output(STUDENT, batch=1).detach(), seg_output(TEACHER, batch=1, seed=1)
    first.extra_step(student, teacher)
    second = build_term("adv", SMALL_CRITIC, STUDENT, TEACHER)
    second.load_state_dict(first.state_dict())
    second.load_extra_state(first.extra_state())
    for distiller in (first, second):
        torch.manual_seed(7)  # the gradient penalty draws its interpolation weights
        distiller.extra_step(student, teacher)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert second.optimizer.state_dict()["state"]  # Adam moments were restored, not re-initialised
