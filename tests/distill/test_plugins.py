"""A method of one's own, kept outside the package, registers itself when its module is imported."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kdrepro import distill
from kdrepro.distill import base
from kdrepro.errors import ConfigError

CHANNELS = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Registrations made by a test do not outlive it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    monkeypatch.setattr(base, "_SOURCES", dict(base._SOURCES))


def documented_snippet() -> str:
    """The example of ``kdrepro.distill``'s docstring, as a user would paste it into their own file."""
    doc = distill.__doc__
    body = doc[doc.index("::\n") + 3 :]
    lines = []
    for line in body.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def import_file(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[module_name]
    return module


def test_documented_snippet_registers_by_import_and_builds_from_a_method_config(tmp_path, seg_output):
    source = tmp_path / "mymethod.py"
    source.write_text(documented_snippet())
    assert "mymethod" not in distill.available()
    import_file(source, "mymethod")
    distiller = distill.build({"name": "mine", "terms": {"mymethod": {"weight": 2.0}}}, CHANNELS, TEACHER)
    student, teacher = seg_output(CHANNELS, grad=True), seg_output(TEACHER, seed=1)
    losses = distiller(student, teacher, torch.zeros(2, 64, 64, dtype=torch.long))
    term = distiller.terms["mymethod"]
    expected = 2.0 * torch.nn.functional.mse_loss(term.projector(student.features["decoder"]), teacher.features["decoder"])
    assert set(losses) == {"mymethod"} and losses["mymethod"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["mymethod"].backward()
    assert student.features["decoder"].grad is not None and term.projector.weight.grad is not None


def test_same_file_imported_twice_replaces_another_class_under_a_taken_name_is_refused(tmp_path):
    source = tmp_path / "mymethod.py"
    source.write_text(documented_snippet())
    import_file(source, "mymethod")
    second = import_file(source, "kdrepro_plugin_mymethod")  # e.g. imported as a plugin and by a notebook
    assert base._REGISTRY["mymethod"] is second.MyMethod
    other = tmp_path / "other.py"
    other.write_text(documented_snippet().replace("class MyMethod", "class OtherMethod"))
    with pytest.raises(ConfigError, match="'mymethod' is already registered by kdrepro_plugin_mymethod.MyMethod; register other.OtherMethod"):
        import_file(other, "other")
    copy = tmp_path / "elsewhere" / "mymethod.py"  # another folder's file of the same name: another method
    copy.parent.mkdir()
    copy.write_text(documented_snippet())
    with pytest.raises(ConfigError, match="'mymethod' is already registered"):
        import_file(copy, "kdrepro_plugin_mymethod")
    with pytest.raises(ConfigError, match="'kd' is already registered by kdrepro.distill.kd.LogitKD"):
        distill.register("kd")(second.MyMethod)


def test_register_as_a_call_and_with_a_factory_function():
    class Plain(distill.Distiller):
        def __init__(self, student_channels, teacher_channels, weight=1.0):
            super().__init__()
            self.weight = weight

        def forward(self, student, teacher, target):
            return {"plain": self.weight * distill.zero_loss(student.logits)}

    assert distill.register("plain")(Plain) is Plain
    assert isinstance(distill.build_term("plain", {"weight": 3.0}, CHANNELS, TEACHER), Plain)
    distill.register("plain_factory")(lambda student_channels, teacher_channels, **options: Plain(student_channels, teacher_channels, **options))
    assert distill.build_term("plain_factory", {"weight": 2.0}, CHANNELS, TEACHER).weight == 2.0
    distill.register("not_a_distiller")(lambda student_channels, teacher_channels: torch.nn.Identity())
    with pytest.raises(ConfigError, match="'not_a_distiller' .* returned Identity, not a Distiller"):
        distill.build_term("not_a_distiller", {}, CHANNELS, TEACHER)


@pytest.mark.parametrize(("name", "factory", "message"), [
    ("my-method", distill.Distiller, "must be a Python identifier"),
    ("", distill.Distiller, "must be a Python identifier"),
    ("mine", torch.nn.Module, "needs a subclass of kdrepro.distill.Distiller"),
    ("mine", 3, "needs a subclass of kdrepro.distill.Distiller"),
])  # fmt: skip
def test_bad_registrations_are_config_errors(name, factory, message):
    with pytest.raises(ConfigError, match=message):
        distill.register(name)(factory)


def test_unknown_name_and_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="unknown distillation method 'mymethod'.*register\\('mymethod'\\).*plugins"):
        distill.build_term("mymethod", {}, CHANNELS, TEACHER)
    with pytest.raises(ConfigError, match="bad options for distillation method 'kd'.*'tau'.*valid options: weight, temperature, ignore_index"):
        distill.build_term("kd", {"tau": 4.0}, CHANNELS, TEACHER)
