"""Which config keys retrain a run, re-measure a method's cost, both or neither (kdrepro/train/effects.py).

The property: for every key of every profile's composed config, changing its value changes a run's identity
exactly when the key is classified ``retrain`` and the calibration fingerprint exactly when it is classified
``recalibrate``. The pipeline side (which DVC stages rerun) is in tests/pipeline/test_dvc.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from kdrepro.config import load_config, options
from kdrepro.train.calibrate import fingerprint
from kdrepro.train.effects import EFFECTS, RECALIBRATE, RETRAIN, effect, leaf_keys
from kdrepro.train.run_folder import identity

CPU = torch.device("cpu")
PROFILES = sorted(options("profile"))


def _classified(path: str) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:end]) in EFFECTS for end in range(len(parts), 0, -1))


@pytest.mark.parametrize("profile", PROFILES)
def test_every_config_key_is_classified(profile):
    for method in ("none", "kd", "cirkd", "maskd"):
        container = OmegaConf.to_container(load_config([f"profile={profile}", f"method={method}"]), resolve=True)
        unclassified = [path for path in leaf_keys(container) if not _classified(path)]
        assert not unclassified, f"classify these keys in kdrepro/train/effects.py EFFECTS: {unclassified}"


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["changed"]
    return 1  # None


def _with(cfg, path: str, value: Any):
    changed = cfg.copy()
    with open_dict(changed):
        OmegaConf.update(changed, path, value, merge=False)
    return changed


@pytest.mark.parametrize("method", ["kd", "none"])
def test_changing_a_key_retrains_or_recalibrates_exactly_as_classified(method):
    cfg = load_config(["profile=smoke", f"method={method}", "teacher_checkpoint=runs/teacher/checkpoint.pt", "seeds=[0,1]"])
    container = OmegaConf.to_container(cfg, resolve=False)
    base_identity, base_fingerprint = identity(cfg), fingerprint(cfg, CPU)
    wrong = []
    for path in leaf_keys(container):
        value = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, path)}), resolve=True)["v"]
        changed = _with(cfg, path, _changed(value))
        expected = effect(path)
        if method == "none" and path.split(".")[0] in ("teacher", "teacher_checkpoint"):
            expected = frozenset()  # the student alone never reads the teacher
        retrains = identity(changed) != base_identity
        recalibrates = fingerprint(changed, CPU) != base_fingerprint
        if retrains != (RETRAIN in expected) or recalibrates != (RECALIBRATE in expected):
            wrong.append(f"{path}: retrains={retrains} recalibrates={recalibrates}, classified {sorted(expected)}")
    assert not wrong, wrong


def test_adding_a_seed_keeps_every_fingerprint():
    for method in ("none", "kd", "cwd"):
        one = fingerprint(load_config(["profile=smoke", f"method={method}", "seeds=[0]"]), CPU)
        two = fingerprint(load_config(["profile=smoke", f"method={method}", "seeds=[0,1]"]), CPU)
        assert one == two, method


@pytest.mark.parametrize("key", ["eval_points=3", "checkpoint_every_seconds=5", "optim.lr=0.5", "calibrate.max_spread=0.1"])
def test_keys_that_do_not_change_a_step_keep_the_fingerprint(key):
    base = load_config(["profile=smoke", "method=kd"])
    assert fingerprint(load_config(["profile=smoke", "method=kd", key]), CPU) == fingerprint(base, CPU)


def test_student_alone_ignores_the_teacher_path_in_its_identity():
    without = load_config(["profile=smoke", "method=none"])
    with_teacher = load_config(["profile=smoke", "method=none", "teacher_checkpoint=runs/teacher/checkpoint.pt"])
    assert identity(without) == identity(with_teacher)
    kd = load_config(["profile=smoke", "method=kd", "teacher_checkpoint=a.pt"])
    assert identity(kd) != identity(_with(kd, "teacher_checkpoint", "b.pt"))
