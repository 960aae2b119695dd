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
    """``benchmarks/<name>.py`` as a module (not run as a script), registered in ``sys.modules`` before it runs, as
    an import would: a ``@dataclass`` under ``from __future__ import annotations`` (full_size.py's ``Step``) looks
    its module up there. Loaded once per session (the same module object for every test)."""
    module_name = f"benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


@pytest.fixture(scope="session")
def overhead() -> ModuleType:
    return load_script("overhead")


@pytest.fixture(scope="session")
def throughput() -> ModuleType:
    return load_script("throughput")


@pytest.fixture(scope="session")
def precision() -> ModuleType:
    return load_script("precision")


@pytest.fixture(scope="session")
def full_size() -> ModuleType:
    return load_script("full_size")


@pytest.fixture(scope="session")
def controls() -> ModuleType:
    return load_script("controls")


@pytest.fixture(scope="session")
def calibration_load() -> ModuleType:
    return load_script("calibration_load")


@pytest.fixture(scope="session")
def cost_fidelity() -> ModuleType:
    return load_script("cost_fidelity")


@pytest.fixture(scope="session")
def local_workers() -> ModuleType:
    return load_script("local_workers")


@pytest.fixture(scope="session")
def pipeline_time() -> ModuleType:
    return load_script("pipeline_time")


@pytest.fixture(scope="session")
def learning_curve() -> ModuleType:
    return load_script("learning_curve")
