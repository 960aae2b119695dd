"""The calibration records the device type it measured on; a compute-matched run on another type is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from smoke_pipeline import UNGUARDED

from kdrepro.cli import main
from kdrepro.errors import ConfigError
from kdrepro.train.budget import cpu_model, device_type, resolve_budget

OTHER_GPU = "NVIDIA H100 80GB HBM3"


def _calibration(tmp_path: Path, measured_on: str | None) -> Path:
    folder = tmp_path / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    budget = {"reference_method": "kd", "reference_iterations": 10, "budget_seconds": 5.0, "world_size": 1}
    if measured_on is not None:
        budget["device_type"] = measured_on
    (folder / "budget.json").write_text(json.dumps(budget))
    (folder / "kd.json").write_text(json.dumps({"seconds_per_iteration": 0.5}))
    return folder


def test_device_type_of_a_cpu_is_its_model_name():
    assert device_type("cpu") == cpu_model() != ""
    assert cpu_model() in Path("/proc/cpuinfo").read_text() or not Path("/proc/cpuinfo").exists()


def test_a_calibration_from_another_device_type_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(_calibration(tmp_path, OTHER_GPU)),
                            "allow_device_type_mismatch": False})  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(f"measured on {OTHER_GPU} but this run trains on {cpu_model()}") + ".*gpu_type"):
        resolve_budget(cfg, "kd", "cpu")
    assert resolve_budget(cfg, "kd").iterations == 10  # no device given (e.g. eval-point spacing): no check
    cfg.allow_device_type_mismatch = True
    assert resolve_budget(cfg, "kd", "cpu").iterations == 10


def test_same_device_type_or_an_older_calibration_is_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(_calibration(tmp_path / "a", cpu_model()))})
    assert resolve_budget(cfg, "kd", "cpu").iterations == 10
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(_calibration(tmp_path / "b", None))})
    assert resolve_budget(cfg, "kd", "cpu").iterations == 10


@pytest.mark.slow
def test_calibration_records_device_type_and_training_elsewhere_is_refused(tiny_teacher, tmp_path, capsys):
    output = tmp_path / "calibration.json"
    calibrate = [*tiny_teacher, "loader.batch_size=2", "threads=1", "calibrate.methods=[none,kd]", "calibrate.warmup=1",
                 "calibrate.rounds=1", "calibrate.iterations_per_round=1", f"calibrate.output={output}", *UNGUARDED]  # fmt: skip
    assert main(["calibrate", *calibrate]) == 0
    assert json.loads(output.read_text())["device_type"] == cpu_model()
    budget_file = tmp_path / "calibration" / "budget.json"
    budget = json.loads(budget_file.read_text())
    assert budget["device_type"] == cpu_model()
    budget_file.write_text(json.dumps({**budget, "device_type": OTHER_GPU}))  # as if measured on a cluster's GPU

    train = [*tiny_teacher, "method=kd", "budget=calibrated", f"budget.calibration={tmp_path / 'calibration'}"]
    capsys.readouterr()
    assert main(["train", *train, f"out_dir={tmp_path / 'refused'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: calibration") and f"measured on {OTHER_GPU}" in error and "\n" not in error
    assert not (tmp_path / "refused" / "checkpoint.pt").exists()
    # the pipeline's way: every seed of a stage, with learning-curve points (once resolved without the device)
    assert main(["train", *train, "seeds=[0,1]", "eval_points=1", f"out_dir={tmp_path / 'refused_seeds'}"]) == 2
    assert f"measured on {OTHER_GPU}" in capsys.readouterr().err
    assert main(["train", *train, "budget.allow_device_type_mismatch=true", f"out_dir={tmp_path / 'allowed'}"]) == 0
