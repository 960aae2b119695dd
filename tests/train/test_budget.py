import json

import pytest
from omegaconf import OmegaConf

from kdrepro.errors import ConfigError
from kdrepro.train.budget import Budget, poly_lr, resolve_budget
from kdrepro.train.calibrate import _reusable, disturbed, rotated_order


def test_poly_lr_endpoints_and_midpoint():
    assert poly_lr(0.01, 0.0) == pytest.approx(0.01)
    assert poly_lr(0.01, 1.0) == pytest.approx(1e-4)
    assert poly_lr(0.01, 0.5, power=0.9, min_lr=1e-4) == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert poly_lr(0.01, 1.7) == pytest.approx(1e-4)  # clamped


def test_iteration_budget_progress():
    budget = resolve_budget(OmegaConf.create({"kind": "iterations", "iterations": 200}), "kd")
    assert budget.progress(50, 1e9) == pytest.approx(0.25)  # seconds do not matter
    assert not budget.exhausted(199, 0.0) and budget.exhausted(200, 0.0)


def test_seconds_budget_progress_uses_train_seconds():
    budget = resolve_budget(OmegaConf.create({"kind": "seconds", "seconds": 10}), "kd")
    assert budget.progress(10_000, 2.5) == pytest.approx(0.25)  # steps do not matter
    assert budget.exhausted(1, 10.0)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"kind": "iterations", "iterations": 0}, "positive"),
        ({"kind": "iterations", "iterations": -5}, "positive"),
        ({"kind": "iterations", "iterations": None}, "positive"),
        ({"kind": "iterations", "iterations": 2.5}, "whole number"),
        ({"kind": "seconds", "seconds": "abc"}, "positive"),
        ({"kind": "weeks"}, "unknown budget kind"),
    ],
)
def test_bad_budgets_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_budget(OmegaConf.create(cfg), "kd")
    assert "\n" not in str(info.value)


def _calibration(tmp_path, methods, budget_seconds=100.0):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"methods": methods, "matched": {"budget_seconds": budget_seconds}}))
    return path


def test_calibrated_budget_divides_matched_seconds(tmp_path):
    path = _calibration(tmp_path, {"kd": {"seconds_per_iteration": 0.3}, "maskd": {"seconds_per_iteration": 0.5, "pretrain_seconds": 20}})
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(path), "multiplier": 1})
    assert resolve_budget(cfg, "kd").iterations == 333
    assert resolve_budget(cfg, "maskd").iterations == 160  # the pre-training stage is paid from the budget
    cfg.multiplier = 4
    assert resolve_budget(cfg, "kd").iterations == 1333


def test_a_step_dearer_than_the_budget_trains_once_and_says_so(tmp_path):
    path = _calibration(tmp_path, {"skd": {"seconds_per_iteration": 3.0}}, budget_seconds=2.0)
    budget = resolve_budget(OmegaConf.create({"kind": "calibrated", "calibration": str(path), "multiplier": 1}), "skd")
    assert budget.iterations == 1 and "over budget" in budget.source


def test_the_over_budget_warning_is_given_once_per_process(tmp_path, caplog):
    """Every seed's run of a stage resolves the same budget: the user reads the warning once."""
    path = _calibration(tmp_path, {"skd": {"seconds_per_iteration": 3.0}}, budget_seconds=2.5)
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(path), "multiplier": 1})
    with caplog.at_level("WARNING", logger="kdrepro.budget"):
        assert [resolve_budget(cfg, "skd").iterations for _ in range(2)] == [1, 1]
    assert [record.getMessage() for record in caplog.records] == [
        "the matched budget of 2.5 s x 1 buys no whole iteration of 'skd' (3.00 s each): training 1"]


def test_calibrated_budget_errors(tmp_path):
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="run `kdrepro calibrate`"):
        resolve_budget(cfg, "kd")
    cfg.calibration = str(_calibration(tmp_path, {"kd": {"seconds_per_iteration": 0.3}}))
    with pytest.raises(ConfigError, match="no entry for method 'cwd'"):
        resolve_budget(cfg, "cwd")


def test_rotated_order_gives_each_method_each_position():
    names = ["a", "b", "c"]
    rounds = [rotated_order(names, r) for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(r[position] for r in rounds) == names


def test_disturbed_entries_are_flagged_and_not_reused():
    previous = {"none": {"fingerprint": "a", "seconds_per_iteration": 1.0, "relative_spread": 0.9},
                "kd": {"fingerprint": "b", "seconds_per_iteration": 2.0, "relative_spread": 0.1},
                "cwd": {"fingerprint": "c", "seconds_per_iteration": 1.5, "relative_spread": 0.5}}
    assert disturbed(previous, 0.5) == {"none": 0.9}  # strictly above the threshold
    assert disturbed(previous, None) == {}
    fingerprints = {"none": "a", "kd": "b", "cwd": "c"}
    assert _reusable(previous, fingerprints, None, None) == (["none", "kd", "cwd"], "kd")
    assert _reusable(previous, fingerprints, None, 0.5) == (["kd", "cwd"], "kd")
    # a disturbed anchor cannot rescale anything: everything is re-measured
    assert _reusable(previous, fingerprints, None, 0.05) == ([], None)


def test_budget_describe():
    assert "100 iterations" in Budget("iterations", iterations=100).describe()


@pytest.mark.parametrize("seconds", [-0.2, 0.0, "fast", None, float("nan")])
def test_a_calibration_with_impossible_seconds_is_refused(tmp_path, seconds):
    path = _calibration(tmp_path, {"kd": {"seconds_per_iteration": seconds}})
    with pytest.raises(ConfigError, match=r"kd's seconds_per_iteration is .*, not a positive time; .* re-run `kdrepro calibrate`") as info:
        resolve_budget(OmegaConf.create({"kind": "calibrated", "calibration": str(path)}), "kd")
    assert "\n" not in str(info.value)


def _run_config(calibration, **changes):
    from kdrepro.config import load_config

    overrides = ["profile=smoke", "method=kd", "budget=calibrated", f"budget.calibration={calibration}"]
    return load_config([*overrides, *(f"{key}={value}" for key, value in changes.items())])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loader.batch_size": 8}, "batch_size 2 (this run: 8)"),
        ({"dataset.crop_size": "[64,128]"}, "crop_size [32, 64] (this run: [64, 128])"),
        ({"student.base_width": 16}, "student pspnet_r18 (base width 8) (this run: pspnet_r18 (base width 16))"),
        ({"teacher.base_width": 16}, "teacher pspnet_r101 (base width 8) (this run: pspnet_r101 (base width 16))"),
        ({"precision": "bf16"}, "precision fp32 (this run: bf16)"),
        ({"profile": "synthetic"}, "crop_size [32, 64] (this run: [64, 128])"),
    ],
)
def test_a_calibration_of_another_setting_is_refused_unless_allowed(tmp_path, change, message):
    from kdrepro.train.calibration_check import SETTING_KEY, check_calibration, measured_setting

    folder = tmp_path / "calibration"
    folder.mkdir()
    measured = _run_config(folder, precision="fp32")
    setting = measured_setting(measured, "cpu", 1, uses_teacher=True)
    (folder / "budget.json").write_text(json.dumps({"budget_seconds": 1.0, SETTING_KEY: setting}))
    check_calibration(measured, "cpu", 1, True)  # the setting it measured: fine
    run = _run_config(folder, **{"precision": "fp32", **change})
    with pytest.raises(ConfigError, match="budget.allow_calibration_mismatch=true") as info:
        check_calibration(run, "cpu", 1, True)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"device cpu \(this run: cuda\)"):
        check_calibration(measured, "cuda", 1, True)
    allowed = _run_config(folder, **{"precision": "fp32", **change, "budget.allow_calibration_mismatch": "true"})
    check_calibration(allowed, "cpu", 1, True)
    (folder / "budget.json").write_text(json.dumps({"budget_seconds": 1.0}))  # from before the record: not checked
    check_calibration(run, "cpu", 1, True)
