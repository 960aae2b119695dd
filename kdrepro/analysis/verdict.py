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
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kdrepro.analysis.methods import CANONICAL, LOGIT_KD, STUDENT_ALONE
from kdrepro.analysis.stats import paired_difference, pairwise, t_interval

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


def claim_rankings(runs: pd.DataFrame, specific: list[str]) -> dict[str, Any]:
    """Claim (a) from the student runs of both protocols (columns protocol, method, multiplier, seed, miou)."""
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
               "specific_advantage_lost": lost}  # fmt: skip
    if flips or lost:
        parts = []
        if flips:
            parts.append(f"{len(flips)} pair(s) significantly ordered in opposite directions ({'; '.join(figures['flips'][:4])})")
        if lost:
            parts.append(f"{', '.join(lost)} significantly above logit KD iteration-matched but not compute-matched")
        return _claim("a", "supported", "; ".join(parts) + ".", **figures)
    stable = order_iter == order_comp and bool(order_iter)
    if stable:
        return _claim("a", "contradicted", f"all {len(order_iter)} significant orders are the same under both protocols.", **figures)
    return _claim(
        "a", "inconclusive",
        f"{len(order_iter)} significant orders iteration-matched, {len(order_comp)} compute-matched, none reversed; "
        "the orders that changed are inside the noise.", **figures,
    )  # fmt: skip


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
               "ci_high": diff["ci_high"], "percent_of_teacher": share_mean, "teacher_miou": teacher_miou_pct}  # fmt: skip
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


def judge(runs: pd.DataFrame, specific: list[str], teacher_miou_pct: float | None) -> list[dict[str, Any]]:
    """Every claim's verdict, in order (a), (b), (c). ``runs``: the student runs, mIoU as a fraction."""
    students = runs[runs.protocol != "teacher"]
    return [claim_rankings(students, specific), claim_matched_compute(students, specific),
            claim_extended(students, teacher_miou_pct)]  # fmt: skip
