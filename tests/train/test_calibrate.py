"""End-to-end tests of `kdrepro calibrate` on a tiny synthetic set (seconds each)."""

from __future__ import annotations

import json

import pytest

from kdrepro.config import load_config
from kdrepro.errors import ConfigError
from kdrepro.train.run import train

pytestmark = pytest.mark.slow


def test_calibrate_interleaves_and_matches_budgets(tiny_teacher, tmp_path):
    from kdrepro.train.calibrate import calibrate

    output = tmp_path / "calibration.json"
    overrides = [*tiny_teacher, "calibrate.methods=[none,kd,cwd]", "calibrate.warmup=1", "calibrate.rounds=2",
                 "calibrate.iterations_per_round=2", "calibrate.reference_method=null", f"calibrate.output={output}"]
    table = calibrate(load_config(overrides), lambda name: load_config([*overrides, f"method={name}"]))
    assert json.loads(output.read_text())["matched"] == table["matched"]
    methods = table["methods"]
    assert set(methods) == {"none", "kd", "cwd"}
    for entry in methods.values():
        assert entry["samples"] == 4 and entry["seconds_per_iteration"] > 0 and entry["flops_per_iteration"] > 0
    # the teacher forward is part of every KD method's cost and absent from the student alone
    assert methods["none"]["phase_median_seconds"]["teacher"] == 0
    assert methods["kd"]["phase_median_seconds"]["teacher"] > 0
    assert methods["kd"]["flops_per_iteration"] > methods["none"]["flops_per_iteration"]
    matched = table["matched"]
    reference = max(methods, key=lambda m: methods[m]["seconds_per_iteration"])
    assert matched["reference_method"] == reference and matched["iterations"][reference] == 4
    # a calibrated run trains exactly its matched iteration count
    run = train(load_config([*tiny_teacher, "method=none", "budget=calibrated", f"budget.calibration={output}", f"out_dir={tmp_path / 'run'}"]))
    assert run["iterations"] == matched["iterations"]["none"]
    # the setting it measured is recorded, and a run of another batch size is refused in one line, before training
    assert table["measured_setting"]["batch_size"] == 2 and table["measured_setting"]["crop_size"] == [32, 64]
    other = [*tiny_teacher, "method=none", "budget=calibrated", f"budget.calibration={output}", "loader.batch_size=4"]
    with pytest.raises(ConfigError, match=r"measured with batch_size 2 \(this run: 4\)") as error:
        train(load_config([*other, f"out_dir={tmp_path / 'other'}"]))
    assert "\n" not in str(error.value) and not (tmp_path / "other").exists()


def test_calibrate_writes_per_method_files_and_remeasures_only_changed_methods(tiny_teacher, tmp_path):
    from kdrepro.train.calibrate import calibrate

    output = tmp_path / "calibration.json"
    base = [*tiny_teacher, "calibrate.warmup=1", "calibrate.rounds=1", "calibrate.iterations_per_round=2",
            "calibrate.reference_method=kd", f"calibrate.output={output}", "calibrate.max_spread=null"]

    def run(methods, *extra):
        overrides = [*base, f"calibrate.methods=[{','.join(methods)}]", *extra]
        return calibrate(load_config(overrides), lambda name: load_config([*overrides, f"method={name}"]))

    first = run(["none", "kd", "cwd"])
    folder = tmp_path / "calibration"
    assert sorted(p.name for p in folder.glob("*.json")) == ["budget.json", "cwd.json", "kd.json", "none.json"]
    assert json.loads((folder / "budget.json").read_text())["budget_seconds"] == first["matched"]["budget_seconds"]
    before = {p.name: p.read_bytes() for p in folder.glob("*.json")}

    # cwd's temperature changes: only cwd is re-measured (with the anchor kd), the other files keep their bytes
    overrides = [*base, "calibrate.methods=[none,kd,cwd]"]
    second = calibrate(load_config(overrides), lambda name: load_config(
        [*overrides, f"method={name}", *(["method.terms.cwd.temperature=2.0"] if name == "cwd" else [])]))
    assert second["reused"] == ["kd", "none"]
    assert second["methods"]["cwd"]["rescaled"]["anchor"] == "kd"
    after = {p.name: p.read_bytes() for p in folder.glob("*.json")}
    assert after["kd.json"] == before["kd.json"] and after["none.json"] == before["none.json"]
    assert after["budget.json"] == before["budget.json"] and after["cwd.json"] != before["cwd.json"]

    # a dropped method's file goes; incremental=false re-measures everything
    third = run(["none", "kd"], "calibrate.incremental=false")
    assert third["reused"] == [] and not (folder / "cwd.json").exists()
    # training reads the folder form: budget.json + its own entry
    run_metrics = train(load_config([*tiny_teacher, "method=none", "budget=calibrated", f"budget.calibration={folder}",
                                     f"out_dir={tmp_path / 'run'}"]))
    assert run_metrics["iterations"] == third["matched"]["iterations"]["none"]

    # an entry measured under load (spread above calibrate.max_spread) is re-measured, not reused
    table = json.loads(output.read_text())
    for name, spread in (("none", 0.9), ("kd", 0.05)):
        table["methods"][name]["relative_spread"] = spread
    output.write_text(json.dumps(table))
    fourth = run(["none", "kd"], "calibrate.max_spread=0.5")
    assert fourth["reused"] == ["kd"] and fourth["methods"]["none"]["rescaled"]["anchor"] == "kd"
    assert fourth["max_spread"] == 0.5
    assert fourth["disturbed"] == {n: e["relative_spread"] for n, e in fourth["methods"].items() if e["relative_spread"] > 0.5}
