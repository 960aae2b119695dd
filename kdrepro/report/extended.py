"""Extended-training page (``notebooks/extended.ipynb``): mIoU against the training budget (1× = the
compute-matched run; 2×, 4×, 8× from the ``extended`` stage) for logit KD, feature KD, the best segmentation-specific
method of the compute-matched table, and the student alone at every budget (the control: most of an extended run's
gain is the extra iterations). "% of teacher" has one basis everywhere: the mean over seeds of a run's mIoU divided by
the teacher's mIoU on the same validation set. Published numbers sit in their own columns with source and schedule.
"""

from __future__ import annotations

import html
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kdrepro.analysis.methods import STUDENT_ALONE, base_method
from kdrepro.report.published import DATASETS, PUBLISHED, SOURCES
from kdrepro.report.style import (
    FAMILY_LINES,
    FAMILY_MARKERS,
    FIGURE_WIDTH,
    TEACHER_COLOUR,
    family_label,
    figure_note,
    interval,
    method_colours,
)
from kdrepro.report.verdict_text import seeds_note

PERCENT_BASIS = "% of teacher = mean mIoU over seeds ÷ the teacher's mIoU (same validation set, this profile)"


def budget_frame(stats: pd.DataFrame) -> pd.DataFrame:
    """Per method with extended runs (and the student alone): one row per budget, 1× = compute-matched."""
    extended = stats[stats.protocol == "extended"]
    methods = set(extended.method) | ({STUDENT_ALONE} if STUDENT_ALONE in set(stats.method) else set())
    base = stats[(stats.protocol == "compute_matched") & (stats.multiplier == 1.0) & stats.method.isin(methods)]
    frame = pd.concat([base.assign(multiplier=1.0), extended], ignore_index=True)
    frame["first"] = frame.method != STUDENT_ALONE  # the control first
    return frame.sort_values(["first", "method", "multiplier"]).drop(columns="first").reset_index(drop=True)


def budget_table(frame: pd.DataFrame, names: dict[str, str], teacher_miou: float | None) -> pd.DataFrame:
    """Method × budget: mIoU mean ± CI (with the seeds that diverged or collapsed to one class), % of teacher (one
    basis), Δ vs the student alone at the same budget."""
    rows = []
    for row in frame.itertuples():
        percent = 100 * row.miou_mean / teacher_miou if teacher_miou else np.nan
        delta = "control" if row.method == STUDENT_ALONE else interval(
            row.delta_student_mean, row.delta_student_ci_low, row.delta_student_ci_high, signed=True)
        if row.method != STUDENT_ALONE and getattr(row, "delta_student_significant", None) is not True and delta != "—":
            delta = f"≈ {delta} (inside the noise)"
        rows.append({"method": names.get(row.method, row.method), "budget": f"{row.multiplier:g}×",
                     "iterations": row.iterations_mean, "train s": row.train_seconds_mean,
                     "mIoU (%) ± 95 % CI": _miou_text(row),
                     "% of teacher": percent, "Δ vs student alone, same budget": delta})
    return pd.DataFrame(rows)


def _miou_text(row: Any) -> str:
    """Mean ± CI, then the seeds that diverged or collapsed to one class (``1 of 3 seeds collapsed to one class``)."""
    text = interval(row.miou_mean, row.miou_ci_low, row.miou_ci_high)
    notes = seeds_note(getattr(row, "n_seeds", 0), getattr(row, "n_diverged", 0), getattr(row, "n_collapsed", 0))
    return f"{text} ({'; '.join(notes)})" if notes else text


def extension_choice(selection: dict[str, Any], names: dict[str, str]) -> str:
    """Markdown: which segmentation-specific method was extended and how the pipeline chose it."""
    method = selection.get("method")
    if not method:
        return "No segmentation-specific method was extended (no `extended_selection.json`)."
    return (f"The segmentation-specific method extended here is **{names.get(method, method)}** (`{method}`), chosen by "
            f"the pipeline from this run's results ({selection.get('by', 'compute-matched mean mIoU')}), not fixed in advance.")


def plot_budget(frame: pd.DataFrame, families: dict[str, str], names: dict[str, str], teacher_miou: float | None,
                profile: str = "", teacher_iterations: int | None = None) -> Figure:
    """mIoU (mean ± 95 % CI) vs budget multiplier (log2 axis), the student alone at every budget, line style and
    marker by family, a legend below (name, family, last mean) so no label sits on an error bar; the teacher's level
    labelled at the left edge (clear of the curves) and % of teacher on the right axis, both within [0, 100] mIoU."""
    colours = method_colours(frame.method)
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, 5.4))
    methods = list(dict.fromkeys(frame.method))
    for position, (method, group) in enumerate((m, frame[frame.method == m]) for m in methods):
        family = families.get(method, "segmentation_specific")
        errors = np.nan_to_num(np.vstack([group.miou_mean - group.miou_ci_low, group.miou_ci_high - group.miou_mean]))
        dodge = 2 ** (0.05 * (position - (len(methods) - 1) / 2))  # side by side, so every interval stays visible
        ax.errorbar(group.multiplier * dodge, group.miou_mean, yerr=errors, color=colours[method], ls=FAMILY_LINES.get(family, "-"),
                    marker=FAMILY_MARKERS.get(family, "o"), ms=7, lw=2, capsize=3)
    multipliers = sorted(frame.multiplier.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(multipliers, [f"{m:g}×" for m in multipliers])
    ax.minorticks_off()
    ax.set_xlim(min(multipliers) / 1.5, max(multipliers) * 1.5)
    if teacher_miou:
        ax.axhline(teacher_miou, color=TEACHER_COLOUR, ls="-.", lw=1.3)
        schedule = f" after {int(teacher_iterations):,} iterations" if teacher_iterations else ""
        ax.text(min(multipliers) / 1.45, teacher_miou, f" teacher {teacher_miou:.1f}{schedule}", va="bottom", ha="left", fontsize=9,
                color=TEACHER_COLOUR, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        secondary = ax.secondary_yaxis("right", functions=(lambda y: 100 * y / teacher_miou, lambda p: p * teacher_miou / 100))
        secondary.set_ylabel("% of teacher mIoU")
    low = float(np.nanmin(frame.miou_ci_low.fillna(frame.miou_mean)))
    high = max(float(np.nanmax(frame.miou_ci_high.fillna(frame.miou_mean))), teacher_miou or -np.inf)
    pad = 0.08 * (high - low + 1e-6)
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))  # mIoU lives in [0, 100], so % of teacher stays >= 0
    ends = frame.sort_values("multiplier").groupby("method").tail(1).set_index("method")
    ax.set(xlabel="training budget (× the compute-matched wall-clock budget)", ylabel="mIoU (%), mean ± 95 % CI",
           title="Extended training, with the student alone trained at every budget")
    handles = [plt.Line2D([], [], color=colours[m], ls=FAMILY_LINES.get(families.get(m, ""), "-"), lw=2,
                          marker=FAMILY_MARKERS.get(families.get(m, ""), "o"),
                          label=f"{names.get(m, m)} ({family_label(families.get(m, 'segmentation_specific'))}): "
                                f"{ends.miou_mean[m]:.1f} at {ends.multiplier[m]:g}×") for m in methods]  # fmt: skip
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=2, frameon=False, fontsize=9)
    fig.tight_layout()  # a legend instead of labels at the line ends: nothing is drawn over an error bar
    return figure_note(fig, profile)


DATASET_LABELS = {"cityscapes": "Cityscapes", "ade20k": "ADE20K"}
#: How the published table names the two roles every source shares.
ROLE_LABELS = {"teacher": "Teacher (PSPNet-R101)", "none": "Student alone (PSPNet-R18)"}
SOURCE_ORDER = {"bpkd": 0, "mmseg": 1, "paper": 2}


def _published_cell(results: list[Any]) -> str:
    """Every published number of one method on one dataset, best-protocol source first: ``76.1 [bpkd]``."""
    parts = []
    for result in sorted(results, key=lambda r: SOURCE_ORDER.get(r.source, 3)):
        value = f"{result.miou:.2f}" if result.miou is not None else f"{result.percent_of_teacher:g} % of the teacher"
        parts.append(f"{value} [{result.source}]")
    return "; ".join(parts) or "—"


#: The published table's free-text columns, which wrap instead of widening the table past the page.
PUBLISHED_WRAP = ("schedule", *(f"published {DATASET_LABELS[d]}" for d in DATASETS))


def published_table(stats: pd.DataFrame, names: dict[str, str], teacher_miou: float | None, profile: str) -> pd.DataFrame:
    """One row per method (no repeats): this run's compute-matched and best extended mean mIoU and its % of teacher
    first, then every published number of that method per dataset with its source key (mIoU, or a % of the teacher
    where the source gives only a ratio), and the schedules."""
    ours = stats[stats.protocol.isin(["compute_matched", "extended"])].copy()
    ours["base"] = ours.method.map(base_method)
    rows = []
    for method in dict.fromkeys(result.method for result in PUBLISHED):
        published = [r for r in PUBLISHED if r.method == method]
        mine = ours[ours.base == method]
        compute = mine[mine.protocol == "compute_matched"]
        extended = mine[mine.protocol == "extended"]
        best = extended.loc[extended.miou_mean.idxmax()] if len(extended) else None
        top = max([v for v in (compute.miou_mean.max() if len(compute) else np.nan, best.miou_mean if best is not None else np.nan)
                   if not pd.isna(v)], default=np.nan)
        label = ROLE_LABELS.get(method) or names.get(method) or min(published, key=lambda r: SOURCE_ORDER.get(r.source, 3)).label
        schedules = dict.fromkeys(f"{r.dataset}: {r.schedule}" for r in published if r.schedule)
        rows.append({
            "method": label,
            f"this run ({profile}): compute-matched mIoU": compute.miou_mean.max() if len(compute) else np.nan,
            f"this run ({profile}): best extended mIoU": f"{best.miou_mean:.1f} ({best.multiplier:g}×)" if best is not None else "—",
            f"this run ({profile}): % of teacher": 100 * top / teacher_miou if teacher_miou and not pd.isna(top) else np.nan,
            **{f"published {DATASET_LABELS[d]}": _published_cell([r for r in published if r.dataset == d]) for d in DATASETS},
            "schedule": "; ".join(schedules) or "extended training (paper)",
        })
    return pd.DataFrame(rows)


def sources_html() -> str:
    """The cited sources as an HTML list with links."""
    items = "".join(f'<li><b>{html.escape(s.key)}</b>: {html.escape(s.title)} — <a href="{html.escape(s.url)}">{html.escape(s.url)}</a></li>'
                    for s in SOURCES.values())
    return f"<ul>{items}</ul>"
