"""Factories shared by the method tests: seeded model outputs and the shipped method configs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from kdrepro.config import CONF_DIR
from kdrepro.models.output import SegOutput

SegOutputFactory = Callable[..., SegOutput]


def make_seg_output(
    channels: dict[str, int], batch: int = 2, size: int = 8, grad: bool = False, seed: int = 0, aux: bool = False
) -> SegOutput:
    """A random output of a model with ``channels`` (feature name -> channels, ``logits`` -> classes).

    Every map is ``(batch, channels, size, size)`` drawn from one generator seeded with ``seed``: the features in the
    order of ``channels``, then the logits, then (with ``aux``) the auxiliary logits. ``grad`` makes them leaves that
    collect gradients, as a student's outputs.
    """
    generator = torch.Generator().manual_seed(seed)

    def tensor(count: int) -> torch.Tensor:
        return torch.randn(batch, count, size, size, generator=generator).requires_grad_(grad)

    features = {name: tensor(count) for name, count in channels.items() if name != "logits"}
    logits = tensor(channels["logits"])
    return SegOutput(logits=logits, aux_logits=tensor(channels["logits"]) if aux else None, features=features)


@pytest.fixture
def seg_output() -> SegOutputFactory:
    """``seg_output(channels, batch=2, size=8, grad=False, seed=0, aux=False)``: see :func:`make_seg_output`."""
    return make_seg_output


@pytest.fixture
def method_yaml() -> Callable[[str], DictConfig]:
    """``method_yaml(name)``: the shipped method config ``kdrepro/conf/method/<name>.yaml``, as written."""

    def load(name: str) -> DictConfig:
        return OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")

    return load
