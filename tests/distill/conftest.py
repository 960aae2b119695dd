"""Factories shared by the method tests (``seg_output``, the seeded model outputs, is in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from omegaconf import DictConfig, OmegaConf

from kdrepro.config import CONF_DIR


@pytest.fixture
def method_yaml() -> Callable[[str], DictConfig]:
    """``method_yaml(name)``: the shipped method config ``kdrepro/conf/method/<name>.yaml``, as written, its
    interpolations resolved as for a standalone file (a critic's width falls back to the paper's 64)."""

    def load(name: str) -> DictConfig:
        return OmegaConf.create(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"), resolve=True))

    return load
