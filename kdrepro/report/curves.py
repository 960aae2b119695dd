"""Training-curve page (``notebooks/curves.ipynb``): validation mIoU at a few points during every run and the
plain cross-entropy of the student (``train/ce``, the same quantity for every method, unlike the weighted total),
against training seconds (the training clock: only training steps count), mean ± standard deviation over seeds.
Extended runs get small multiples, one panel per method, with each budget's end marked.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kdrepro.analysis.methods import STUDENT_ALONE
from kdrepro.report.style import (
    FAMILY_LINES,
    FIGURE_WIDTH,
    PROTOCOL_LABELS,
    family_label,
    figure_note,
    method_colours,
)

CE = "train/ce"
MIOU = "val/miou"


def curves_over_time(curves: pd.DataFrame, runs: pd.DataFrame, smooth: int = 5) -> pd.DataFrame:
    """Per run: ``val/miou`` (percent, the final evaluation appended) and ``train/ce`` (rolling median over
    ``smooth`` logged points), each joined with ``train/seconds`` at the same or closest earlier step.
    Columns: run, protocol, method, multiplier, seed, metric, step, seconds, value."""
    seconds = curves[curves.metric == "train/seconds"][["run", "step", "value"]].rename(columns={"value": "seconds"})
    frames = []
    for (run, metric), group in curves[curves.metric.isin([CE, MIOU])].groupby(["run", "metric"]):
        group = group.sort_values("step")[["run", "step", "metric", "value"]].copy()
        if metric == CE and smooth > 1:
            group["value"] = group.value.rolling(smooth, min_periods=1, center=True).median()
        clock = seconds[seconds.run == run].sort_values("step").drop(columns="run")
        if len(clock):
            frames.append(pd.merge_asof(group, clock, on="step", direction="backward"))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "step", "metric", "value", "seconds"])
    final = runs[runs.protocol != "teacher"].dropna(subset=["miou"])[["run", "iterations", "train_seconds", "miou"]]
    final = final.rename(columns={"iterations": "step", "train_seconds": "seconds", "miou": "value"}).assign(metric=MIOU)
    frame = pd.concat([frame, final], ignore_index=True).drop_duplicates(subset=["run", "metric", "step"], keep="last")
    frame.loc[frame.metric == MIOU, "value"] = 100.0 * frame.loc[frame.metric == MIOU, "value"].astype(float)
    frame = frame.join(runs.set_index("run")[["protocol", "method", "multiplier", "seed"]], on="run")
    return frame.dropna(subset=["seconds", "protocol"]).sort_values(["run", "metric", "step"]).reset_index(drop=True)


def over_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds at each step (seeds of one method share the step grid)."""
    keys = ["protocol", "method", "multiplier", "metric", "step"]
    grouped = frame.groupby(keys)
    out = grouped.agg(seconds=("seconds", "mean"), mean=("value", "mean"), std=("value", "std"), n=("value", "size"))
    return out.reset_index().fillna({"std": 0.0})


def evaluation_note(frame: pd.DataFrame) -> str:
    """Markdown: how many validation points each run has (a run evaluated only at its end is one point)."""
    points = frame[frame.metric == MIOU].groupby("run").size()
    if points.empty:
        return "No validation mIoU was logged."
    if points.max() <= 1:
        return ("**mIoU was evaluated only at the end of each run** in this profile: set `eval_points` (evenly spaced "
                "evaluations per run) in the profile for learning curves. Points are the mean over seeds, error bars ± "
                "one standard deviation.")
    count = f"{points.min()}" if points.min() == points.max() else f"{points.min()}–{points.max()}"
    return (f"Validation mIoU at {count} points per run (`eval_points` evenly spaced evaluations and the end); lines "
            "are the mean over seeds, error bars and bands ± one standard deviation.")


def _band(ax, group: pd.DataFrame, colour: str, style: str, label: str | None = None) -> None:
    group = group.sort_values("seconds")
    if len(group) <= 8:  # a few evaluation points: error bars (± sd over seeds) on each
        ax.errorbar(group.seconds, group["mean"], yerr=group["std"], color=colour, ls=style, lw=1.8, marker="o", ms=4,
                    capsize=3, label=label)
        return
    ax.plot(group.seconds, group["mean"], color=colour, ls=style, lw=1.8, label=label)
    ax.fill_between(group.seconds, group["mean"] - group["std"], group["mean"] + group["std"], color=colour, alpha=0.15, lw=0)


def _clip_outliers(axes, data: pd.DataFrame, names: dict[str, str]) -> None:
    """Keep the y-axis on the bulk of the methods when one run blows up (a diverging loss would flatten every other
    line to zero): limit it to 1.5x the 90th percentile and name the methods drawn off the scale."""
    values = data["mean"].replace([np.inf, -np.inf], np.nan).dropna()
    if values.empty:
        return
    upper = 1.5 * float(np.nanpercentile(values, 90))
    high = sorted({names.get(m, m) for m in data.loc[data["mean"] > upper, "method"]})
    if not high or upper <= 0:
        return
    for ax in axes:
        ax.set_ylim(min(0.0, float(values.min())), upper)
    axes[-1].text(1.0, -0.16, "off the scale: " + ", ".join(high), transform=axes[-1].transAxes, ha="right", va="top",
                  fontsize=8, color="#8a1c1c")


def plot_matched(agg: pd.DataFrame, metric: str, ylabel: str, families: dict[str, str], names: dict[str, str],
                 budget_seconds: float | None = None, profile: str = "") -> Figure:
    """One panel per matched protocol: ``metric`` vs training seconds, a line per method (line style = family,
    band = ± sd over seeds); the compute-matched budget is marked."""
    data = agg[(agg.metric == metric) & agg.protocol.isin(["iter_matched", "compute_matched"])]
    protocols = [p for p in ("iter_matched", "compute_matched") if p in set(data.protocol)]
    colours = method_colours(data.method)
    fig, axes = plt.subplots(1, max(len(protocols), 1), figsize=(FIGURE_WIDTH, 4.6), squeeze=False, sharey=True)
    for ax, protocol in zip(axes[0], protocols, strict=False):
        for method, group in data[data.protocol == protocol].groupby("method"):
            _band(ax, group, colours[method], FAMILY_LINES.get(families.get(method, ""), "-"), names.get(method, method))
        if budget_seconds:
            ax.axvline(budget_seconds, color="#444", lw=1, ls=(0, (4, 3)))
            ax.text(budget_seconds, 1.0, " matched budget", transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=9)
        ax.set(title=PROTOCOL_LABELS[protocol], xlabel="training seconds")
    axes[0][0].set_ylabel(ylabel)
    _clip_outliers(axes[0], data, names)
    handles, labels = axes[0][0].get_legend_handles_labels()
    family_handles = [plt.Line2D([], [], color="#333", ls=FAMILY_LINES[f], label=family_label(f))
                      for f in ("canonical", "segmentation_specific")]
    fig.legend(handles + family_handles, labels + [h.get_label() for h in family_handles], loc="lower center",
               ncols=min(6, len(handles) + 2), frameon=False, fontsize=9)
    rows = int(np.ceil((len(handles) + 2) / 6))
    fig.tight_layout(rect=(0, 0.06 + 0.05 * rows, 1, 1))
    return figure_note(fig, profile)


def plot_extended(agg: pd.DataFrame, metric: str, ylabel: str, names: dict[str, str],
                  budget_seconds: float | None = None, profile: str = "") -> Figure:
    """Small multiples for extended training: one panel per method (shared axes), a line per budget (1× =
    compute-matched), the end of each budget marked by a vertical line."""
    methods = sorted(set(agg[agg.protocol == "extended"].method), key=lambda m: (m != STUDENT_ALONE, m))  # control first
    data = agg[(agg.metric == metric) & agg.method.isin(methods)
               & ((agg.protocol == "extended") | ((agg.protocol == "compute_matched") & (agg.multiplier == 1.0)))]
    multipliers = sorted(data.multiplier.unique())
    shades = dict(zip(multipliers, ["#9ecae1", "#4292c6", "#08519c", "#08306b", "#041a3a"], strict=False))
    columns = min(len(methods), 4) or 1
    rows = int(np.ceil(len(methods) / columns)) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(FIGURE_WIDTH, 3.0 * rows + 1.0), squeeze=False, sharex=True, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        for multiplier, group in data[data.method == method].groupby("multiplier"):
            _band(ax, group, shades.get(multiplier, "#333"), "-", f"{multiplier:g}×")
            if budget_seconds:
                ax.axvline(multiplier * budget_seconds, color=shades.get(multiplier, "#333"), lw=0.8, ls=":")
        ax.set_title(names.get(method, method), fontsize=11)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training seconds")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=shades.get(m, "#333"), lw=2, label=f"budget {m:g}× (dotted: its end)") for m in multipliers]
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return figure_note(fig, profile)
