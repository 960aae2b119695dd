"""Each claim's verdict (supported, contradicted, inconclusive, cannot judge) and its preconditions (positive
control, compute check, capacity gap) on constructed tables."""

from __future__ import annotations

import pandas as pd
import pytest

from kdrepro.analysis.verdict import (
    CANNOT_JUDGE,
    best_specific,
    capacity_gap,
    claim_extended,
    claim_matched_compute,
    claim_rankings,
    compute_check,
    compute_failure,
    control_failure,
    judge,
    positive_control,
    preconditions,
)

SPECIFIC = ["cwd", "dist"]


def _table(protocol: str, means: dict[str, float], noise: float = 0.002, multiplier: float = 1.0, seeds: int = 3):
    """Runs whose seed effects are shared by every method (common random numbers) plus a small wobble."""
    rows = []
    for seed in range(seeds):
        for index, (method, mean) in enumerate(means.items()):
            wobble = noise * (((seed + index) % 3) - 1)
            rows.append({"protocol": protocol, "method": method, "multiplier": multiplier, "seed": seed,
                         "miou": mean + 0.01 * seed + wobble})
    return pd.DataFrame(rows)


def test_rankings_supported_when_a_specific_advantage_vanishes_under_compute_matching():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25, "dist": 0.21, "none": 0.15}),
                      _table("compute_matched", {"kd": 0.22, "cwd": 0.19, "dist": 0.21, "none": 0.17})])
    claim = claim_rankings(runs, SPECIFIC)
    assert claim["verdict"] == "supported"
    assert "cwd" in claim["figures"]["specific_advantage_lost"]


def test_a_reversed_pair_is_reported_once():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25}),
                      _table("compute_matched", {"kd": 0.25, "cwd": 0.20})])
    claim = claim_rankings(runs, SPECIFIC)
    assert claim["verdict"] == "supported"
    assert claim["figures"]["flips"] == ["cwd>kd iteration-matched, kd>cwd compute-matched"]


def test_rankings_contradicted_when_every_significant_order_holds():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.25, "none": 0.15}),
                      _table("compute_matched", {"kd": 0.21, "cwd": 0.26, "none": 0.16})])
    assert claim_rankings(runs, SPECIFIC)["verdict"] == "contradicted"


def test_a_method_collapsed_on_every_seed_is_left_out_of_the_rankings():
    """BPKD at 5.2 mIoU on every seed (one class predicted everywhere) made every other method significantly better
    under both protocols: orders that describe a broken training, not the methods."""
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.201, "bpkd": 0.05}, noise=0.02),
                      _table("compute_matched", {"kd": 0.201, "cwd": 0.20, "bpkd": 0.05}, noise=0.02)])
    assert claim_rankings(runs, [*SPECIFIC, "bpkd"])["verdict"] == "contradicted"  # without the flag: its orders count
    runs["collapsed"] = runs.method == "bpkd"
    claim = claim_rankings(runs, [*SPECIFIC, "bpkd"])
    assert claim["verdict"] == "inconclusive" and claim["figures"]["excluded_collapsed"] == ["bpkd"]
    assert "bpkd left out: collapsed to one class on every seed" in claim["evidence"]
    iterations = runs.protocol == "iter_matched"
    runs.loc[iterations & (runs.method == "bpkd") & (runs.seed == 0), "collapsed"] = False
    assert claim_rankings(runs, SPECIFIC)["figures"]["excluded_collapsed"] == ["bpkd"]  # compute-matched: every seed
    runs.loc[(runs.method == "bpkd") & (runs.seed == 0), "collapsed"] = False  # one seed trained under each protocol
    assert claim_rankings(runs, SPECIFIC)["figures"]["excluded_collapsed"] == []


def test_rankings_inconclusive_inside_the_noise():
    runs = pd.concat([_table("iter_matched", {"kd": 0.20, "cwd": 0.201}, noise=0.02),
                      _table("compute_matched", {"kd": 0.201, "cwd": 0.20}, noise=0.02)])
    assert claim_rankings(runs, SPECIFIC)["verdict"] == "inconclusive"


@pytest.mark.parametrize(
    ("means", "verdict"),
    [({"kd": 0.25, "fitnet": 0.22, "cwd": 0.20, "dist": 0.21}, "supported"),
     ({"kd": 0.20, "fitnet": 0.19, "cwd": 0.25, "dist": 0.21}, "contradicted")],
)
def test_matched_compute_claim(means, verdict):
    claim = claim_matched_compute(_table("compute_matched", means), SPECIFIC)
    assert claim["verdict"] == verdict
    assert claim["figures"]["best_specific"] == max(SPECIFIC, key=means.get)
    assert claim["figures"]["canonical"] == max(("kd", "fitnet"), key=means.get)


def test_matched_compute_inconclusive_inside_the_noise():
    claim = claim_matched_compute(_table("compute_matched", {"kd": 0.20, "cwd": 0.201}, noise=0.03), SPECIFIC)
    assert claim["verdict"] == "inconclusive"
    assert "inside the noise" in claim["evidence"]


def _extended(kd: float, none: float, multiplier: float = 4.0):
    return pd.concat([_table("extended", {"kd": kd, "none": none}, multiplier=multiplier),
                      _table("extended", {"kd": kd - 0.05, "none": none - 0.05}, multiplier=2.0)])


def test_extended_claim_states():
    assert claim_extended(_extended(0.30, 0.25), teacher_miou_pct=32.0)["verdict"] == "supported"
    assert claim_extended(_extended(0.25, 0.30), teacher_miou_pct=32.0)["verdict"] == "contradicted"
    assert claim_extended(_extended(0.20, 0.15), teacher_miou_pct=40.0)["verdict"] == "contradicted"  # far from it
    noisy = pd.concat([_table("extended", {"kd": 0.30, "none": 0.299}, noise=0.03, multiplier=4.0)])
    assert claim_extended(noisy, teacher_miou_pct=32.0)["verdict"] == "inconclusive"
    assert claim_extended(_extended(0.30, 0.25), teacher_miou_pct=32.0)["figures"]["multiplier"] == 4.0


def test_best_specific_is_chosen_from_the_compute_matched_means():
    runs = _table("compute_matched", {"cwd": 0.20, "dist": 0.23, "kd": 0.30})
    assert best_specific(runs, SPECIFIC) == "dist"


def test_judge_returns_three_claims_with_one_of_three_verdicts():
    runs = _table("iter_matched", {"kd": 0.2, "none": 0.1})
    claims = judge(runs, SPECIFIC, None)
    assert [c["id"] for c in claims] == ["a", "b", "c"]
    assert {c["verdict"] for c in claims} <= {"supported", "contradicted", "inconclusive"}


# ------------------------------------------------------------------------------------------------ preconditions
def _controls(kd: float, cwd: float, none: float = 0.40, noise: float = 0.002) -> pd.DataFrame:
    return _table("iter_matched", {"none": none, "kd": kd, "cwd": cwd, "fitnet": none + 0.005}, noise=noise)


def test_positive_control_passes_when_each_control_is_significantly_above_the_student_alone_by_a_point():
    control = positive_control(_controls(kd=0.43, cwd=0.42), ["kd", "cwd"], min_gain=1.0)
    assert control["state"] == "passed" and control["passed"]
    assert control["per_method"]["kd"]["gain"] == pytest.approx(3.0)
    assert control["per_method"]["cwd"]["ci_low"] > 0


@pytest.mark.parametrize(
    ("kd", "cwd", "noise", "failing"),
    [(0.43, 0.405, 0.0005, "cwd"),   # significant but +0.5 point: below the +1 criterion
     (0.43, 0.42, 0.03, "both"),     # +2 and +3 points inside seed noise of ±3 points
     (0.38, 0.42, 0.002, "kd")],     # kd below the student alone
)
def test_positive_control_fails_below_a_point_or_inside_the_noise(kd, cwd, noise, failing):
    control = positive_control(_controls(kd, cwd, noise=noise), ["kd", "cwd"], min_gain=1.0)
    assert control["state"] == "failed" and not control["passed"]
    failed = {name for name, entry in control["per_method"].items() if entry["state"] == "failed"}
    assert failed == ({"kd", "cwd"} if failing == "both" else {failing})


def test_positive_control_roles_are_configurable_and_a_missing_control_is_not_run():
    runs = _controls(kd=0.43, cwd=0.42)
    assert positive_control(runs, ["fitnet"], min_gain=1.0)["state"] == "failed"  # +0.5 point
    assert positive_control(runs, ["kd"], min_gain=1.0)["passed"]
    missing = positive_control(runs[runs.method != "cwd"], ["kd", "cwd"])
    assert missing["state"] == "not run" and missing["per_method"]["cwd"]["state"] == "not run"


def test_capacity_gap_is_measured_at_the_longest_student_alone_control():
    runs = pd.concat([_controls(0.43, 0.42), _table("extended", {"none": 0.44}, multiplier=2.0),
                      _table("extended", {"none": 0.46}, multiplier=4.0)])
    gap = capacity_gap(runs, teacher_miou_pct=50.0, criterion=3.0)
    assert gap["multiplier"] == 4.0 and gap["protocol"] == "extended"
    assert gap["gap"] == pytest.approx(50.0 - 47.0) and gap["met"] is True  # mean over seeds 0.46 + 0.01
    assert capacity_gap(runs, teacher_miou_pct=48.0)["met"] is False
    only_reference = capacity_gap(_controls(0.43, 0.42), teacher_miou_pct=48.0)
    assert only_reference["protocol"] == "iter_matched" and only_reference["gap"] == pytest.approx(7.0)


def _compute_runs(seconds: dict[str, float], budget: float = 20.0) -> pd.DataFrame:
    rows = [{"run": f"compute_matched/{m}/seed0", "protocol": "compute_matched", "method": m, "multiplier": 1.0,
             "seed": 0, "miou": 0.4, "iterations": 10, "train_seconds": s} for m, s in seconds.items()]
    rows.append({"run": "extended/kd-2/seed0", "protocol": "extended", "method": "kd", "multiplier": 2.0, "seed": 0,
                 "miou": 0.4, "iterations": 20, "train_seconds": 2 * budget})
    return pd.DataFrame(rows)


def _calibration(spread: float = 0.1, max_spread: float | None = None) -> dict:
    methods = {m: {"seconds_per_iteration": 2.0, "relative_spread": spread if m == "fitnet" else 0.05}
               for m in ("none", "kd", "fitnet")}
    return {"max_spread": max_spread, "disturbed": {}, "methods": methods,
            "matched": {"budget_seconds": 20.0, "iterations": {"none": 10, "kd": 10, "fitnet": 10},
                        "flop_matched_iterations": {"none": 12, "kd": 10, "fitnet": 11}}}


def test_compute_check_flags_runs_outside_15_percent_of_their_budget():
    check = compute_check(_compute_runs({"none": 21.0, "kd": 19.0, "fitnet": 24.0}), _calibration())
    assert check["state"] == "failed" and check["off_budget"] == ["compute_matched/fitnet/seed0"]
    extended = next(row for row in check["runs"] if row["protocol"] == "extended")
    assert extended["budget_seconds"] == 40.0 and extended["within"] and extended["flop_matched_iterations"] == 20
    assert compute_check(_compute_runs({"none": 21.0, "kd": 19.0, "fitnet": 17.5}), _calibration())["passed"]


def test_compute_check_reads_cpu_seconds_when_the_calibration_was_in_cpu_time():
    """Under other load the wall time of every run stretches (seen: 142-291 % of the budget on a loaded machine)
    while its CPU time does not; a CPU-time calibration is checked in CPU time x its wall / CPU factor."""
    runs = _compute_runs({"none": 45.0, "kd": 50.0, "fitnet": 58.0})  # wall: 2.2-2.9x the budget
    runs["train_cpu_seconds"] = [16.0, 17.0, 24.0, 32.0]  # x 1.25 = 20, 21.25, 30 (off), 40 (the 2x run's budget)
    calibration = _calibration()
    for entry in calibration["methods"].values():
        entry["wall_per_cpu"] = 1.25
    assert compute_check(runs, calibration)["state"] == "failed"  # a wall-clock calibration: every run is off
    calibration["clock"] = {"kind": "cpu"}
    check = compute_check(runs, calibration)
    assert check["clock"] == "cpu" and check["off_budget"] == ["compute_matched/fitnet/seed0"]
    fitnet = next(row for row in check["runs"] if row["method"] == "fitnet")
    assert fitnet["train_seconds"] == pytest.approx(30.0) and fitnet["wall_seconds"] == 58.0
    runs["train_cpu_seconds"] = float("nan")  # metrics written before the CPU record: their wall time counts
    assert len(compute_check(runs, calibration)["off_budget"]) == 3  # the three stretched compute-matched runs


def test_disturbed_calibration_fails_the_check_even_where_max_spread_is_null():
    runs = _compute_runs({"none": 20.0, "kd": 20.0, "fitnet": 20.0})
    check = compute_check(runs, _calibration(spread=1.058, max_spread=None))  # the smoke profile: max_spread null
    assert check["state"] == "failed" and check["disturbed"] == {"fitnet": pytest.approx(1.058)}
    assert "disturbed" in compute_failure(check) and "106 %" in compute_failure(check)
    assert compute_check(runs, None)["state"] == "not checked"


def _full_run(kd: float, cwd: float, fitnet_seconds: float = 20.0) -> tuple[pd.DataFrame, dict]:
    runs = pd.concat([_controls(kd, cwd), _table("compute_matched", {"none": 0.40, "kd": 0.42, "cwd": 0.41,
                                                                     "fitnet": 0.40})])  # fmt: skip
    runs["iterations"], runs["train_seconds"] = 10, 20.0
    runs.loc[(runs.protocol == "compute_matched") & (runs.method == "fitnet"), "train_seconds"] = fitnet_seconds
    runs["run"] = runs.protocol + "/" + runs.method + "/seed" + runs.seed.astype(str)
    return runs, _calibration()


def test_failed_positive_control_makes_every_claim_cannot_judge_and_keeps_its_numbers():
    runs, calibration = _full_run(kd=0.405, cwd=0.40)
    conditions = preconditions(runs, 50.0, calibration)
    claims = judge(runs, SPECIFIC, 50.0, conditions)
    assert [c["verdict"] for c in claims] == [CANNOT_JUDGE] * 3
    assert all(c["verdict_if_judged"] in ("supported", "contradicted", "inconclusive") for c in claims)
    assert all(c["withheld_because"].startswith("the positive control failed") for c in claims)


def test_a_significant_gain_below_the_margin_is_not_called_no_effect():
    entry = {"gain": 0.88, "ci_low": 0.20, "ci_high": 1.57, "n": 5, "state": "failed"}
    control = {"min_gain": 1.0, "per_method": {"kd": entry, "cwd": {**entry, "gain": 1.9, "state": "passed"}}}
    assert control_failure(control).endswith("so distillation helps here, but by less than the margin this run needs "
                                             "to tell methods apart")
    control["per_method"]["kd"] = {**entry, "ci_low": -0.1}
    assert control_failure(control).endswith("so distillation does not measurably work in this run and it cannot tell "
                                             "methods apart")


def test_failed_compute_check_withholds_the_compute_claims_only_after_a_passed_control():
    runs, calibration = _full_run(kd=0.43, cwd=0.42, fitnet_seconds=30.0)
    conditions = preconditions(runs, 50.0, calibration)
    assert conditions["positive_control"]["passed"] and conditions["compute_check"]["state"] == "failed"
    claims = judge(runs, SPECIFIC, 50.0, conditions)
    assert {c["verdict"] for c in claims} == {CANNOT_JUDGE}
    assert "outside ±15 % of their budget" in claims[1]["withheld_because"]
    runs, calibration = _full_run(kd=0.43, cwd=0.42)
    judged = judge(runs, SPECIFIC, 50.0, preconditions(runs, 50.0, calibration))
    assert CANNOT_JUDGE not in {c["verdict"] for c in judged}


def test_verdict_record_carries_the_positive_control_and_the_capacity_gap_in_the_regime():
    from kdrepro.analysis.results import verdict_record
    from kdrepro.analysis.stats import summarize

    runs, calibration = _full_run(kd=0.43, cwd=0.42)
    runs = pd.concat([runs, pd.DataFrame([{"protocol": "teacher", "method": "teacher", "multiplier": 1.0, "seed": 0,
                                            "miou": 0.50, "iterations": 30, "train_seconds": 60.0}])])  # fmt: skip
    per_class = pd.DataFrame(columns=["protocol", "method", "multiplier", "seed", "class_name", "iou"])
    record = verdict_record(runs, summarize(runs, 50.0), per_class, "synthetic", calibration, {"positive_control": ["kd"]})
    assert record["regime"]["positive_control"]["methods"] == ["kd"] and record["regime"]["positive_control"]["passed"]
    assert record["regime"]["capacity_gap"]["gap"] == pytest.approx(50.0 - 41.0) and record["can_judge"]
    assert record["compute_check"]["passed"]
