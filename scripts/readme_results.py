"""Render a finished pipeline's headline table, verdict and two figures for the README, from its tidy tables.

    python scripts/readme_results.py --profile synthetic [--results results] [--out docs/results] [--name NAME]

Reads ``results/<profile>/{stats.csv,verdict.json,runs.csv,calibration.csv}`` (written by ``kdrepro results``) and
writes ``<out>/<name>/{table.md,matched.png,extended.png}`` (``name``: the profile unless given, e.g. for a second
run of one profile on another machine): the markdown the README embeds and two figures (mean and 95 % interval over
seeds; canonical vs segmentation-specific told apart by marker, not colour alone), and beside them a copy of the
tidy tables they were made from, so the published numbers and their tables never come from different runs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from kdrepro.report.matched import classes_sentence  # noqa: E402
from kdrepro.train.speed_choice import speed_sentence  # noqa: E402

MARKERS = {"student": "s", "canonical": "o", "segmentation_specific": "^"}
METHOD_MARKERS = {"kd": "o", "fitnet": "D"}  # the two canonical methods apart without colour
FAMILY_ORDER = {"student": 0, "canonical": 1, "segmentation_specific": 2}
PALETTE = sns.color_palette("colorblind")
COLORS = {"student": PALETTE[7], "canonical": PALETTE[0], "segmentation_specific": PALETTE[3]}


def _interval(row: pd.Series, prefix: str = "miou") -> str:
    mean, low, high = row[f"{prefix}_mean"], row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"]
    diverged = int(row.get("n_diverged", 0) or 0) if prefix == "miou" else 0
    if not math.isfinite(mean):
        return "diverged"
    text = f"{mean:.1f} ± {(high - low) / 2:.1f}" if math.isfinite(low) else f"{mean:.1f}"
    if diverged:
        text += f" ({diverged} of {int(row['n_seeds']) + diverged} seeds diverged)"
    return text


def _delta(row: pd.Series, prefix: str) -> str:
    mean = row.get(f"{prefix}_mean")
    if mean is None or not math.isfinite(mean):
        return "—"
    low, high = row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:+.1f} (one seed pair: no interval)"
    text = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"
    return f"**{text}**" if bool(row.get(f"{prefix}_significant")) else text


def table(stats: pd.DataFrame, calibration: pd.DataFrame | None) -> str:
    """Table 1: one row per method, grouped by family; bold intervals exclude 0."""
    one = stats[stats.multiplier == 1.0]
    wide = one.pivot_table(index=["method"], columns="protocol", values="miou_mean", aggfunc="first")
    rows = []
    methods = sorted(wide.index, key=lambda m: (FAMILY_ORDER.get(_family(one, m), 3), m != "none", m))
    for method in methods:
        it = one[(one.protocol == "iter_matched") & (one.method == method)]
        cm = one[(one.protocol == "compute_matched") & (one.method == method)]
        if it.empty or cm.empty:
            continue
        it, cm = it.iloc[0], cm.iloc[0]
        cost = "—"
        if calibration is not None and method in set(calibration.method):
            cost = f"{float(calibration.set_index('method').loc[method, 'relative_to_kd']):.2f}"
        rows.append(f"| {cm.display_name} | {_family(one, method).replace('_', '-')} | {_interval(it)} | "
                    f"{_interval(cm)} | {cost} | {cm.iterations_mean:.0f} | {_delta(cm, 'delta_student')} | "
                    f"{_delta(cm, 'delta_kd')} |")  # fmt: skip
    header = ("| method | family | iteration-matched mIoU | compute-matched mIoU | cost / iteration (× kd) | "
              "iterations (compute-matched) | Δ vs student alone (compute-matched) | Δ vs logit KD (compute-matched) |\n"
              "|---|---|---|---|---|---|---|---|")  # fmt: skip
    return header + "\n" + "\n".join(rows)


def _family(stats: pd.DataFrame, method: str) -> str:
    values = stats.loc[stats.method == method, "family"].dropna()
    return str(values.iloc[0]) if len(values) else "segmentation_specific"


def matched_figure(stats: pd.DataFrame, path: Path) -> None:
    one = stats[(stats.multiplier == 1.0) & stats.protocol.isin(["iter_matched", "compute_matched"])]
    order = one[one.protocol == "compute_matched"].sort_values("miou_mean").method.tolist()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(order) + 1.6), sharey=True, dpi=150)
    for ax, protocol, title in zip(axes, ("iter_matched", "compute_matched"),
                                   ("iteration-matched", "compute-matched (same wall-clock)"), strict=True):  # fmt: skip
        part = one[one.protocol == protocol].set_index("method")
        for y, method in enumerate(order):
            if method not in part.index:
                continue
            row = part.loc[method]
            family = str(row.family)
            err = (row.miou_ci_high - row.miou_ci_low) / 2 if math.isfinite(row.miou_ci_low) else 0
            ax.errorbar(row.miou_mean, y, xerr=err, fmt=MARKERS.get(family, "o"), color=COLORS.get(family, "k"),
                        capsize=3, markersize=6)  # fmt: skip
        student = part.loc["none"] if "none" in part.index else None
        if student is not None:
            ax.axvspan(student.miou_ci_low, student.miou_ci_high, color=COLORS["student"], alpha=0.15, lw=0)
            ax.axvline(student.miou_mean, color=COLORS["student"], ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("mIoU (%), mean and 95 % interval over seeds (clipped at 0)")
        ax.set_xlim(left=0)
    axes[0].set_yticks(range(len(order)), [one[one.method == m].display_name.iloc[0] for m in order])
    handles = [plt.Line2D([], [], marker=MARKERS[f], color=COLORS[f], ls="", label=f.replace("_", "-"))
               for f in ("student", "canonical", "segmentation_specific")]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def extended_figure(stats: pd.DataFrame, runs: pd.DataFrame, path: Path) -> None:
    rows = stats[(stats.protocol == "extended") | ((stats.protocol == "compute_matched") &
                 stats.method.isin(stats[stats.protocol == "extended"].method.unique()))]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4), dpi=150)
    for method, group in rows.groupby("method"):
        group = group.sort_values("multiplier")
        family = str(group.family.iloc[0])
        style = {"student": "--", "canonical": "-" if method == "kd" else "-."}.get(family, "-")
        ax.plot(group.multiplier, group.miou_mean, marker=METHOD_MARKERS.get(method, MARKERS.get(family, "o")),
                color=COLORS.get(family, "k"), ls=style, label=group.display_name.iloc[0])  # fmt: skip
        ax.fill_between(group.multiplier, group.miou_ci_low, group.miou_ci_high, color=COLORS.get(family, "k"), alpha=0.12)
    teacher = runs[runs.protocol == "teacher"].miou
    if len(teacher):
        level = 100 * float(teacher.iloc[0])
        ax.axhline(level, color="k", lw=1, ls=":")
        low, high = ax.get_ylim()
        ax.set_ylim(low, max(high, level + 0.06 * (high - low)))  # room for the label above the line
        ax.text(1.0, level, f" teacher {level:.1f}", va="bottom", ha="left", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(rows.multiplier.unique()), [f"{m:g}×" for m in sorted(rows.multiplier.unique())])
    ax.set_xlabel("budget (× the compute-matched budget)")
    ax.set_ylabel("mIoU (%), mean and 95 % interval")
    ax.set_title("Extended training, with the student alone at every budget")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: The tidy tables copied beside the README's table and figures.
TIDY = ("stats.csv", "runs.csv", "calibration.csv", "verdict.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="synthetic")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--name", help="the folder under --out (default: the profile)")
    args = parser.parse_args()
    folder = args.results / args.profile
    stats = pd.read_csv(folder / "stats.csv")
    runs = pd.read_csv(folder / "runs.csv")
    verdict = json.loads((folder / "verdict.json").read_text())
    calibration = pd.read_csv(folder / "calibration.csv") if (folder / "calibration.csv").exists() else None
    out = args.out / (args.name or args.profile)
    out.mkdir(parents=True, exist_ok=True)
    for name in TIDY:
        if (folder / name).exists():
            shutil.copyfile(folder / name, out / name)
    matched_figure(stats, out / "matched.png")
    extended_figure(stats, runs, out / "extended.png")
    regime = verdict["regime"]
    lines = [f"Profile `{args.profile}`, seeds {regime.get('seeds')}, {platform.processor() or platform.machine()}, "
             f"rendered {date.today().isoformat()} by `python scripts/readme_results.py --profile {args.profile}{f' --name {args.name}' if args.name else ''}`."
             f" {speed_sentence(regime.get('speed'))}".rstrip(),
             "", f"*Regime:* teacher {regime.get('teacher_miou', float('nan')):.1f} mIoU, student alone "
             f"{regime.get('student_miou', float('nan')):.1f} at the reference schedule (gap "
             f"{regime.get('teacher_gap', float('nan')):.1f} points); {regime.get('schedule')}. {classes_sentence(regime)}", "",
             "| claim | verdict | evidence |", "|---|---|---|"]  # fmt: skip
    lines += [f"| ({c['id']}) {c['claim']} | **{c['verdict']}** | {c['evidence']} |" for c in verdict["claims"]]
    lines += ["", table(stats, calibration), "",
              "mean ± half-width of the 95 % t-interval over seeds; Δ: seed-paired differences with their 95 % interval, "
              "**bold** where the interval excludes 0."]  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten {out}/table.md, matched.png, extended.png and the tidy tables {', '.join(TIDY)}")


if __name__ == "__main__":
    main()
