"""Where a pipeline's results sit: its seeds, schedule and teacher gap, how far the student alone is from its longer
runs (schedule vs convergence), which classes it learns, which runs collapsed to one class, and whether one class
decides a comparison. The verdict and every report page state it."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kdrepro.analysis.methods import STUDENT_ALONE

PERCENT_OF_TEACHER_BASIS = "the teacher's mIoU (one teacher, shared by every seed)"

#: A class counts as predicted when its IoU is above this (a fraction, as ``metrics.json`` stores IoU): 1 %.
COLLAPSE_IOU = 0.01


def collapsed(per_class_iou: list[float | None] | None, threshold: float = COLLAPSE_IOU) -> bool:
    """Did a finished run collapse to one class? True when at most one class has IoU above ``threshold`` among the
    classes its ``per_class_iou`` scores (``metrics.json``, fractions), and at least two classes are scored.

    Why: a student that predicts one class everywhere (e.g. IoU ``[0.36, 0, 0, 0, 0, 0, 0]``) still has finite losses,
    so it is not *diverged*, yet its mIoU (here 5.2) measures a broken training under this recipe, not the method.
    Every other class then has IoU 0 (it is never predicted, or predicted where it is not) up to the rare stray
    pixel, hence a small threshold (1 %) rather than exactly 0. Classes absent from validation *and* never
    predicted have no IoU (``None``/NaN): they are not counted, and a run scored on fewer than two classes cannot
    collapse. A run without ``per_class_iou`` (diverged, or written by an older kdrepro) is not flagged.
    """
    scored = [float(v) for v in per_class_iou or [] if v is not None and math.isfinite(float(v))]
    return len(scored) >= 2 and sum(v > threshold for v in scored) <= 1


def collapsed_methods(stats: pd.DataFrame) -> dict[str, Any]:
    """The methods with collapsed runs (``n_collapsed`` of :func:`kdrepro.analysis.stats.summarize`):
    ``{method: {"runs": k, "of": n, "by_protocol": [{"protocol", "multiplier", "collapsed", "seeds"}]}}``, counting
    every run of the method (diverged ones too) in ``of`` and ``seeds``; ``{}`` when none collapsed."""
    if stats.empty or "n_collapsed" not in stats:
        return {}
    found: dict[str, Any] = {}
    for row in stats[pd.to_numeric(stats.n_collapsed).fillna(0) > 0].itertuples():
        seeds = int(row.n_seeds) + int(getattr(row, "n_diverged", 0) or 0)
        entry = found.setdefault(str(row.method), {"runs": 0, "of": 0, "by_protocol": []})
        entry["by_protocol"].append({"protocol": str(row.protocol), "multiplier": float(row.multiplier),
                                     "collapsed": int(row.n_collapsed), "seeds": seeds})  # fmt: skip
        entry["runs"] += int(row.n_collapsed)
    for method, entry in found.items():
        part = stats[stats.method == method]
        entry["of"] = int(part.n_seeds.sum() + (part.n_diverged.sum() if "n_diverged" in part else 0))
    return found


def teacher_miou_pct(runs: pd.DataFrame) -> float | None:
    teacher = runs.loc[runs.protocol == "teacher", "miou"] if not runs.empty else pd.Series(dtype=float)
    return float(100.0 * teacher.iloc[0]) if len(teacher) and math.isfinite(teacher.iloc[0]) else None


def regime(runs: pd.DataFrame, stats: pd.DataFrame, profile: str | None) -> dict[str, Any]:
    """Where this run sits: seeds, schedule, teacher gap, and the student alone's progress at the schedule compared
    with its longest control run (the extended student alone), so every report can say schedule vs convergence."""
    teacher = teacher_miou_pct(runs)
    student_rows = stats[(stats.protocol == "iter_matched") & (stats.method == STUDENT_ALONE)]
    student = float(student_rows.miou_mean.iloc[0]) if len(student_rows) else math.nan
    iterations = float(student_rows.iterations_mean.iloc[0]) if len(student_rows) else math.nan
    seeds = sorted(int(s) for s in runs.loc[runs.protocol != "teacher", "seed"].dropna().unique()) if not runs.empty else []
    longer = stats[(stats.protocol == "extended") & (stats.method == STUDENT_ALONE)].sort_values("iterations_mean")
    fraction, longer_iterations, longest_gap, longest_iterations = None, None, None, None
    if len(longer) and math.isfinite(student):
        target = longer.iloc[(longer.iterations_mean - 4 * iterations).abs().argsort().iloc[0]]
        fraction, longer_iterations = student / float(target.miou_mean), float(target.iterations_mean)
        if teacher is not None and math.isfinite(float(longer.miou_mean.iloc[-1])):
            longest_gap, longest_iterations = teacher - float(longer.miou_mean.iloc[-1]), float(longer.iterations_mean.iloc[-1])
    teacher_runs = runs[runs.protocol == "teacher"]
    schedule = "no student-alone run yet"
    if fraction is not None:
        stage = "past early training" if fraction >= 0.8 else "early training (below 80 % of its longer-run mIoU)"
        schedule = (f"schedule regime: at the reference schedule ({iterations:.0f} iterations) the student alone reaches "
                    f"{100 * fraction:.0f} % of its mIoU after {longer_iterations:.0f} iterations — {stage}, not "
                    "converged")  # fmt: skip
        if longest_gap is not None:  # how much of the teacher's lead is capacity, not training length
            schedule += (f"; after {longest_iterations:.0f} iterations the student alone is {longest_gap:.1f} points below "
                         "the teacher")  # fmt: skip
    return {
        "profile": profile,
        "seeds": seeds,
        "reference_iterations": None if not math.isfinite(iterations) else int(round(iterations)),
        "teacher_miou": teacher,
        "teacher_iterations": int(teacher_runs.iterations.iloc[0]) if len(teacher_runs) and teacher_runs.iterations.notna().iloc[0] else None,
        "student_miou": None if not math.isfinite(student) else student,
        "teacher_gap": None if teacher is None or not math.isfinite(student) else teacher - student,
        "student_fraction_of_longer": fraction,
        "student_longer_iterations": longer_iterations,
        "teacher_gap_at_longest_control": longest_gap,
        "longest_control_iterations": longest_iterations,
        "schedule": schedule,
        "percent_of_teacher_basis": PERCENT_OF_TEACHER_BASIS,
        "collapsed": collapsed_methods(stats),
        "collapse_threshold": COLLAPSE_IOU,
    }


def classes_learned(per_class: pd.DataFrame, protocol: str = "iter_matched", method: str = STUDENT_ALONE) -> dict[str, Any]:
    """Of the classes present in validation, how many a method's runs learn (mean IoU over seeds > 0)."""
    rows = per_class[(per_class.protocol == protocol) & (per_class.method == method) & (per_class.multiplier == 1.0)]
    means = rows.groupby("class_name", sort=False).iou.mean().dropna()  # NaN: absent from validation and never predicted
    learned = means[means > 0]
    return {"present": int(len(means)), "learned": int(len(learned)),
            "not_learned": [name for name in means.index if name not in learned.index]}  # fmt: skip


def deciding_classes(per_class: pd.DataFrame, protocol: str, a: str, b: str) -> dict[str, Any]:
    """Does one class decide ``a`` vs ``b``? The mIoU difference (mean over seeds and classes) and the classes whose
    removal alone flips its sign; also the class with the largest share of the absolute per-class differences."""
    rows = per_class[(per_class.protocol == protocol) & (per_class.multiplier == 1.0) & per_class.method.isin([a, b])]
    table = rows.pivot_table(index="class_name", columns="method", values="iou", aggfunc="mean", sort=False)
    if a not in table or b not in table:
        return {"difference": None, "deciding": [], "largest": None, "largest_share": None}
    diff = (table[a] - table[b]).dropna()
    if diff.empty:
        return {"difference": None, "deciding": [], "largest": None, "largest_share": None}
    total = float(diff.mean())
    deciding = [name for name in diff.index if len(diff) > 1 and total != 0 and
                (float(diff.drop(name).mean()) > 0) != (total > 0)]  # fmt: skip
    share = diff.abs() / diff.abs().sum() if diff.abs().sum() > 0 else diff.abs()
    return {"difference": total, "deciding": deciding, "largest": str(share.idxmax()), "largest_share": float(share.max())}
