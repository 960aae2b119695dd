"""Cost page (``notebooks/cost.ipynb``): what one training iteration of each method costs on this hardware, how
much that timing varies, and the cost–accuracy (Pareto) view of the paper's argument.

Costs come from ``kdrepro calibrate`` (``calibration.csv``): the median seconds/iteration of interleaved timed
iterations, its quartiles (p25, p75) and the median per-phase split. The compute-matched iteration counts follow
from these medians, so the interquartile range is drawn on every cost bar.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kdrepro.analysis.methods import LOGIT_KD, STUDENT_ALONE
from kdrepro.pipeline.matching import PHASES
from kdrepro.report.style import (
    FAMILY_MARKERS,
    FIGURE_WIDTH,
    family_label,
    figure_note,
    method_colours,
)
from kdrepro.report.verdict_text import budget_by_method, collapse_mark

MIB = 2**20


def cost_table(calibration: pd.DataFrame, names: dict[str, str] | None = None,
               check: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per method (cheapest first, as in the cost figure): ms/iteration with its interquartile range,
    × student alone, × logit KD, GFLOPs, peak MiB, pre-training seconds, the iterations the budget buys against the
    FLOP-matched ones, and (``check``: the compute check of ``verdict.json``) the compute-matched seeds and their
    realised training seconds against the budget, "⚠" where a seed left ±15 %."""
    names = names or {}
    frame = calibration.sort_values("seconds_per_iteration")
    table = pd.DataFrame({"method": frame.method.map(lambda m: names.get(m, m))})
    table["ms / iteration (median)"] = 1000.0 * frame.seconds_per_iteration
    if {"p25_seconds", "p75_seconds"} <= set(frame.columns):
        table["IQR (ms)"] = [f"{1000 * a:.1f}–{1000 * b:.1f}" for a, b in zip(frame.p25_seconds, frame.p75_seconds, strict=True)]
    table["IQR / median (%)"] = 100.0 * frame.relative_spread
    for baseline, label in ((STUDENT_ALONE, "× student alone"), (LOGIT_KD, "× logit KD")):
        column = f"relative_to_{baseline}"
        table[label] = frame[column] if column in frame else np.nan
    table["GFLOPs / iteration"] = frame.flops_per_iteration / 1e9
    table["peak memory (MiB)"] = pd.to_numeric(frame.peak_memory_bytes, errors="coerce") / MIB
    table["pre-training (s)"] = frame.pretrain_seconds
    table["compute-matched iterations"] = frame.matched_iterations
    if "flop_matched_iterations" in frame:
        table["FLOP-matched iterations"] = pd.to_numeric(frame.flop_matched_iterations, errors="coerce")
    budgets = budget_by_method(check)
    if budgets:
        table["seeds"] = [budgets.get(m, {}).get("seeds", np.nan) for m in frame.method]
        table["train s / budget (mean)"] = [_budget_text(budgets.get(m)) for m in frame.method]
    return table.reset_index(drop=True)


def _budget_text(entry: dict[str, Any] | None) -> str:
    if not entry or not np.isfinite(entry.get("seconds", np.nan)):
        return "—"
    text = f"{entry['seconds']:.1f} / {entry['budget']:.1f} s ({100 * entry['seconds'] / entry['budget']:.0f} %)"
    return text if entry.get("within") else f"⚠ {text}, a seed at {100 * entry['worst_ratio']:.0f} %"


def off_budget_style(styler: Any) -> Any:
    """Red, bold cells for the rows of :func:`cost_table` whose compute-matched runs left ±15 % of their budget."""
    column = "train s / budget (mean)"
    if column not in styler.data:
        return styler
    return styler.map(lambda v: "color:#c00000;font-weight:bold" if str(v).startswith("⚠") else "", subset=[column])


def calibration_header(header: dict[str, Any], check: dict[str, Any] | None = None) -> str:
    """Markdown: where and how the costs were measured, and the matched budget they imply; a disturbed-timing
    warning for the methods the calibration or the compute check of ``verdict.json`` (``check``, which applies its
    own limit also where ``calibrate.max_spread`` is null, as in the smoke profile) finds disturbed."""
    hardware = header.get("hardware", {})
    device = hardware.get("gpu") or f"CPU ({hardware.get('cpu', '?')}, {hardware.get('threads', '?')} threads)"
    matched = header.get("matched", {})
    protocol = header.get("protocol", {})
    crop = "×".join(str(v) for v in header.get("crop_size", []))
    budget = matched.get("budget_seconds")
    return (
        f"**Measured on** {device}, torch {hardware.get('torch', '?')}, {header.get('precision', 'fp32')}, batch "
        f"{header.get('batch_size', '?')} of {crop} px crops; {_count(protocol.get('rounds'), 'interleaved round')} × "
        f"{_count(protocol.get('iterations_per_round'), 'iteration')} per method after "
        f"{_count(protocol.get('warmup'), 'warm-up iteration')}.  \n**Matched budget** {seconds_label(budget) if budget is not None else '?'} = "
        f"{matched.get('reference_iterations', '?')} iterations of the reference method "
        f"`{matched.get('reference_method', '?')}`; every compute-matched run gets that much training time."
        + _disturbed_note({**(header.get("disturbed") or {}), **((check or {}).get("disturbed") or {})},
                          header.get("max_spread") if header.get("max_spread") is not None else (check or {}).get("disturbed_spread"))
    )


def _disturbed_note(disturbed: dict[str, float], max_spread: float | None) -> str:
    """Markdown warning for methods whose timing spread says the machine was busy while they were measured."""
    if not disturbed:
        return ""
    listed = ", ".join(f"`{name}` ({100 * spread:.0f} %)" for name, spread in disturbed.items())
    limit = f" above {100 * max_spread:.0f} %" if max_spread is not None else ""
    return (f"  \n**Disturbed timing**: IQR / median{limit} for {listed}. Something else loaded the machine while "
            "they were measured, so their compute-matched iteration counts may be off; calibrate again on an idle "
            "machine (`dvc repro -f -s calibrate`, then `dvc repro`), which re-measures them.")


def _count(value: Any, noun: str) -> str:
    """``"1 interleaved round"``, ``"4 interleaved rounds"``, ``"? interleaved rounds"``."""
    return f"{value} {noun}" if value == 1 else f"{'?' if value is None else value} {noun}s"


def seconds_label(seconds: float) -> str:
    """``"0.102 s"``, ``"12.3 s"``, ``"1,234 s"``."""
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.3g} s"


def memory_note(calibration: pd.DataFrame) -> str:
    """Markdown saying whether peak memory was measured (only on CUDA)."""
    if pd.to_numeric(calibration.peak_memory_bytes, errors="coerce").isna().all():
        return ("**Peak memory: not measured.** The calibration ran on the CPU, where PyTorch keeps no allocator "
                "peak; run `kdrepro calibrate` on a GPU to fill the *peak memory* column.")
    return "Peak memory: `torch.cuda.max_memory_allocated` over each method's timed iterations (MiB = 2^20 bytes)."


def plot_cost(calibration: pd.DataFrame, families: dict[str, str], names: dict[str, str], profile: str = "") -> Figure:
    """Left: median ms/iteration split into phases, with the interquartile range of the total as a whisker.
    Right: cost relative to the student alone, marker by family."""
    frame = calibration.sort_values("seconds_per_iteration").reset_index(drop=True)
    labels = [names.get(m, m) for m in frame.method]
    phases = [p for p in PHASES if f"phase_{p}" in frame]
    fig, axes = plt.subplots(1, 2, figsize=(FIGURE_WIDTH, 1.6 + 0.42 * len(frame)), sharey=True,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    left = np.zeros(len(frame))
    for colour, phase in zip(sns.color_palette("colorblind", len(phases)), phases, strict=False):
        values = 1000.0 * frame[f"phase_{phase}"].fillna(0).to_numpy()
        axes[0].barh(labels, values, left=left, color=colour, label=phase, height=0.7)
        left += values
    median = 1000.0 * frame.seconds_per_iteration.to_numpy()
    if {"p25_seconds", "p75_seconds"} <= set(frame.columns):
        xerr = np.vstack([median - 1000.0 * frame.p25_seconds, 1000.0 * frame.p75_seconds - median]).clip(min=0)
        axes[0].errorbar(median, np.arange(len(frame)), xerr=xerr, fmt="|", color="black", ms=14, capsize=4, lw=1.4,
                         label="median, IQR")
    axes[0].set(xlabel="ms / iteration (phases stacked; whisker = IQR of the total)", title="Cost of one training iteration")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=4, fontsize=9, frameon=False)
    relative = frame.get(f"relative_to_{STUDENT_ALONE}")
    if relative is not None:
        for y, (method, value) in enumerate(zip(frame.method, relative, strict=True)):
            axes[1].plot([1.0, value], [y, y], color="#999", lw=1)
            axes[1].plot(value, y, marker=FAMILY_MARKERS.get(families.get(method, ""), "o"), color="#0072B2", ms=8, ls="")
            axes[1].text(value, y, f"  {value:.2f}×", va="center", fontsize=9)
        axes[1].axvline(1.0, color="black", lw=1)
        axes[1].set_xlim(0.5, float(relative.max()) * 1.35)
    axes[1].set(xlabel="× student alone", title="Relative cost")
    axes[0].invert_yaxis()  # cheapest on top, as in the cost table
    fig.tight_layout(rect=(0, 0.62 / (1.6 + 0.42 * len(frame)), 1, 1))
    return figure_note(fig, profile)


def place_labels(ax: Axes, xs: np.ndarray, ys: np.ndarray, texts: list[str], colours: list[str],
                 side: str = "right", min_gap: float | None = None, column: bool = False) -> list[float]:
    """Write ``texts`` beside the points ``(xs, ys)`` without overlaps: labels that would collide are spread
    vertically around their mean (order kept) and joined to their point by a thin leader line. Returns the label
    y positions (data units). ``column``: the labels form a column outside the axes on ``side`` (clear of every
    marker and error bar: a label-repel layout in one dimension), each joined to its point."""
    ys = np.asarray(ys, dtype=float)
    low, high = ax.get_ylim()
    axis_points = ax.get_position().height * ax.figure.get_figheight() * 72.0
    gap = min_gap if min_gap is not None else 1.7 * 9 / axis_points * abs(high - low)  # 1.7 lines of 9 pt text
    placed = spread_labels(ys, gap)
    offset = 12 if side == "right" else -12
    for x, y, label_y, text, colour in zip(xs, ys, placed, texts, colours, strict=True):
        if column:
            ax.annotate(text, (x, y), xytext=(1.02 if side == "right" else -0.02, label_y),
                        textcoords=("axes fraction", "data"), ha="left" if side == "right" else "right",
                        va="center", fontsize=9, color=colour, annotation_clip=False,
                        arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "alpha": 0.7, "shrinkA": 0, "shrinkB": 4})
            continue
        moved = abs(label_y - y) > 1e-9
        ax.annotate(text, (x, y), xytext=(offset, label_y), textcoords=("offset points", "data"),
                    ha="left" if side == "right" else "right", va="center", fontsize=9, color=colour,
                    annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 0, "shrinkB": 3} if moved else None)
    return list(placed)


def spread_labels(values: np.ndarray, min_gap: float) -> np.ndarray:
    """Positions near ``values`` with at least ``min_gap`` between neighbours, order kept: colliding labels are
    merged into a group spread evenly around the group's mean."""
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


def cost_unit(header: dict[str, Any]) -> tuple[str, float]:
    """The cost axis: GPU-hours on a GPU (seconds / 3600), training seconds otherwise; (label, divisor)."""
    hardware = header.get("hardware", {})
    if hardware.get("gpu"):
        return f"training cost (GPU-hours, {hardware['gpu']})", 3600.0
    return "training cost (seconds of training on this CPU)", 1.0


def plot_pareto(stats: pd.DataFrame, families: dict[str, str], names: dict[str, str], header: dict[str, Any],
                profile: str = "") -> Figure:
    """mIoU (mean ± 95 % CI over seeds) against mean training cost for every iteration-matched, compute-matched
    and extended student run: marker = family, filled = iteration-matched, hollow = compute-matched/extended.
    The Pareto front (no cheaper run is better) is drawn as a step line; labels never overlap, and say how many of
    a method's runs collapsed to one class, if any did."""
    label, divisor = cost_unit(header)
    students = stats[stats.protocol.isin(["iter_matched", "compute_matched", "extended"])].dropna(subset=["miou_mean"])
    colours = method_colours(students.method)
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH, 5.6))
    for row in students.itertuples():
        cost = row.train_seconds_mean / divisor
        hollow = row.protocol != "iter_matched"
        ax.errorbar(cost, row.miou_mean, yerr=[[row.miou_mean - row.miou_ci_low], [row.miou_ci_high - row.miou_mean]]
                    if not pd.isna(row.miou_ci_low) else None, fmt=FAMILY_MARKERS.get(families.get(row.method, ""), "o"),
                    color=colours[row.method], mfc="white" if hollow else colours[row.method], ms=8, capsize=3, lw=1.2)
    front = pareto_front(students.train_seconds_mean.to_numpy() / divisor, students.miou_mean.to_numpy())
    if len(front):
        ax.step(front[:, 0], front[:, 1], where="post", color="#888", lw=1, ls="--", zorder=0, label="Pareto front")
    ax.set_xscale("log")
    ax.set(xlabel=label + ", log scale", ylabel="mIoU (%), mean ± 95 % CI", title="Cost–accuracy: what each run's training cost bought")
    ax.margins(x=0.08)
    low, high = ax.get_ylim()  # mIoU lies in [0, 100]: a wide interval of a diverged method does not stretch the axis
    ax.set_ylim(max(low, 0.0), min(high, 100.0))
    _log_ticks(ax, students.train_seconds_mean.to_numpy() / divisor)
    ends = students.sort_values("train_seconds_mean").groupby("method").tail(1)  # each method once: its costliest run
    place_labels(ax, ends.train_seconds_mean.to_numpy() / divisor, ends.miou_mean.to_numpy(),
                 [names.get(m, m) + collapse_mark(students[students.method == m]) for m in ends.method],
                 [colours[m] for m in ends.method], column=True)
    handles = [plt.Line2D([], [], color="#333", marker=FAMILY_MARKERS[f], ls="", label=family_label(f))
               for f in ("student", "canonical", "segmentation_specific")]
    handles += [plt.Line2D([], [], color="#333", marker="o", ls="", label="iteration-matched (filled)"),
                plt.Line2D([], [], color="#333", marker="o", mfc="white", ls="", label="compute-matched / extended (hollow)")]
    ax.legend(handles=handles + ([ax.get_lines()[-1]] if len(front) else []), loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the label column on the right
    return figure_note(fig, profile)


def _log_ticks(ax: Axes, values: np.ndarray) -> None:
    """Readable ticks (1, 2, 5 × powers of ten) on a log axis spanning ``values``."""
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return
    low, high = np.floor(np.log10(values.min())) - 1, np.ceil(np.log10(values.max())) + 1
    ticks = [m * 10.0**e for e in np.arange(low, high + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if values.min() / 1.6 <= t <= values.max() * 1.6]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(plt.NullLocator())


def pareto_front(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The points no cheaper-or-equal point beats, sorted by cost: ``[[cost, score], ...]``."""
    order = np.lexsort((-np.asarray(scores), np.asarray(costs)))
    front, best = [], -np.inf
    for index in order:
        if scores[index] > best:
            front.append((costs[index], scores[index]))
            best = scores[index]
    return np.asarray(front)
