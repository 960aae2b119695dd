"""The paper's claims, judged from this run's numbers: supported, contradicted or inconclusive.

The rules are fixed before any result is seen and are the same for every profile; they use only the seed-paired
95 % intervals of :mod:`kdrepro.analysis.stats` ("significant" = the interval excludes 0). ``canonical`` is the better (by
mean) of logit KD (``kd``) and feature KD (``fitnet``); ``best specific`` is the segmentation-specific method with the
highest mean, chosen after the fact (so it is favoured by selection, which makes claim (b) harder to support).

(a) *Rankings change between iteration-matched and compute-matched training.* Supported when some pair of methods
    is significantly ordered one way under one protocol and significantly the other way under the other, or when a
    segmentation-specific method is significantly above logit KD iteration-matched but not compute-matched.
    Contradicted when at least one pair is significantly ordered and every significant order of either protocol holds,
    significantly and in the same direction, under the other. Otherwise inconclusive.
(b) *Under matched compute, canonical KD is at least as good as the best segmentation-specific method.* Contradicted
    when the best specific method is significantly above canonical KD (compute-matched), supported when canonical KD
    is significantly above it, inconclusive when the difference is inside the noise (stated as such).
(c) *Extended canonical KD approaches the teacher and beats the student alone at the same budget.* At the largest
    multiplier: supported when canonical KD is significantly above the student alone trained with the same budget
    and its mean reaches ``APPROACH_PERCENT`` of the teacher; contradicted when the student alone is significantly
    above it or the upper end of its interval stays below that share of the teacher; otherwise inconclusive.

Before any claim, three preconditions (:func:`preconditions`); a claim they leave without ground is
*cannot judge*, whatever its numbers say (the verdict the numbers would give stays in ``verdict_if_judged``):

* **Positive control** (:func:`positive_control`): iteration-matched, each control method (roles: logit KD ``kd``
  and CWD ``cwd`` by default, one of each family) is significantly above the student alone: the paired 95 %
  interval excludes 0 and the mean gain is at least ``min_gain`` (+1 point). A run in which the field's
  best-established effect is absent (or not run) cannot judge any claim.
* **Compute check** (:func:`compute_check`): every compute-matched and extended run trained within ±15 % of its
  budget (the multiplier × the calibrated budget, in training seconds on the calibration's clock: process CPU time
  scaled by the calibration's wall / CPU factor when it was measured in CPU time, as on CPUs, so that other load on
  the machine, which stretches wall time alike for no method in particular, does not fail it), and no method's calibration timing was
  disturbed (IQR / median of its timed iterations above ``disturbed_spread``, 0.5, also where the profile's
  ``calibrate.max_spread`` is null). Otherwise the compute-matched claims (a), (b) and (c) cannot be judged.
* **Capacity gap** (:func:`capacity_gap`): the teacher minus the student alone at the longest student-alone control
  of the run; recorded against its criterion (3 points), stated in every regime line, not a condition of the verdict.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kdrepro.analysis.methods import CANONICAL, LOGIT_KD, STUDENT_ALONE
from kdrepro.analysis.stats import paired_difference, pairwise, t_interval

CANNOT_JUDGE = "cannot judge"
VERDICTS = ("supported", "contradicted", "inconclusive", CANNOT_JUDGE)
#: The roles and limits of the preconditions (``verdict:`` of ``kdrepro/conf/train.yaml``; params.yaml may set them).
DEFAULT_SETTINGS: dict[str, Any] = {"positive_control": ["kd", "cwd"], "min_gain": 1.0, "capacity_gap": 3.0,
                                    "budget_tolerance": 0.15, "disturbed_spread": 0.5}  # fmt: skip
#: Claims that rest on compute matching (the calibrated budget).
COMPUTE_CLAIMS = ("a", "b", "c")
APPROACH_PERCENT = 90.0  # the paper's weaker case: 92 % of the teacher on ADE20K
CLAIMS = {
    "a": "Rankings change between iteration-matched and compute-matched training.",
    "b": "Under matched compute, canonical KD (the better of logit KD and feature KD) is at least as good as the best "
    "segmentation-specific method.",
    "c": "With extended training, canonical KD approaches the teacher and beats the student alone trained with the "
    "same budget.",
}


def _claim(claim_id: str, verdict: str, evidence: str, **figures: Any) -> dict[str, Any]:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}
    return {"id": claim_id, "claim": CLAIMS[claim_id], "verdict": verdict, "evidence": evidence, "figures": clean}


def _orders(table: pd.DataFrame) -> set[tuple[str, str]]:
    """Significant orders ``a > b`` of a :func:`kdrepro.analysis.stats.pairwise` table."""
    return {(row.a, row.b) for row in table.itertuples() if row.significant and row.mean > 0}


def _fmt(diff: dict[str, Any]) -> str:
    if not math.isfinite(diff["ci_low"]):
        return f"{diff['mean']:+.1f} (no interval: {diff['n']} seed)"
    return f"{diff['mean']:+.1f} [{diff['ci_low']:+.1f}, {diff['ci_high']:+.1f}]"


def broken_methods(runs: pd.DataFrame) -> list[str]:
    """Methods whose every seed collapsed to one class under either protocol (``collapsed`` column of runs.csv): their
    rows describe a training the recipe broke, not the method, so no order of theirs counts towards claim (a)."""
    if "collapsed" not in runs:
        return []
    matched = runs[runs.protocol.isin(["iter_matched", "compute_matched"])]
    whole = matched.groupby(["protocol", "method"]).collapsed.agg(lambda flags: bool(len(flags)) and bool(flags.fillna(False).all()))
    return sorted({method for (_, method), all_collapsed in whole.items() if all_collapsed})


def claim_rankings(runs: pd.DataFrame, specific: list[str]) -> dict[str, Any]:
    """Claim (a) from the student runs of both protocols (columns protocol, method, multiplier, seed, miou), without
    the methods that collapsed on every seed (:func:`broken_methods`; named in the figures and the evidence)."""
    broken = broken_methods(runs)
    runs, specific = runs[~runs.method.isin(broken)], [method for method in specific if method not in broken]
    iters, comp = pairwise(runs, "iter_matched"), pairwise(runs, "compute_matched")
    if iters.empty or comp.empty:
        return _claim("a", "inconclusive", "one of the two protocols has no runs")
    order_iter, order_comp = _orders(iters), _orders(comp)
    flips = sorted((a, b) for a, b in order_iter if (b, a) in order_comp)  # a > b iteration-matched, b > a compute
    lost = []
    for method in specific:
        row_iter = iters[(iters.a == method) & (iters.b == LOGIT_KD)]
        row_comp = comp[(comp.a == method) & (comp.b == LOGIT_KD)]
        if len(row_iter) and len(row_comp) and row_iter.significant.iloc[0] and row_iter["mean"].iloc[0] > 0:
            if not (row_comp.significant.iloc[0] and row_comp["mean"].iloc[0] > 0):
                lost.append(method)
    figures = {"significant_orders_iter_matched": len(order_iter), "significant_orders_compute_matched": len(order_comp),
               "flips": [f"{a}>{b} iteration-matched, {b}>{a} compute-matched" for a, b in flips],
               "flip_pairs": [[a, b] for a, b in flips], "specific_advantage_lost": lost, "excluded_collapsed": broken,
               "seeds": int(runs[runs.protocol.isin(["iter_matched", "compute_matched"])].seed.nunique())}  # fmt: skip
    excluded = (f" ({', '.join(broken)} left out: collapsed to one class on every seed, a broken training)"
                if broken else "")
    verdict, evidence = _rankings_verdict(order_iter, order_comp, flips, lost, figures)
    return _claim("a", verdict, evidence[:-1] + excluded + ".", **figures)


def _rankings_verdict(order_iter: set, order_comp: set, flips: list, lost: list, figures: dict[str, Any]) -> tuple[str, str]:
    if flips or lost:
        parts = []
        if flips:
            parts.append(f"{len(flips)} pair(s) significantly ordered in opposite directions ({'; '.join(figures['flips'][:4])})")
        if lost:
            parts.append(f"{', '.join(lost)} significantly above logit KD iteration-matched but not compute-matched")
        return "supported", "; ".join(parts) + "."
    if order_iter == order_comp and bool(order_iter):
        return "contradicted", f"all {len(order_iter)} significant orders are the same under both protocols."
    return "inconclusive", (f"{len(order_iter)} significant orders iteration-matched, {len(order_comp)} compute-matched, "
                            "none reversed; the orders that changed are inside the noise.")


def _mean(runs: pd.DataFrame, protocol: str, method: str, multiplier: float = 1.0) -> float:
    part = runs[(runs.protocol == protocol) & (runs.method == method) & (runs.multiplier == multiplier)]
    return t_interval(100.0 * pd.to_numeric(part["miou"]))[0] if len(part) else math.nan


def _series(runs: pd.DataFrame, protocol: str, method: str, multiplier: float = 1.0) -> pd.Series:
    part = runs[(runs.protocol == protocol) & (runs.method == method) & (runs.multiplier == multiplier)]
    return (100.0 * pd.to_numeric(part.set_index("seed")["miou"])).astype(float)


def best_canonical(runs: pd.DataFrame, protocol: str, multiplier: float = 1.0) -> str | None:
    means = {m: _mean(runs, protocol, m, multiplier) for m in CANONICAL}
    means = {m: v for m, v in means.items() if math.isfinite(v)}
    return max(means, key=means.get) if means else None


def best_specific(runs: pd.DataFrame, specific: list[str], protocol: str = "compute_matched") -> str | None:
    """The segmentation-specific method with the highest mean mIoU under ``protocol`` (ties: the first name)."""
    means = {m: _mean(runs, protocol, m) for m in sorted(specific)}
    means = {m: v for m, v in means.items() if math.isfinite(v)}
    return max(means, key=means.get) if means else None


def claim_matched_compute(runs: pd.DataFrame, specific: list[str]) -> dict[str, Any]:
    """Claim (b): canonical KD vs the best segmentation-specific method, compute-matched."""
    canonical, best = best_canonical(runs, "compute_matched"), best_specific(runs, specific)
    if canonical is None or best is None:
        return _claim("b", "inconclusive", "canonical KD or segmentation-specific runs are missing under compute matching")
    diff = paired_difference(_series(runs, "compute_matched", canonical), _series(runs, "compute_matched", best))
    figures = {"canonical": canonical, "best_specific": best, "difference": diff["mean"], "ci_low": diff["ci_low"],
               "ci_high": diff["ci_high"], "seeds": diff["n"]}  # fmt: skip
    text = f"{canonical} - {best} = {_fmt(diff)} mIoU points (compute-matched, {diff['n']} seeds)"
    if diff["significant"] and diff["mean"] < 0:
        return _claim("b", "contradicted", f"{text}: {best} is significantly better.", **figures)
    if diff["significant"]:
        return _claim("b", "supported", f"{text}: canonical KD is significantly better.", **figures)
    return _claim("b", "inconclusive", f"{text}: the difference is inside the noise (no significant winner).", **figures)


def claim_extended(runs: pd.DataFrame, teacher_miou_pct: float | None) -> dict[str, Any]:
    """Claim (c): canonical KD at the largest extended budget vs the student alone at that budget and the teacher."""
    extended = runs[runs.protocol == "extended"]
    if extended.empty or not teacher_miou_pct:
        return _claim("c", "inconclusive", "no extended runs or no teacher mIoU")
    multiplier = float(extended.multiplier.max())
    canonical = best_canonical(runs, "extended", multiplier)
    student = _series(runs, "extended", STUDENT_ALONE, multiplier)
    if canonical is None or student.empty:
        return _claim("c", "inconclusive", f"canonical KD or the student-alone control is missing at {multiplier:g}x")
    mine = _series(runs, "extended", canonical, multiplier)
    diff = paired_difference(mine, student)
    share = 100.0 * mine / teacher_miou_pct
    share_mean, _, _, share_high, _ = t_interval(share)
    figures = {"method": canonical, "multiplier": multiplier, "delta_student": diff["mean"], "ci_low": diff["ci_low"],
               "ci_high": diff["ci_high"], "percent_of_teacher": share_mean, "teacher_miou": teacher_miou_pct,
               "seeds": diff["n"]}  # fmt: skip
    text = (f"{canonical} at {multiplier:g}x: {share_mean:.1f} % of the teacher ({teacher_miou_pct:.1f} mIoU), "
            f"{_fmt(diff)} points vs the student alone at {multiplier:g}x")  # fmt: skip
    upper = share_high if math.isfinite(share_high) else share_mean
    if diff["significant"] and diff["mean"] < 0:
        return _claim("c", "contradicted", text + ": the student alone is significantly better.", **figures)
    if upper < APPROACH_PERCENT:
        return _claim("c", "contradicted", text + f": below {APPROACH_PERCENT:.0f} % of the teacher.", **figures)
    if diff["significant"] and share_mean >= APPROACH_PERCENT:
        return _claim("c", "supported", text + ".", **figures)
    reason = "the difference to the student alone is inside the noise" if not diff["significant"] else (
        f"the mean is short of {APPROACH_PERCENT:.0f} % of the teacher")
    return _claim("c", "inconclusive", f"{text}: {reason}.", **figures)


def judge(runs: pd.DataFrame, specific: list[str], teacher_miou_pct: float | None,
          conditions: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every claim's verdict, in order (a), (b), (c). ``runs``: the student runs, mIoU as a fraction;
    ``conditions``: :func:`preconditions` (a claim they leave without ground is *cannot judge*)."""
    students = runs[runs.protocol != "teacher"]
    claims = [claim_rankings(students, specific), claim_matched_compute(students, specific),
              claim_extended(students, teacher_miou_pct)]  # fmt: skip
    return [withhold(claim, conditions) for claim in claims] if conditions else claims


# ------------------------------------------------------------------------------------------------ preconditions
def settings(given: dict[str, Any] | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_SETTINGS` updated with the non-null entries of ``given``."""
    merged = dict(DEFAULT_SETTINGS)
    merged.update({key: value for key, value in (given or {}).items() if value is not None})
    merged["positive_control"] = [str(name) for name in merged["positive_control"]]
    return merged


def positive_control(runs: pd.DataFrame, methods: list[str] | tuple[str, ...] = ("kd", "cwd"),
                     min_gain: float = 1.0) -> dict[str, Any]:
    """Is each control method, iteration-matched, significantly above the student alone by at least ``min_gain``
    points (paired 95 % interval excluding 0)? ``state``: passed | failed | not run."""
    student = _series(runs, "iter_matched", STUDENT_ALONE)
    per_method: dict[str, Any] = {}
    for method in methods:
        mine = _series(runs, "iter_matched", method)
        if mine.empty or student.empty:
            per_method[method] = {"state": "not run", "n": 0}
            continue
        diff = paired_difference(mine, student)
        passed = bool(diff["significant"] and diff["mean"] >= min_gain)
        per_method[method] = {"gain": diff["mean"], "ci_low": diff["ci_low"], "ci_high": diff["ci_high"],
                              "n": diff["n"], "state": "passed" if passed else "failed"}  # fmt: skip
    states = {entry["state"] for entry in per_method.values()}
    state = "not run" if "not run" in states or not per_method else ("failed" if "failed" in states else "passed")
    return {"methods": list(methods), "min_gain": min_gain, "protocol": "iter_matched", "per_method": per_method,
            "state": state, "passed": state == "passed",
            "criterion": f"iteration-matched, each of {', '.join(methods)} significantly above the student alone "
                         f"(paired 95 % interval excludes 0) by at least {min_gain:+g} point"}  # fmt: skip


def capacity_gap(runs: pd.DataFrame, teacher_miou_pct: float | None, criterion: float = 3.0) -> dict[str, Any]:
    """The teacher minus the student alone at the longest student-alone control of the run (the largest extended
    multiplier, else the reference schedule), against ``criterion`` points."""
    students = runs[(runs.method == STUDENT_ALONE) & runs.protocol.isin(["extended", "iter_matched"])]
    if students.empty or teacher_miou_pct is None:
        return {"gap": None, "criterion": criterion, "met": None, "at_iterations": None, "protocol": None}
    longest = students.assign(order=students.protocol.map({"iter_matched": 0, "extended": 1}))
    top = longest.sort_values(["order", "multiplier"]).iloc[-1]
    part = longest[(longest.protocol == top.protocol) & (longest.multiplier == top.multiplier)]
    mean = t_interval(100.0 * pd.to_numeric(part["miou"]))[0]
    gap = teacher_miou_pct - mean if math.isfinite(mean) else None
    iterations = pd.to_numeric(part["iterations"]).mean() if "iterations" in part else math.nan
    return {"gap": gap, "criterion": criterion, "met": None if gap is None else bool(gap >= criterion),
            "at_iterations": None if not math.isfinite(iterations) else int(round(float(iterations))),
            "protocol": str(top.protocol), "multiplier": float(top.multiplier), "student_miou": mean,
            "teacher_miou": teacher_miou_pct}  # fmt: skip


def _disturbed(calibration: dict[str, Any], limit: float) -> dict[str, float]:
    """Methods whose calibration timing spread above ``limit`` (or that the calibration itself lists as disturbed)."""
    listed = {str(k): float(v) for k, v in (calibration.get("disturbed") or {}).items()}
    for name, entry in (calibration.get("methods") or {}).items():
        spread = entry.get("relative_spread") if isinstance(entry, dict) else None
        if spread is not None and math.isfinite(float(spread)) and float(spread) > limit:
            listed[str(name)] = float(spread)
    return dict(sorted(listed.items()))


def compute_check(runs: pd.DataFrame, calibration: dict[str, Any] | None, tolerance: float = 0.15,
                  disturbed_spread: float = 0.5) -> dict[str, Any]:
    """Did compute matching hold? Per compute-matched and extended run: realised training seconds against its
    budget (multiplier × the calibrated budget) and iterations against FLOP-matched iterations; the runs outside
    ±``tolerance`` of their budget; the methods whose calibration timing was disturbed."""
    if not calibration or not (calibration.get("matched") or {}).get("budget_seconds"):
        return {"state": "not checked", "passed": None, "reason": "no calibration with a matched budget", "runs": [],
                "off_budget": [], "disturbed": {}, "tolerance": tolerance}  # fmt: skip
    matched = calibration["matched"]
    budget = float(matched["budget_seconds"])
    flops = matched.get("flop_matched_iterations") or {}
    clock = str((calibration.get("clock") or {}).get("kind") or "wall")
    rows = []
    for row in runs[runs.protocol.isin(["compute_matched", "extended"])].itertuples():
        multiplier = float(row.multiplier) if row.protocol == "extended" else 1.0
        wall = float(row.train_seconds) if pd.notna(row.train_seconds) else math.nan
        seconds = _on_calibration_clock(row, wall, clock, calibration)
        ratio = seconds / (multiplier * budget) if math.isfinite(seconds) else math.nan
        flop = flops.get(str(row.method))
        rows.append({"run": getattr(row, "run", None), "protocol": row.protocol, "method": row.method,
                     "multiplier": multiplier, "seed": row.seed, "train_seconds": seconds, "wall_seconds": wall,
                     "budget_seconds": multiplier * budget, "ratio": ratio,
                     "within": bool(math.isfinite(ratio) and abs(ratio - 1.0) <= tolerance),
                     "iterations": row.iterations,
                     "flop_matched_iterations": None if flop is None else multiplier * float(flop)})  # fmt: skip
    off = [row for row in rows if not row["within"]]
    disturbed = _disturbed(calibration, disturbed_spread)
    passed = not off and not disturbed
    return {"state": "passed" if passed else "failed", "passed": passed, "tolerance": tolerance, "clock": clock,
            "budget_seconds": budget, "disturbed_spread": disturbed_spread, "disturbed": disturbed,
            "runs": rows, "off_budget": [row["run"] for row in off]}  # fmt: skip


def _on_calibration_clock(row: Any, wall: float, clock: str, calibration: dict[str, Any]) -> float:
    """A run's training seconds in the unit of its budget. A CPU-time calibration's seconds are CPU seconds times
    one wall / CPU factor of the calibration (``wall_per_cpu``): the run's own CPU seconds times that factor is its
    cost in that unit. Runs without a CPU record (older metrics, GPUs) count their wall time."""
    cpu = getattr(row, "train_cpu_seconds", math.nan)
    if clock != "cpu" or cpu is None or not math.isfinite(float(cpu)):
        return wall
    entries = calibration.get("methods") or {}
    entry = entries.get(str(row.method)) or entries.get(str((calibration.get("matched") or {}).get("reference_method"))) or {}
    factor = entry.get("wall_per_cpu")
    return float(cpu) * float(factor) if factor else wall


def preconditions(runs: pd.DataFrame, teacher_miou_pct: float | None, calibration: dict[str, Any] | None,
                  given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The positive control, the compute check and the capacity gap of a run, with the reasons (plain words) that
    leave claims unjudgeable: ``{"positive_control", "compute_check", "capacity_gap", "withheld": {claim: reason}}``."""
    chosen = settings(given)
    control = positive_control(runs, chosen["positive_control"], float(chosen["min_gain"]))
    check = compute_check(runs, calibration, float(chosen["budget_tolerance"]), float(chosen["disturbed_spread"]))
    withheld: dict[str, str] = {}
    if not control["passed"]:
        withheld.update(dict.fromkeys(CLAIMS, control_failure(control)))
    elif check["passed"] is False:
        withheld.update(dict.fromkeys(COMPUTE_CLAIMS, compute_failure(check)))
    return {"settings": chosen, "positive_control": control, "compute_check": check,
            "capacity_gap": capacity_gap(runs, teacher_miou_pct, float(chosen["capacity_gap"])), "withheld": withheld}


def control_failure(control: dict[str, Any]) -> str:
    """Why a failed (or missing) positive control leaves the claims unjudgeable, in one sentence."""
    missing = [m for m, e in control["per_method"].items() if e["state"] == "not run"]
    if missing:
        return (f"the positive control was not run ({', '.join(missing)} iteration-matched, or the student alone, is "
                "missing), so this run cannot show that distillation works at all")
    failing = {m: e for m, e in control["per_method"].items() if e["state"] == "failed"}
    failed = [f"{m} {_gain(e)}" for m, e in failing.items()]
    small = all(math.isfinite(e.get("ci_low", math.nan)) and e["ci_low"] > 0 for e in failing.values())
    why = ("distillation helps here, but by less than the margin this run needs to tell methods apart" if small else
           "distillation does not measurably work in this run and it cannot tell methods apart")
    return (f"the positive control failed: {'; '.join(failed)} against the student alone, iteration-matched (needed: "
            f"interval above 0 and a gain of at least {control['min_gain']:+g} point), so {why}")


def compute_failure(check: dict[str, Any]) -> str:
    """Why a failed compute check leaves the compute-matched claims unjudgeable, in one sentence."""
    parts = []
    if check["off_budget"]:
        ratios = [row["ratio"] for row in check["runs"] if not row["within"] and math.isfinite(row["ratio"])]
        span = f" (from {100 * min(ratios):.0f} % to {100 * max(ratios):.0f} % of their budget)" if ratios else ""
        clock = " (in CPU time, the calibration's clock)" if check.get("clock") == "cpu" else ""
        parts.append(f"{len(check['off_budget'])} of {len(check['runs'])} compute-matched or extended runs trained "
                     f"outside ±{100 * check['tolerance']:.0f} % of their budget{span}{clock}")
    if check["disturbed"]:
        listed = ", ".join(f"{name} ({100 * spread:.0f} %)" for name, spread in check["disturbed"].items())
        parts.append(f"the calibration timing of {listed} was disturbed by other load (IQR / median above "
                     f"{100 * check['disturbed_spread']:.0f} %)")
    return "compute matching did not hold: " + " and ".join(parts) + "; re-run the calibration on an idle machine"


def _gain(entry: dict[str, Any]) -> str:
    if entry.get("gain") is None or not math.isfinite(entry["gain"]):
        return "no gain measured"
    return _fmt({"mean": entry["gain"], "ci_low": entry["ci_low"], "ci_high": entry["ci_high"], "n": entry["n"]})


def withhold(claim: dict[str, Any], conditions: dict[str, Any]) -> dict[str, Any]:
    """``claim`` marked *cannot judge* when a precondition leaves it without ground (its own verdict kept)."""
    reason = (conditions.get("withheld") or {}).get(claim["id"])
    if not reason:
        return claim
    return {**claim, "verdict": CANNOT_JUDGE, "verdict_if_judged": claim["verdict"], "withheld_because": reason}
