"""The verdict in words: one sentence per claim with display names, its figures as a small labelled table, and the
preconditions (positive control, compute check, capacity gap) stated first in plain words.

Everything here reads ``verdict.json`` (:mod:`kdrepro.analysis.verdict`) and a method -> display name map; nothing is
recomputed. Internal method names never reach the page: a name without a display name is shown as it is.
"""

from __future__ import annotations

import math
from typing import Any

Names = dict[str, str]


def _name(method: Any, names: Names) -> str:
    return names.get(str(method), str(method))


def _nanmean(values: list[Any]) -> float:
    finite = [float(v) for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def signed(value: Any, digits: int = 1) -> str:
    return f"{float(value):+.{digits}f}" if _finite(value) else "?"


def span(low: Any, high: Any) -> str:
    """``[−1.2, +2.3]``, or ``no interval`` (one seed)."""
    return f"[{signed(low)}, {signed(high)}]" if _finite(low) and _finite(high) else "no interval"


def _reason(claim: dict[str, Any]) -> str:
    """The plain-words ending of a claim's evidence (after its figures)."""
    evidence = str(claim.get("evidence", "")).strip()
    return evidence.rsplit(": ", 1)[-1].rstrip(".") if ": " in evidence else evidence.rstrip(".")


def teacher_schedule(regime: dict[str, Any]) -> str:
    """``52.4 mIoU after 2,000 iterations (one run)`` — the teacher's mIoU always comes with its schedule."""
    miou, iterations = regime.get("teacher_miou"), regime.get("teacher_iterations")
    text = f"{float(miou):.1f} mIoU" if _finite(miou) else "? mIoU"
    return text + (f" after {int(iterations):,} iterations (one run)" if _finite(iterations) else " (one run)")


# ------------------------------------------------------------------------------------------------------ claims
def _rankings(claim: dict[str, Any], names: Names) -> tuple[str, list[tuple[str, str]]]:
    figures = claim.get("figures") or {}
    if "significant_orders_iter_matched" not in figures:
        return str(claim.get("evidence", "")), []
    pairs = figures.get("flip_pairs") or []
    lost = figures.get("specific_advantage_lost") or []
    swapped = "; ".join(f"{_name(a, names)} above {_name(b, names)} iteration-matched, below it compute-matched"
                        for a, b in pairs)  # fmt: skip
    n_iter, n_comp = figures["significant_orders_iter_matched"], figures["significant_orders_compute_matched"]
    if claim["verdict_shown"] == "supported" or pairs or lost:
        parts = [f"{len(pairs)} pair(s) of methods swap places significantly ({swapped})"] if pairs else []
        if lost:
            parts.append(f"{', '.join(_name(m, names) for m in lost)} is significantly above logit KD iteration-matched "
                         "but not compute-matched")
        sentence = "Under compute matching, " + "; ".join(parts) + "."
    elif claim["verdict_shown"] == "contradicted":
        sentence = f"All {n_iter} significant orders of methods hold under both protocols."
    else:
        sentence = (f"{n_iter} pairs of methods are significantly ordered iteration-matched and {n_comp} "
                    "compute-matched; none is reversed, and the orders that changed are inside the seed noise.")
    table = [("significantly ordered pairs, iteration-matched", str(n_iter)),
             ("significantly ordered pairs, compute-matched", str(n_comp)),
             ("pairs reversed", ", ".join(f"{_name(a, names)} / {_name(b, names)}" for a, b in pairs) or "none"),
             ("seeds", str(figures.get("seeds", "?")))]  # fmt: skip
    return sentence, table


def _matched_compute(claim: dict[str, Any], names: Names) -> tuple[str, list[tuple[str, str]]]:
    figures = claim.get("figures") or {}
    if not figures.get("canonical"):
        return str(claim.get("evidence", "")), []
    canonical, best = _name(figures["canonical"], names), _name(figures["best_specific"], names)
    sentence = (f"Compute-matched, {canonical} (the better canonical method) scores {signed(figures.get('difference'))} "
                f"mIoU points against {best} (the best segmentation-specific method) over {figures.get('seeds', '?')} "
                f"seeds, 95 % interval {span(figures.get('ci_low'), figures.get('ci_high'))}: {_reason(claim)}.")
    per_class = figures.get("per_class") or {}
    deciding = per_class.get("deciding") or []
    if deciding:
        decided = f"removing {', '.join(deciding)} alone reverses it"
    elif per_class.get("largest"):
        decided = f"no single class (largest share: {per_class['largest']}, {100 * float(per_class.get('largest_share') or 0):.0f} %)"
    else:
        decided = "—"
    table = [("canonical KD", canonical), ("best segmentation-specific", best),
             ("difference (mIoU points)", signed(figures.get("difference"))),
             ("95 % interval", span(figures.get("ci_low"), figures.get("ci_high"))),
             ("seeds", str(figures.get("seeds", "?"))), ("one class decides it?", decided)]  # fmt: skip
    return sentence, table


def _extended(claim: dict[str, Any], names: Names, regime: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    figures = claim.get("figures") or {}
    if not figures.get("method"):
        return str(claim.get("evidence", "")), []
    method, multiplier = _name(figures["method"], names), float(figures.get("multiplier") or 0)
    share = figures.get("percent_of_teacher")
    share_text = f"{float(share):.0f} %" if _finite(share) else "?"
    sentence = (f"At {multiplier:g}× the compute-matched budget, {method} reaches {share_text} of the teacher "
                f"({teacher_schedule(regime)}) and scores {signed(figures.get('delta_student'))} points, 95 % interval "
                f"{span(figures.get('ci_low'), figures.get('ci_high'))}, against the student alone trained as long, over "
                f"{figures.get('seeds', '?')} seeds: {_reason(claim)}.")
    table = [("method", method), ("budget", f"{multiplier:g}× the compute-matched budget"),
             ("% of the teacher", share_text), ("teacher", teacher_schedule(regime)),
             ("Δ student alone (points)", f"{signed(figures.get('delta_student'))} {span(figures.get('ci_low'), figures.get('ci_high'))}"),
             ("seeds", str(figures.get("seeds", "?")))]  # fmt: skip
    return sentence, table


def claim_in_words(claim: dict[str, Any], names: Names, regime: dict[str, Any]) -> dict[str, Any]:
    """``{"sentence", "figures": [(label, value)], "withheld"}`` for one claim of ``verdict.json``."""
    shown = {**claim, "verdict_shown": claim.get("verdict_if_judged") or claim.get("verdict")}
    builder = {"a": lambda c: _rankings(c, names), "b": lambda c: _matched_compute(c, names),
               "c": lambda c: _extended(c, names, regime)}.get(str(claim.get("id")))  # fmt: skip
    sentence, table = builder(shown) if builder else (str(claim.get("evidence", "")), [])
    withheld = claim.get("withheld_because")
    if withheld:
        sentence = f"Its numbers alone would say {shown['verdict_shown']}: {sentence}"
    return {"sentence": sentence, "figures": table, "withheld": withheld}


# ------------------------------------------------------------------------------------------------ preconditions
def _gains(control: dict[str, Any], names: Names) -> str:
    parts = []
    for method, entry in (control.get("per_method") or {}).items():
        if entry.get("state") == "not run":
            parts.append(f"{_name(method, names)} not run")
        else:
            parts.append(f"{_name(method, names)} {signed(entry.get('gain'))} {span(entry.get('ci_low'), entry.get('ci_high'))}")
    return "; ".join(parts)


def positive_control_sentence(regime: dict[str, Any], names: Names) -> str:
    """The positive control in one sentence ('' when the verdict has none)."""
    control = regime.get("positive_control")
    if not control:
        return ""
    state = {"passed": "passed", "failed": "FAILED", "not run": "NOT RUN"}.get(control.get("state"), "?")
    return (f"Positive control {state}: iteration-matched gain over the student alone, mIoU points with 95 % interval: "
            f"{_gains(control, names)} (needed: each interval above 0 and a gain of at least "
            f"{signed(control.get('min_gain'))}).")


def capacity_gap_sentence(regime: dict[str, Any]) -> str:
    """The teacher's lead at the longest student-alone control against its criterion ('' when unknown)."""
    gap = regime.get("capacity_gap") or {}
    if not _finite(gap.get("gap")):
        return ""
    where = (f"{float(gap['multiplier']):g}× the budget" if gap.get("protocol") == "extended" else "the reference schedule")
    iterations = f", {int(gap['at_iterations']):,} iterations" if _finite(gap.get("at_iterations")) else ""
    met = "met" if gap.get("met") else "NOT met: the teacher leads by training length more than by capacity"
    return (f"Capacity gap: the teacher leads the student alone at its longest control ({where}{iterations}) by "
            f"{float(gap['gap']):.1f} points (criterion ≥ {float(gap.get('criterion', 3.0)):g}: {met}).")


PROTOCOL_WORDS = {"iter_matched": "iteration-matched", "compute_matched": "compute-matched"}


def _protocol_words(entry: dict[str, Any]) -> str:
    """``iteration-matched``, ``compute-matched`` or ``at 4× the budget`` (extended runs)."""
    return PROTOCOL_WORDS.get(str(entry.get("protocol"))) or f"at {float(entry.get('multiplier') or 0):g}× the budget"


def _collapsed_where(entry: dict[str, Any]) -> str:
    """``3 of 3 seeds iteration-matched``."""
    return f"{int(entry.get('collapsed', 0))} of {int(entry.get('seeds', 0))} seeds {_protocol_words(entry)}"


def _collapsed_tail(entry: dict[str, Any]) -> str:
    """What a method's collapsed runs mean for its rows: broken training where every seed of a row collapsed."""
    rows = entry.get("by_protocol") or []
    whole = [row for row in rows if int(row.get("collapsed", 0)) >= int(row.get("seeds", 0)) > 0]
    if whole and len(whole) == len(rows) and int(entry.get("runs", 0)) >= int(entry.get("of", 0)):
        return "its rows describe a broken training, not the method"
    if whole:
        labels = " and ".join(PROTOCOL_WORDS.get(str(row.get("protocol"))) or f"{float(row.get('multiplier') or 0):g}×"
                              for row in whole)  # fmt: skip
        return f"its {labels} row{'s describe' if len(whole) > 1 else ' describes'} a broken training, not the method"
    return "those seeds stay in its mean and interval"


def collapsed_sentence(regime: dict[str, Any], names: Names) -> str:
    """The methods with runs that collapsed to one class, in one sentence ('' when none did): their runs stay in the
    means, so a reader must be told which rows describe a broken training rather than the method."""
    found = regime.get("collapsed") or {}
    if not found:
        return ""
    parts = [f"{_name(method, names)} collapsed to one class on "
             f"{' and '.join(_collapsed_where(row) for row in entry.get('by_protocol') or [])}: {_collapsed_tail(entry)}"
             for method, entry in found.items()]  # fmt: skip
    threshold = 100 * float(regime.get("collapse_threshold") or 0.01)
    return (f"{'; '.join(parts)} (collapsed: at most one class above {threshold:g} % IoU at the end of training, "
            "with finite losses).")


def flags(verdict: dict[str, Any], names: Names) -> list[dict[str, str]]:
    """The warnings a reader must see before any claim, most serious first: ``{"kind", "title", "text"}``."""
    regime = verdict.get("regime") or {}
    found = []
    control = regime.get("positive_control") or {}
    if control and not control.get("passed"):
        what = "was not run" if control.get("state") == "not run" else "failed"
        found.append({"kind": "cannot-judge", "title": "This run cannot judge the paper's claims.",
                      "text": f"Its positive control {what}: distillation must first measurably work here. "
                              f"Iteration-matched gain over the student alone: {_gains(control, names)}; each of "
                              f"{', '.join(_name(m, names) for m in control.get('methods', []))} must be above it, "
                              f"interval above 0 and gain at least {signed(control.get('min_gain'))} point. Every claim "
                              "below is marked “cannot judge”; its numbers are shown for reference only."})  # fmt: skip
    check = verdict.get("compute_check") or {}
    if check.get("state") == "failed":
        found.append({"kind": "compute", "title": "Compute matching did not hold in this run.",
                      "text": compute_text(check, names) + " The compute-matched claims cannot be judged from it."})
    return found


def compute_text(check: dict[str, Any], names: Names) -> str:
    """What went wrong with compute matching, in words with display names."""
    parts = []
    off = [row for row in check.get("runs", []) if not row.get("within")]
    if off:
        ratios = [float(row["ratio"]) for row in off if _finite(row.get("ratio"))]
        low, high = (100 * min(ratios), 100 * max(ratios)) if ratios else (0.0, 0.0)
        extremes = "" if not ratios else (f" ({low:.0f} % of the budget)" if round(low) == round(high) else
                                          f" (from {low:.0f} % to {high:.0f} % of their budget)")  # fmt: skip
        methods = ", ".join(dict.fromkeys(_name(row["method"], names) for row in off))
        parts.append(f"{len(off)} of {len(check.get('runs', []))} compute-matched or extended runs ({methods}) trained "
                     f"outside ±{100 * float(check.get('tolerance', 0.15)):.0f} % of their budget{extremes}")
    disturbed = check.get("disturbed") or {}
    if disturbed:
        listed = ", ".join(f"{_name(m, names)} ({100 * float(s):.0f} %)" for m, s in disturbed.items())
        parts.append(f"the calibration timing of {listed} spread by more than "
                     f"{100 * float(check.get('disturbed_spread', 0.5)):.0f} % (IQR / median): another process loaded "
                     "the machine while it was measured")
    advice = "re-measure on an idle machine with `dvc repro -f -s calibrate`, then `dvc repro`"
    return ("; ".join(parts) + f". To fix: {advice}.") if parts else ""


# --------------------------------------------------------------------------------------------- per method
def budget_by_method(check: dict[str, Any] | None, protocol: str = "compute_matched") -> dict[str, dict[str, Any]]:
    """Per method, from the compute check of ``verdict.json``: realised training seconds (mean over seeds) against
    the budget, the extreme ratio, whether every seed stayed within the tolerance, and the FLOP-matched iterations."""
    rows = [row for row in (check or {}).get("runs", []) if row.get("protocol") == protocol]
    found: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(str(row["method"]) for row in rows):
        mine = [row for row in rows if str(row["method"]) == method]
        ratios = [float(row["ratio"]) for row in mine if row.get("ratio") is not None]
        worst = max(ratios, key=lambda r: abs(r - 1.0)) if ratios else math.nan
        found[method] = {"seconds": float(_nanmean([row["train_seconds"] or math.nan for row in mine])),
                         "budget": float(mine[0]["budget_seconds"]), "worst_ratio": worst,
                         "within": all(row.get("within") for row in mine), "seeds": len(mine),
                         "flop_iterations": mine[0].get("flop_matched_iterations")}  # fmt: skip
    return found


def _count(value: Any) -> int:
    """A seed count from ``stats.csv`` (numpy or Python number); 0 for a missing or NaN value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if math.isfinite(number) else 0


def seeds_note(n_seeds: Any, n_diverged: Any, n_collapsed: Any) -> list[str]:
    """``["1 of 3 seeds diverged", "2 of 3 seeds collapsed to one class"]`` (the counts that are not 0) for a row of
    ``stats.csv``; collapsed seeds are inside its mean, diverged ones are not."""
    total = _count(n_seeds) + _count(n_diverged)
    counts = ((n_diverged, "diverged"), (n_collapsed, "collapsed to one class"))
    return [f"{_count(k)} of {total} seeds {what}" for k, what in counts if _count(k)]


def collapse_mark(rows: Any) -> str:
    """A figure label's suffix for the ``stats.csv`` rows (a DataFrame) of one method: ``" (4/10 one class)"`` when
    some of their seeds collapsed to one class (``n_collapsed``), ``""`` otherwise or without that column."""
    if "n_collapsed" not in rows.columns:
        return ""
    collapsed = sum(_count(k) for k in rows["n_collapsed"])
    diverged = rows["n_diverged"] if "n_diverged" in rows.columns else [0] * len(rows)
    total = sum(_count(n) + _count(d) for n, d in zip(rows["n_seeds"], diverged, strict=True))
    return f" ({collapsed}/{total} one class)" if collapsed else ""
