"""The DVC pipeline end to end on the `smoke` profile, in a copy of the repository (minutes; CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from smoke_pipeline import copy_repository, dvc, ran_stages, write_params

from kdrepro.cli import main
from kdrepro.config import options

pytestmark = pytest.mark.slow
#: Stage name prefixes of the stages that train runs.
TRAINING = ("student@", "iter_matched@", "compute_matched@", "student_extended@", "extended@", "extended_best@")
# the names tests/cluster/test_cluster_pipeline.py imports from this module
_copy_repository, _dvc, _write_params = copy_repository, dvc, write_params


@pytest.mark.parametrize("profile", sorted(set(options("profile"))))
def test_stage_graph_resolves_for_every_profile_without_data(profile, tmp_path):
    repo = _copy_repository(tmp_path)
    _write_params(repo, profile=profile, extended={"multipliers": ["2", "4"]})  # the synthetic_study run's budgets
    dag = _dvc(repo, "dag", "--dot")
    assert dag.returncode == 0, dag.stderr
    stages = ("data", "hardware", "pretrain", "teacher", "student@iter_matched", "student@compute_matched", "calibrate",
              "iter_matched@kd", "compute_matched@cwd", "select", "student_extended@2", "extended@kd-4",
              "extended@fitnet-2", "extended_best@4", "results")
    for stage in stages:
        assert f'"{stage}"' in dag.stdout
    status = _dvc(repo, "status")
    assert status.returncode == 0, status.stderr


def test_whole_pipeline_on_the_smoke_profile(smoke_copy):
    """The shared finished run (tests/smoke_pipeline.py: SMOKE_PARAMS, the README's plugin method) holds every
    table, record and page; a second `dvc repro` runs only the hardware check; a third seed trains only itself."""
    repo = smoke_copy
    runs = pd.read_csv(repo / "results" / "smoke" / "runs.csv")
    for protocol in ("iter_matched", "compute_matched"):
        for method in ("none", "kd", "fitnet", "cwd", "mymethod"):
            assert sorted(runs[(runs.protocol == protocol) & (runs.method == method)].seed) == [0, 1], (protocol, method)
    extended = runs[runs.protocol == "extended"]
    assert sorted(extended.method.unique()) == ["cwd", "fitnet", "kd", "none"]  # cwd: the only specific method
    assert set(extended.seed) == {0, 1} and set(extended.multiplier) == {2.0}
    assert runs[runs.method == "mymethod"].family.iloc[0] == "canonical"
    selection = json.loads((repo / "results" / "smoke" / "extended_selection.json").read_text())
    assert selection["method"] == "cwd" and selection["candidates"] == ["cwd"]
    # statistics over seeds and the verdict reach the tidy tables
    stats = pd.read_csv(repo / "results" / "smoke" / "stats.csv")
    row = stats[(stats.protocol == "compute_matched") & (stats.method == "cwd")].iloc[0]
    assert row.n_seeds == 2 and {"miou_ci_low", "delta_student_mean", "delta_kd_ci_high"} <= set(stats.columns)
    verdict = json.loads((repo / "results" / "smoke" / "verdict.json").read_text())
    assert [c["id"] for c in verdict["claims"]] == ["a", "b", "c"]
    assert all(c["verdict"] in ("supported", "contradicted", "inconclusive", "cannot judge") for c in verdict["claims"])
    assert verdict["regime"]["positive_control"]["methods"] == ["kd", "cwd"] and "capacity_gap" in verdict["regime"]
    assert verdict["compute_check"]["state"] in ("passed", "failed") and len(verdict["compute_check"]["runs"]) >= 10
    if not verdict["regime"]["positive_control"]["passed"]:  # smoke numbers mean nothing: usually the case
        assert {c["verdict"] for c in verdict["claims"]} == {"cannot judge"}
    assert verdict["regime"]["seeds"] == [0, 1] and verdict["regime"]["teacher_gap"] is not None
    per_class = pd.read_csv(repo / "results" / "smoke" / "per_class.csv")
    assert len(per_class) == 7 * len(runs)  # the smoke profile scores the 7 categories
    # the compute-matched iteration counts come from calibration; the reference trains the standard schedule
    calibration = json.loads((repo / "runs" / "smoke" / "calibration.json").read_text())
    assert calibration["matched"]["reference_method"] == "kd"
    assert calibration["teacher_weights"] == "initial"  # timed before the teacher is trained, not after
    kd_run = json.loads((repo / "runs" / "smoke" / "compute_matched" / "kd" / "seed1" / "metrics.json").read_text())
    assert kd_run["iterations"] == calibration["matched"]["iterations"]["kd"] == 4
    doubled = json.loads((repo / "runs" / "smoke" / "extended" / "kd-2" / "seed0" / "metrics.json").read_text())
    assert doubled["iterations"] == 8
    for name in ("index", "cost", "matched", "extended", "curves", "qualitative"):
        assert (repo / "reports" / f"{name}.html").stat().st_size > 1000
    metrics = _dvc(repo, "metrics", "show")
    assert metrics.returncode == 0 and "compute_matched" in metrics.stdout
    plots = _dvc(repo, "plots", "show", "-o", str(repo / "plots_html"))
    assert plots.returncode == 0 and "WARNING" not in plots.stderr, plots.stderr
    assert (repo / "results" / "smoke" / "plots" / "curves" / "kd.csv").exists()
    experiments = _dvc(repo, "exp", "show", "--no-pager")
    assert experiments.returncode == 0, experiments.stderr

    hardware = json.loads((repo / "runs" / "smoke" / "hardware.json").read_text())
    assert set(hardware) == {"precision", "channels_last", "threads", "reason", "roles"}  # the decisions only, no timings
    assert kd_run["speed"]["precision"] == hardware["precision"] == calibration["speed"]["precision"]
    assert verdict["regime"]["speed"]["reason"]["precision"] == hardware["reason"]["precision"]
    second = _dvc(repo, "repro")
    assert second.returncode == 0 and ran_stages(second) == {"hardware"}, second.stdout  # checked every time; it decided before
    # a third seed trains only the new seed's runs: finished seeds are no-ops inside the persisted stage folders
    before = (repo / "runs" / "smoke" / "iter_matched" / "kd" / "seed0" / "metrics.json").read_bytes()
    _write_params(repo, seeds=[0, 1, 2])
    third = _dvc(repo, "repro", "iter_matched@kd")
    assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
    assert (repo / "runs" / "smoke" / "iter_matched" / "kd" / "seed2" / "metrics.json").exists()
    assert (repo / "runs" / "smoke" / "iter_matched" / "kd" / "seed0" / "metrics.json").read_bytes() == before


def test_failed_stage_keeps_finished_outputs_and_reruns_only_its_method(smoke_copy):
    repo = smoke_copy
    finished = [repo / "runs" / "smoke" / "teacher" / "checkpoint.pt", repo / "runs" / "smoke" / "iter_matched" / "kd" / "seed0" / "metrics.json",
                repo / "results" / "smoke" / "runs.csv", repo / "reports" / "index.html"]  # fmt: skip
    assert all(path.exists() for path in finished)
    config = repo / "kdrepro" / "conf" / "method" / "cwd.yaml"
    original = config.read_text()
    config.write_text(original.replace("temperature: 4.0", "temperature: -4.0"))  # a user's typo
    broken = _dvc(repo, "repro")
    assert broken.returncode != 0
    assert "cwd option temperature must be positive, got -4.0" in broken.stdout + broken.stderr
    assert all(path.exists() for path in finished)
    # a valid change to one method reruns that method's stages (and calibration, which re-measures only it); the
    # training stages and what they need are the subject, so the tables and pages after them are not rebuilt (~40 s)
    config.write_text(original.replace("temperature: 4.0", "temperature: 2.0"))
    changed = _dvc(repo, "repro", "--glob", *(f"{prefix}*" for prefix in TRAINING))
    config.write_text(original)
    assert changed.returncode == 0, (changed.stdout + changed.stderr)[-4000:]
    reran = ran_stages(changed)
    # exactly that method's training stages (extended_best@2 extends cwd, the selected specific method)
    assert {name for name in reran if name.startswith(TRAINING)} == {"iter_matched@cwd", "compute_matched@cwd", "extended_best@2"}, reran
    untouched = {"pretrain", "teacher", "student@iter_matched", "student@compute_matched", "iter_matched@kd",
                 "compute_matched@kd", "extended@kd-2", "iter_matched@mymethod"}
    assert not reran & untouched, reran
    assert json.loads((repo / "runs" / "smoke" / "calibration.json").read_text())["reused"] == ["fitnet", "kd", "mymethod", "none"]


def test_disturbed_calibration_is_remeasured_by_the_command_the_warning_gives(smoke_copy):
    repo = smoke_copy
    output = repo / "runs" / "smoke" / "calibration.json"
    table = json.loads(output.read_text())
    for name, entry in table["methods"].items():  # none was measured under load, the others on an idle machine
        entry["relative_spread"] = 0.9 if name == "none" else 0.0
    output.write_text(json.dumps(table))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    _write_params(repo, calibrate={**params["calibrate"], "max_spread": 0.5})
    rerun = _dvc(repo, "repro", "-f", "-s", "calibrate")  # what the warning and the cost page tell the user to run
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    after = json.loads(output.read_text())
    assert "none" not in after["reused"] and {"kd", "fitnet"} <= set(after["reused"])
    assert after["methods"]["none"]["rescaled"]["anchor"] == "kd" and after["max_spread"] == 0.5



#: Every stage whose command writes a run folder (kdrepro.train.run_folder), with one setting of its own to change.
RUN_FOLDER_STAGES = {"pretrain": ("  iterations: 6\n", "  iterations: 5\n"),
                     "teacher": ("teacher_iterations: 6\n", "teacher_iterations: 5\n")}  # fmt: skip


def test_changing_a_pretrain_and_a_teacher_setting_archives_the_old_runs_and_reruns_them(smoke_copy):
    """Every stage that writes a run folder archives a run of another config (on_config_change=archive), so an
    ordinary parameter change never stops `dvc repro`; the earlier runs are kept beside the new ones. (Reproduced up
    to the teacher: what the method stages do with a changed teacher is test_effects' and the next test's.)"""
    repo = smoke_copy
    assert (repo / "runs" / "smoke" / "teacher" / "checkpoint.pt").exists()
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in RUN_FOLDER_STAGES:
        assert "on_config_change=archive" in dvc_yaml[stage]["cmd"], stage
    profile = repo / "kdrepro" / "conf" / "profile" / "smoke.yaml"
    original = profile.read_text()
    changed = original
    for old, new in RUN_FOLDER_STAGES.values():
        assert changed.count(old) == 1, old
        changed = changed.replace(old, new)
    profile.write_text(changed)
    try:
        rerun = _dvc(repo, "repro", "teacher")
    finally:
        profile.write_text(original)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert {"pretrain", "teacher"} <= ran_stages(rerun), ran_stages(rerun)
    assert json.loads((repo / "runs" / "smoke" / "teacher" / "metrics.json").read_text())["iterations"] == 5
    assert list((repo / "runs" / "smoke" / "pretrain").glob("student.superseded-*/backbone.pth"))  # kept, not lost
    assert list((repo / "runs" / "smoke").glob("teacher.superseded-*/checkpoint.pt"))
    assert (repo / "reports" / "index.html").exists()

@pytest.mark.parametrize(
    "params, message",
    [
        ("profile: marsscapes\n", "unknown profile 'marsscapes'"),
        ("profile: synthetic\nmethods: [kd, bogus]\n", "unknown method(s) ['bogus']"),
        ("profile: synthetic\nmethods: [kd\n", "is not valid YAML"),
        ("profile: synthetic\nmethods: [none, kd]\n", "the student alone is the `student` stage"),
        ("profile: synthetic\nreference_iterations: 0\n", "reference_iterations must be a positive whole number"),
        ("profile: synthetic\nmethod: [kd]\n", "unknown key(s) ['method']"),
        ("profile: synthetic\nmethods: [kd, fitnet]\nextended: {multipliers: ['-2']}\n", "positive numbers"),
        ("profile: synthetic\nmethods: [kd, fitnet]\nextended: {multipliers: []}\n", "extended.multipliers is empty"),
        ("profile: synthetic\nmethods: [kd, fitnet]\nextended: {methods: [kd], multipliers: ['2']}\n", "delete extended.methods"),
        ("profile: synthetic\nmethods: [kd]\nextended: {multipliers: ['2']}\n", "methods must include ['fitnet']"),
        ("profile: synthetic\nseed: 3\n", "seed became seeds"),
        ("profile: synthetic\nseeds: [0, 0]\n", "seeds must be distinct"),
        ("profile: synthetic\nseeds: [0]\n", "is one seed, but the pipeline's statistics and verdict"),
        ("profile: synthetic\nplugins: nowhere\n", "plugins folder nowhere does not exist"),
        ("profile: synthetic\ncalibrate: {max_spread: -1}\n", "calibrate.max_spread must be a positive number"),
        ("profile: synthetic\ncalibrate: {max_spread: lots}\n", "calibrate.max_spread must be a positive number"),
        ("profile: synthetic\ncalibrate: {rounds: 0}\n", "calibrate.rounds must be at least 1"),
    ],
)
def test_bad_params_file_is_one_line_error(tmp_path, capsys, params, message):
    path = tmp_path / "params.yaml"
    path.write_text(params)
    assert main(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_params_file_maps_to_hydra_overrides(tmp_path):
    from kdrepro.config import load_config
    from kdrepro.pipeline.params import params_overrides

    path = tmp_path / "params.yaml"
    path.write_text("profile: smoke\nseeds: [3, 4]\nreference_iterations: 7\nmethods: [kd, cwd]\ncalibrate: {rounds: 2, warmup: null}\n")
    overrides = params_overrides(path)
    assert overrides == ["profile=smoke", "speed.file=runs/smoke/hardware.json", "seeds=[3,4]", "reference_iterations=7",
                         "calibrate.methods=[none,kd,cwd]", "calibrate.rounds=2"]  # fmt: skip
    cfg = load_config(overrides)
    assert cfg.reference_iterations == 7 and cfg.budget.iterations == 7 and list(cfg.calibrate.methods) == ["none", "kd", "cwd"]
    assert cfg.calibrate.warmup == 1  # null keeps the profile's value
    path.write_text("profile: smoke\n")
    assert load_config(params_overrides(path)).reference_iterations == 4  # the smoke profile's schedule


# -- what a change reruns -----------------------------------------------------------------------------------------------
# For each config key: the stages `dvc status` marks stale (the wiring of dvc.yaml), and what the stale stages then do
# when they run (kdrepro/train/effects.py: a `retrain` key moves a finished run aside and trains it again, a
# `recalibrate` key re-measures the costs, anything else leaves every finished output as it was).


def _stale(repo: Path) -> set[str]:
    status = _dvc(repo, "status", "--json")
    assert status.returncode == 0, status.stderr
    # the hardware stage is always changed by design (it re-decides on the machine at hand, and its tracked output
    # changes only when the decision does); what it makes stale downstream shows in the stages after it
    return {name.split(":")[-1] for name in json.loads(status.stdout or "{}")} - {"hardware"}


def _cards(repo: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / "runs" / "smoke" / "calibration").glob("*.json"))}


def _kd_run(repo: Path) -> Path:
    return repo / "runs" / "smoke" / "iter_matched" / "kd" / "seed0"


def _repro(repo: Path, *stages: str) -> None:
    done = _dvc(repo, "repro", "-s", *stages)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture
def clean_pipeline(smoke_copy) -> Path:
    """A copy of the finished smoke pipeline: up to date, with calibrations that never count as disturbed
    (max_spread null: the smoke profile's choice)."""
    assert _stale(smoke_copy) == set()
    return smoke_copy


def test_seeds_and_extended_budgets_make_only_their_stages_stale(clean_pipeline):
    repo = clean_pipeline
    methods = {"none", "kd", "fitnet", "cwd", "mymethod"}
    assert _stale(repo) == set()
    _write_params(repo, seeds=[0, 1, 2])
    stale = _stale(repo)
    assert {name for name in stale if name.startswith(TRAINING)} == {
        name for name in _stages(repo) if name.startswith(TRAINING)}, stale  # each trains the new seed only
    assert not stale & {"data", "pretrain", "teacher", "calibrate"}, stale
    # whatever makes calibration run meanwhile, the seeds do not re-measure a method (they are no part of a cost)
    cards = _cards(repo)
    _repro(repo, "-f", "calibrate")
    assert json.loads((repo / "runs" / "smoke" / "calibration.json").read_text())["reused"] == sorted(methods)
    assert _cards(repo) == cards
    _write_params(repo, seeds=[0, 1])
    base = _stale(repo)  # the calibration table's time stamp changed: the cost page is stale, nothing else
    assert not {name for name in base if name.startswith(TRAINING)} and "calibrate" not in base, base

    # another extended budget adds its own four stages and touches no finished one (the README's promise about one
    # method's config: test_failed_stage_keeps_finished_outputs_and_reruns_only_its_method)
    _write_params(repo, extended={"multipliers": ["2", "3"]})
    stale = _stale(repo) - base
    assert {"student_extended@3", "extended@kd-3", "extended@fitnet-3", "extended_best@3"} <= stale
    assert not {name for name in stale if name.startswith(TRAINING)} - {
        "student_extended@3", "extended@kd-3", "extended@fitnet-3", "extended_best@3"}, stale
    assert "calibrate" not in stale
    _write_params(repo, extended={"multipliers": ["2"]})
    assert _stale(repo) == base


def _stages(repo: Path) -> set[str]:
    listed = _dvc(repo, "stage", "list", "--name-only")
    assert listed.returncode == 0, listed.stderr
    return {line.split(":")[-1].strip() for line in listed.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize(
    "key, old, new",
    [("eval_points", "eval_points: 1", "eval_points: 2"),  # 4 iterations: evaluated at step 2, then at 2 and 3
     ("checkpoint_every_seconds", "threads: 2", "threads: 2\ncheckpoint_every_seconds: 60"),
     ("threads", "threads: 2", "threads: 1")],  # re-measures every cost: last, it leaves the compute-matched stale
)
def test_a_profile_key_retrains_or_recalibrates_exactly_as_classified(clean_pipeline, key, old, new):
    from kdrepro.train.effects import RECALIBRATE, RETRAIN, effect

    repo = clean_pipeline
    profile = repo / "kdrepro" / "conf" / "profile" / "smoke.yaml"
    original = profile.read_text()
    assert old in original
    cards, finished = _cards(repo), (_kd_run(repo) / "metrics.json").read_bytes()
    aside = set(_kd_run(repo).parent.glob("seed0.superseded-*"))  # left by an earlier case
    profile.write_text(original.replace(old, new))
    try:
        _repro(repo, "calibrate", "iter_matched@kd")
        table = json.loads((repo / "runs" / "smoke" / "calibration.json").read_text())
        retrained = sorted(set(_kd_run(repo).parent.glob("seed0.superseded-*")) - aside)
        if RECALIBRATE in effect(key):
            assert table["reused"] == [] and _cards(repo) != cards, table["reused"]
        else:
            assert len(table["reused"]) == 5 and _cards(repo) == cards, table["reused"]
        if RETRAIN in effect(key):  # moved aside (never lost) and trained again
            assert len(retrained) == 1 and (retrained[0] / "metrics.json").read_bytes() == finished
            assert (_kd_run(repo) / "metrics.json").read_bytes() != finished
        else:
            assert not retrained and (_kd_run(repo) / "metrics.json").read_bytes() == finished
    finally:
        profile.write_text(original)
    _repro(repo, "calibrate", "iter_matched@kd")  # set back: a retrained run's earlier version comes back
    assert (_kd_run(repo) / "metrics.json").read_bytes() == finished
    assert len(set(_kd_run(repo).parent.glob("seed0.superseded-*")) - aside) == (RETRAIN in effect(key))
