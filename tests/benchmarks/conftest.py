"""The benchmark scripts import their shared helper (``benchmarks/interleaved.py``) as a top-level module, as they
do when run as ``python benchmarks/<script>.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (not run as a script)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def overhead() -> ModuleType:
    return load_script("overhead")


@pytest.fixture(scope="session")
def throughput() -> ModuleType:
    return load_script("throughput")


@pytest.fixture(scope="session")
def cost_fidelity() -> ModuleType:
    return load_script("cost_fidelity")
