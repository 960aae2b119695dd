"""Extended-training report (``notebooks/extended.ipynb``): mIoU and percent of teacher against the training budget
(1× = the compute-matched run, then 2×/4×/8× from the ``extended`` stage, DESIGN §1.3), and the published numbers of
the paper and the baselines (:mod:`kdrepro.published`) beside this run's numbers, always labelled with the profile.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kdrepro.published import SOURCES, base_method, published_results
from kdrepro.report import STUDENT_ALONE, figure_note, method_colours, method_family


def budget_curve(runs: pd.DataFrame) -> pd.DataFrame:
    """mIoU (%) and % of teacher vs budget multiplier: 1 = the compute-matched run, then each extended run.

    Every method with a compute-matched run appears at 1; methods trained with extended budgets get their
    multipliers too. Columns: method, family, multiplier, iterations, train_seconds, miou_percent,
    percent_of_teacher, extended (whether the method has extended runs).
    """
    rows = runs[runs.protocol.isin(["compute_matched", "extended"])].copy()
    rows.loc[rows.protocol == "compute_matched", "multiplier"] = 1.0
    extended_methods = set(runs.loc[runs.protocol == "extended", "method"])
    rows["extended"] = rows.method.isin(extended_methods)
    rows["family"] = rows.method.map(method_family)
    columns = ["method", "family", "multiplier", "iterations", "train_seconds", "miou_percent", "percent_of_teacher", "extended"]
    return rows[columns].sort_values(["method", "multiplier"]).reset_index(drop=True)


def extension_choice(runs: pd.DataFrame) -> str:
    """Markdown naming the best segmentation-specific method of this run's compute-matched table and whether it got
    extended runs (the paper extends logit KD, feature KD and that method; ``params.yaml`` fixes the list before the
    compute-matched results exist, so a different winner is flagged with the one-line fix)."""
    matched = runs[(runs.protocol == "compute_matched") & runs.method.map(method_family).eq("segmentation-specific KD")]
    matched = matched.dropna(subset=["miou"])
    extended = sorted(set(runs.loc[runs.protocol == "extended", "method"]))
    listed = ", ".join(f"`{m}`" for m in extended) or "none"
    if matched.empty:
        return f"No segmentation-specific method has a compute-matched run; extended runs: {listed}."
    best = matched.loc[matched.miou.idxmax()]
    text = (f"Best segmentation-specific method of the compute-matched table: **`{best.method}`** "
            f"({100 * best.miou:.2f} mIoU). Extended runs: {listed}.")
    if best.method in extended:
        return text
    return (f"{text} **`{best.method}` has no extended runs**: to extend it as the paper does, put it in "
            "`extended.methods` in params.yaml and run `dvc repro`.")


def spread_labels(values: np.ndarray, min_gap: float) -> np.ndarray:
    """Label positions near ``values`` with at least ``min_gap`` between neighbours, order kept: labels that would
    collide are merged into a group spread evenly around the group's mean (so end-of-line labels never overlap)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    groups = [[float(v)] for v in values[order]]

    def layout(group: list[float]) -> np.ndarray:
        return np.mean(group) + (np.arange(len(group)) - (len(group) - 1) / 2) * min_gap

    merged = True
    while merged:
        merged = False
        for i in range(1, len(groups)):
            if layout(groups[i])[0] - layout(groups[i - 1])[-1] < min_gap - 1e-9:
                groups[i - 1 : i + 1] = [groups[i - 1] + groups[i]]
                merged = True
                break
    placed = np.concatenate([layout(group) for group in groups]) if groups else values
    result = np.empty_like(values)
    result[order] = placed
    return result


def plot_budget_curve(curve: pd.DataFrame, runs: pd.DataFrame, profile: str = "") -> Figure:
    """mIoU vs budget multiplier (log2 axis) for methods with extended runs, each line labelled at its end; the best
    other method at 1× as a reference point; teacher and student-alone lines; % of teacher on the right axis."""
    fig, ax = plt.subplots(figsize=(10, 5.4))
    extended = curve[curve.extended]
    colours = method_colours(sorted(extended.method.unique()))
    for method, group in extended.groupby("method"):
        family = method_family(method)
        ax.plot(group.multiplier, group.miou_percent, marker="o", ms=7, lw=2, color=colours[method],
                ls="-" if family == "canonical KD" else "--", label=f"{method} ({family})")
    ends = extended.sort_values("multiplier").groupby("method").last()
    low, high = float(curve.miou_percent.min()), float(curve.miou_percent.max())
    for method, y in zip(ends.index, spread_labels(ends.miou_percent.to_numpy(), 0.045 * max(high - low, 1e-6)), strict=True):
        ax.annotate(f"{method} {ends.loc[method, 'miou_percent']:.2f}", (ends.loc[method, "multiplier"], ends.loc[method, "miou_percent"]),
                    xytext=(ends.loc[method, "multiplier"] * 1.08, y), textcoords="data", va="center", fontsize=9, color=colours[method])
    others = curve[~curve.extended & (curve.method != STUDENT_ALONE)]
    if not others.empty:
        best = others.loc[others.miou_percent.idxmax()]
        ax.scatter([1.0], [best.miou_percent], color="#7f7f7f", marker="D", s=45, zorder=3,
                   label=f"best method without extended runs: {best.method} (1×)")
    student = curve[(curve.method == STUDENT_ALONE) & (curve.multiplier == 1.0)]
    if not student.empty:
        ax.axhline(student.miou_percent.iloc[0], color="#555555", ls=":", lw=1.5, label=f"student alone, 1× ({student.miou_percent.iloc[0]:.2f})")
    teacher = runs[runs.protocol == "teacher"]
    if not teacher.empty:
        teacher_miou = float(teacher.miou_percent.iloc[0])
        ax.axhline(teacher_miou, color="black", ls="--", lw=1.5, label=f"teacher ({teacher_miou:.2f})")
        secondary = ax.secondary_yaxis("right", functions=(lambda y: 100 * y / teacher_miou, lambda p: p * teacher_miou / 100))
        secondary.set_ylabel("% of teacher mIoU")
    multipliers = sorted(curve.multiplier.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(multipliers, [f"{m:g}×" for m in multipliers])
    ax.minorticks_off()
    ax.set_xlim(min(multipliers) / 1.25, max(multipliers) * 1.6)
    ax.set(xlabel="training budget (× the compute-matched wall-clock budget)", ylabel="mIoU (%)")
    ax.set_title("Extended training: mIoU vs budget (solid = canonical KD, dashed = segmentation-specific)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=9, frameon=False)
    fig.tight_layout()
    return figure_note(fig, profile)


def state_of_the_art_table(runs: pd.DataFrame, profile: str) -> pd.DataFrame:
    """Published numbers (Cityscapes, ADE20K, with their source) beside this run's numbers of the same method.

    This run's columns: compute-matched mIoU, the best extended mIoU (with its multiplier) and % of teacher, always
    labelled with the profile. A published row matches every configured variant of its method (``cwd`` and
    ``cwd_published`` both sit beside the published CWD row, one line each).
    """
    published = published_results()
    wide = published.pivot_table(index=["method", "label", "source"], columns="dataset", values=["miou", "percent_of_teacher"], aggfunc="first")
    wide.columns = [f"{value}_{dataset}" for value, dataset in wide.columns]
    wide = wide.reset_index()
    cells = pd.DataFrame({"published row": wide.label, "method": wide.method, "source": wide.source})
    for dataset, name in (("cityscapes", "Cityscapes"), ("ade20k", "ADE20K")):
        cells[f"published {name} mIoU (%)"] = [_published_cell(row, dataset) for _, row in wide.iterrows()]
    ours = _this_run(runs)
    prefix = f"this run ({profile})"
    merged = cells.merge(ours, how="left", left_on="method", right_on="base")
    merged["config"] = merged["config"].fillna("not run")
    merged = merged.rename(columns={"config": f"{prefix}: method config"})
    merged[f"{prefix}: compute-matched mIoU (%)"] = merged.pop("compute")
    merged[f"{prefix}: best extended mIoU (%)"] = merged.pop("extended_cell")
    merged[f"{prefix}: % of teacher"] = merged.pop("percent")
    order = {"teacher": 0, "none": 1, "kd": 2}
    merged["order"] = merged.method.map(lambda m: order.get(m, 3))
    merged = merged.sort_values(["order", "method", "source"]).drop(columns=["order", "base", "method"])
    return merged.reset_index(drop=True)


def _published_cell(row: pd.Series, dataset: str) -> str:
    miou, percent = row.get(f"miou_{dataset}"), row.get(f"percent_of_teacher_{dataset}")
    if miou is not None and not pd.isna(miou):
        return f"{miou:.2f}"
    if percent is not None and not pd.isna(percent):
        return f"{percent:.0f} % of teacher"
    return "—"


def _this_run(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method config: compute-matched mIoU, best extended mIoU (×multiplier), % of teacher of the better one."""
    rows = []
    for method, group in runs.groupby("method"):
        compute = group[group.protocol == ("teacher" if method == "teacher" else "compute_matched")]
        extended = group[group.protocol == "extended"]
        best = extended.loc[extended.miou_percent.idxmax()] if not extended.empty else None
        percents = pd.concat([compute.percent_of_teacher, extended.percent_of_teacher]).dropna()
        rows.append(
            {
                "config": method,
                "base": "teacher" if method == "teacher" else base_method(method),
                "compute": f"{compute.miou_percent.iloc[0]:.2f}" if not compute.empty else "—",
                "extended_cell": f"{best.miou_percent:.2f} ({best.multiplier:g}×)" if best is not None else "—",
                "percent": f"{percents.max():.1f}" if not percents.empty else "—",
            }
        )
    return pd.DataFrame(rows, columns=["config", "base", "compute", "extended_cell", "percent"])


def sources_table() -> pd.DataFrame:
    """The sources cited in :func:`state_of_the_art_table`."""
    return pd.DataFrame([{"source": s.key, "what": s.title, "where": s.url} for s in SOURCES.values()])
