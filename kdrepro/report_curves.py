"""Training-curve report (``notebooks/curves.ipynb``): validation mIoU and training loss against training seconds,
from the dvclive logs collected by :func:`kdrepro.results.load_curves` (``results/<profile>/curves.csv``). Seconds
come from the ``train/seconds`` metric (the training clock: only training steps count), joined on the step.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from kdrepro.report import PROTOCOL_LABELS, figure_note, method_colours


def curves_over_time(curves: pd.DataFrame, runs: pd.DataFrame, metrics: tuple[str, ...] = ("val/miou", "train/total")) -> pd.DataFrame:
    """Training curves against training seconds: each logged value joined with ``train/seconds`` of the same run at
    the same (or the closest earlier) step; the final evaluation of each run is appended to ``val/miou``.

    Columns: run, protocol, method, multiplier, step, seconds, metric, value (mIoU in %)."""
    seconds = curves[curves.metric == "train/seconds"][["run", "step", "value"]].rename(columns={"value": "seconds"})
    wanted = curves[curves.metric.isin(metrics)][["run", "step", "metric", "value"]]
    joined = [
        pd.merge_asof(group.sort_values("step"), seconds[seconds.run == run].sort_values("step").drop(columns="run"), on="step")
        for run, group in wanted.groupby("run")
        if (seconds.run == run).any()
    ]
    frame = pd.concat(joined, ignore_index=True) if joined else pd.DataFrame(columns=["run", "step", "metric", "value", "seconds"])
    if "val/miou" in metrics:
        final = runs[runs.protocol != "teacher"][["run", "iterations", "train_seconds", "miou"]]
        final = final.rename(columns={"iterations": "step", "train_seconds": "seconds", "miou": "value"}).assign(metric="val/miou")
        frame = pd.concat([frame, final], ignore_index=True).drop_duplicates(subset=["run", "metric", "step"], keep="last")
    frame.loc[frame.metric == "val/miou", "value"] = 100.0 * frame.loc[frame.metric == "val/miou", "value"].astype(float)
    info = runs.set_index("run")[["protocol", "method", "multiplier"]]
    frame = frame.join(info, on="run")
    return frame.dropna(subset=["seconds"]).sort_values(["run", "metric", "step"]).reset_index(drop=True)


def curves_note(frame: pd.DataFrame) -> str:
    """Markdown warning when validation mIoU was only measured at the end of each run (``eval_every: 0``)."""
    points = frame[frame.metric == "val/miou"].groupby("run").size()
    if points.empty or points.max() <= 1:
        return (
            "**mIoU was evaluated only at the end of each run** (`eval_every: 0`), so each run is one point at its "
            "final training seconds. Set `eval_every` (iterations) in the profile to get intermediate curves."
        )
    return "mIoU points: every `eval_every` iterations plus the final evaluation of each run."


def plot_curves(frame: pd.DataFrame, metric: str, ylabel: str, profile: str = "", log_y: bool = False) -> Figure:
    """One panel per protocol: ``metric`` vs training seconds, colour = method; in the extended panel the line
    style gives the budget multiplier. ``log_y`` applies only when the values span more than a factor of 5."""
    data = frame[(frame.metric == metric) & (frame.protocol != "teacher")]
    protocols = [p for p in ("iter_matched", "compute_matched", "extended") if p in set(data.protocol)] or ["compute_matched"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.3 * len(protocols) + 2.2, 4.4), squeeze=False, sharey=True)
    colours = method_colours(sorted(data.method.unique()))
    dashes = dict(zip(sorted(data.multiplier.unique()), ["-", "--", "-.", ":", (0, (1, 3))] * 4, strict=False))
    values = data.value.astype(float)
    use_log = log_y and not values.empty and values.min() > 0 and values.max() / values.min() > 5
    single_points = data.groupby("run").size().max() <= 2 if not data.empty else True
    marker_size = 7 if single_points else 3  # end-of-run points only (eval_every 0) must still be visible
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for (method, multiplier), run in data[data.protocol == protocol].groupby(["method", "multiplier"]):
            ax.plot(run.seconds, run.value, color=colours[method], ls=dashes[multiplier], marker="o", ms=marker_size, lw=1.6)
        ax.set(title=PROTOCOL_LABELS[protocol], xlabel="training seconds (training clock)")
        if use_log:
            ax.set_yscale("log")
    axes[0][0].set_ylabel(ylabel + (" (log scale)" if use_log else ""))
    handles = [plt.Line2D([], [], color=colour, marker="o", ms=4, label=method) for method, colour in colours.items()]
    if "extended" in protocols:
        handles += [plt.Line2D([], [], color="#444444", ls=dashes[m], label=f"budget {m:g}×") for m in dashes]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    fig.tight_layout()
    return figure_note(fig, profile)
