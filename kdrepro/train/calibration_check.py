"""A calibration is trusted only for runs like the ones it measured.

``kdrepro calibrate`` records the setting it measured (:func:`measured_setting`: dataset, crop, batch, the two
models, precision, device type, number of processes) in ``calibration.json`` and ``calibration/budget.json``. A
compute-matched run checks it against its own config before anything is trained (:func:`check_calibration`): a
calibration from another profile, batch size, model or device prices iterations that this run does not take, so it
is a one-line error. ``budget.allow_calibration_mismatch=true`` uses it anyway (e.g. a deliberate transfer of one
machine's budget to another); ``budget.allow_world_size_mismatch=true`` does the same for the number of processes.
Tables written before the record existed are not checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import SETTING_KEY

__all__ = ["SETTING_KEY", "check_calibration", "differences", "measured_setting", "recorded_setting"]


def _model(model_cfg: Any) -> str:
    return f"{model_cfg.name} (base width {model_cfg.base_width})"


def measured_setting(cfg: DictConfig, device_type: str, world_size: int, uses_teacher: bool) -> dict[str, Any]:
    """What a calibration's seconds per iteration hold for (and a run must match)."""
    return {
        "dataset": str(cfg.dataset.name),
        "num_classes": int(cfg.dataset.num_classes),
        "crop_size": [int(v) for v in cfg.dataset.crop_size],
        "batch_size": int(cfg.loader.batch_size),
        "student": _model(cfg.student),
        "teacher": _model(cfg.teacher) if uses_teacher else None,
        "precision": str(cfg.get("precision", "fp32")),
        "device": device_type,
        "world_size": world_size,
    }


def recorded_setting(path: Path) -> dict[str, Any] | None:
    """The setting a calibration (``calibration.json`` or the folder beside it) records; None if it has none."""
    source = path / "budget.json" if path.is_dir() else path
    try:
        setting = json.loads(source.read_text()).get(SETTING_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # a missing or malformed file is calibrated_budget's one-line error
    return setting if isinstance(setting, dict) else None


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key <recorded> here, <current> in this run`` for each setting that differs (world size excluded: it has
    its own flag); the teacher only when both sides distil from one."""
    found = []
    for key, value in current.items():
        if key == "world_size" or key not in recorded:
            continue
        if key == "teacher" and (value is None or recorded[key] is None):
            continue
        if recorded[key] != value:
            found.append(f"{key} {recorded[key]} (this run: {value})")
    return found


def check_calibration(cfg: DictConfig, device_type: str, world_size: int, uses_teacher: bool) -> None:
    """Refuse a compute-matched run whose calibration measured another setting (see the module docstring)."""
    budget = cfg.budget
    if str(budget.get("kind")) != "calibrated" or budget.get("allow_calibration_mismatch", False):
        return
    path = Path(str(budget.get("calibration")))
    recorded = recorded_setting(path)
    if recorded is None:
        return
    found = differences(recorded, measured_setting(cfg, device_type, world_size, uses_teacher))
    if found:
        raise ConfigError(
            f"calibration {path} was measured with {'; '.join(found)}, so its iteration costs are not this run's; "
            "re-calibrate with this run's settings (`kdrepro calibrate` with the same overrides, or `dvc repro "
            "calibrate`), or set budget.allow_calibration_mismatch=true to use it anyway"
        )
