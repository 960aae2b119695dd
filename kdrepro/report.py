"""Tables and figures of the report notebooks (``notebooks/*.ipynb``, rendered by the ``report`` DVC stage).

The notebooks stay thin: they load the tidy tables of :mod:`kdrepro.results` through :func:`read_runs` /
:func:`read_calibration`, call one helper per table or figure, and show the result. Everything that computes something
(ranks, deltas, percent of teacher, the budget curve, the published side-by-side) lives in the ``kdrepro.report*``
modules and is unit tested (``tests/test_report.py``). Conventions: mIoU is shown in percent (``kdrepro.evaluate`` stores a fraction),
per-iteration cost in ms, FLOPs in GFLOPs (``torch.utils.flop_counter``: 2 FLOPs per multiply-add), memory in MiB.

Protocols (DESIGN §1, §5): *iteration-matched* = every method trains the reference iteration count;
*compute-matched* = every method gets the same wall-clock budget (the reference method's cost × the reference
iteration count), so its iteration count follows from its measured seconds/iteration; *extended* = a multiple of the
compute-matched budget. Other modules: :mod:`kdrepro.report_extended` (budget curve, published side-by-side),
:mod:`kdrepro.report_curves` (training curves), :mod:`kdrepro.report_qualitative`, :mod:`kdrepro.report_index`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kdrepro.errors import ConfigError
from kdrepro.published import base_method
from kdrepro.results import collect_runs, load_calibration, load_curves

REFERENCE_METHOD = "kd"  # canonical logit KD: the row every Δ is taken against
STUDENT_ALONE = "none"
CANONICAL_METHODS = ("kd", "fitnet", "at", "kd_fitnet")  # canonical logit / feature KD; the rest is segmentation-specific
PROTOCOL_LABELS = {
    "iter_matched": "iteration-matched",
    "compute_matched": "compute-matched",
    "extended": "extended",
    "teacher": "teacher",
}
MIB = 2**20
#: The phases of one training iteration, as ``kdrepro.train.timing.PHASES`` (copied: importing it would import
#: torch into every report kernel; tests/test_report.py checks they agree).
PHASES = ("data", "teacher", "student", "distill", "backward", "optimizer", "method_step")


def style() -> None:
    """One plotting style for every report: seaborn's whitegrid, readable fonts, PNG output."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=1.0)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "axes.titleweight": "bold", "figure.autolayout": False})


def method_family(method: str) -> str:
    """``teacher``, ``student alone``, ``canonical KD`` or ``segmentation-specific KD`` (for colours and legends)."""
    if method == "teacher":
        return "teacher"
    if method == STUDENT_ALONE:
        return "student alone"
    return "canonical KD" if base_method(method) in CANONICAL_METHODS or method in CANONICAL_METHODS else "segmentation-specific KD"


def method_colours(methods: list[str]) -> dict[str, tuple[float, float, float]]:
    """A distinct colour per method, stable for a given method list: the student alone black, the others tab10 then
    the dark tab20b shades (15 in all), husl beyond that."""
    others = [m for m in methods if m != STUDENT_ALONE]
    palette = sns.color_palette("tab10", 10) + sns.color_palette("tab20b", 20)[0::4]
    if len(others) > len(palette):
        palette = sns.color_palette("husl", len(others))
    colours = dict(zip(others, palette, strict=False))
    if STUDENT_ALONE in methods:
        colours[STUDENT_ALONE] = (0.0, 0.0, 0.0)
    return {method: colours[method] for method in methods}


def profile_banner(profile: str) -> str:
    """HTML shown at the top of every report: a loud warning for the synthetic profile, a plain line otherwise."""
    if profile == "synthetic":
        return (
            '<div style="border:3px solid #c0392b;background:#fdecea;padding:10px 14px;margin:6px 0;font-size:15px">'
            "<b>SYNTHETIC PROFILE — not the paper's results.</b> Every number below comes from procedurally generated "
            "street scenes and reduced-width models trained for minutes on this machine. They exercise the whole "
            "protocol end to end; they are not comparable with published Cityscapes / ADE20K mIoU.</div>"
        )
    return (
        f'<div style="border:1px solid #888;padding:6px 12px;margin:6px 0">Profile <b>{html.escape(profile)}</b>: '
        "numbers measured by this pipeline run; published numbers are labelled with their source.</div>"
    )


def figure_note(fig: Figure, profile: str) -> Figure:
    """Stamp ``synthetic profile`` on a figure so a copied picture is never mistaken for the paper's."""
    if profile == "synthetic":
        fig.text(0.995, 0.995, "synthetic profile — not paper results", ha="right", va="top", color="#c0392b", fontsize=9)
    return fig


def styled(frame: pd.DataFrame, decimals: int = 2, formats: dict | None = None, highlight: tuple[str, ...] = (REFERENCE_METHOD,)):
    """A pandas Styler for the HTML reports: no index, floats at ``decimals`` (or per-column ``formats``), integer
    columns without decimals, "—" for missing values, text left-aligned, URLs as links, and the rows of the
    ``highlight`` methods (logit KD by default) shaded."""
    formats = dict(formats or {})
    text_columns = []
    for column in frame.columns:
        values = frame[column]
        if column in formats:
            continue
        if not pd.api.types.is_numeric_dtype(values):
            text_columns.append(column)
            if values.astype(str).str.startswith("http").any():
                formats[column] = lambda url: f'<a href="{url}">{url}</a>'
            continue
        whole = bool(len(values.dropna())) and values.dropna().apply(lambda v: float(v).is_integer()).all()
        formats[column] = "{:,.0f}" if whole else f"{{:.{decimals}f}}"
    styler = frame.style.hide(axis="index").format(formats, na_rep="—")
    styler = styler.set_properties(subset=text_columns, **{"text-align": "left"})
    method_column = next((c for c in frame.columns if (c[-1] if isinstance(c, tuple) else c) == "method"), None)
    if method_column is not None and highlight:
        shaded = frame[method_column].isin(highlight)
        styler = styler.apply(lambda row: ["background-color: #fff3cd" if shaded[row.name] else "" for _ in row], axis=1)
    return styler.set_table_styles(
        [{"selector": "th", "props": "text-align: center; font-size: 90%"}, {"selector": "td", "props": "font-size: 90%"}]
    )


# ----------------------------------------------------------------------------------------------------- loading


def read_runs(results_dir: str | Path, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """``results_dir/runs.csv`` (written by ``kdrepro results``), else collected from ``runs_dir``; mIoU also in %."""
    path = Path(results_dir) / "runs.csv"
    if path.is_file():
        runs = pd.read_csv(path)
    elif runs_dir is not None and Path(runs_dir).is_dir():
        runs = collect_runs(runs_dir)
    else:
        raise ConfigError(f"{path} does not exist; run `kdrepro results` (the DVC `results` stage) first")
    if runs.empty:
        raise ConfigError(f"no finished run (metrics.json) under {runs_dir or results_dir}; train some methods first")
    runs["miou_percent"] = 100.0 * runs["miou"]
    if "percent_of_teacher" not in runs:
        runs["percent_of_teacher"] = np.nan  # no teacher run
    return runs


def read_calibration(runs_dir: str | Path) -> pd.DataFrame:
    """``runs_dir/calibration.json`` as one row per method, plus ``terms`` (what the method trains with).

    The JSON's header (matched budget, reference method, hardware, ...) stays in ``frame.attrs``.
    """
    path = Path(runs_dir) / "calibration.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run `kdrepro calibrate` (the DVC `calibrate` stage) first")
    frame = load_calibration(path)
    terms = {name: entry.get("terms") or {} for name, entry in json.loads(path.read_text())["methods"].items()}
    frame["terms"] = frame["method"].map(lambda name: describe_terms(terms.get(name, {})))
    return frame


def describe_terms(terms: dict[str, dict]) -> str:
    """``{"kd": {"weight": 1}, "cwd": {"weight": 3}}`` -> ``"kd λ=1 + cwd λ=3"``; no term -> ``"CE only"``."""
    if not terms:
        return "CE only"
    return " + ".join(f"{name} λ={float((options or {}).get('weight', 1.0)):g}" for name, options in terms.items())


def read_curves(results_dir: str | Path, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """``results_dir/curves.csv`` (the dvclive logs), else :func:`kdrepro.results.load_curves` on ``runs_dir``."""
    path = Path(results_dir) / "curves.csv"
    if path.is_file():
        return pd.read_csv(path)
    if runs_dir is not None:
        return load_curves(runs_dir)
    raise ConfigError(f"{path} does not exist; run `kdrepro results` first")


# ----------------------------------------------------------------------------------------------------- cost


def cost_table(calibration: pd.DataFrame) -> pd.DataFrame:
    """One row per method: ms/iteration, spread, × student alone, × logit KD, GFLOPs, peak MiB, pre-training s."""
    table = pd.DataFrame({"method": calibration["method"], "trains with": calibration["terms"]})
    table["ms / iteration"] = 1000.0 * calibration["seconds_per_iteration"]
    table["IQR (% of median)"] = 100.0 * calibration["relative_spread"]
    for baseline in (STUDENT_ALONE, REFERENCE_METHOD):
        column = f"relative_to_{baseline}"
        table[f"× {baseline}"] = calibration[column] if column in calibration else np.nan
    table["GFLOPs / iteration"] = calibration["flops_per_iteration"] / 1e9
    table["peak memory (MiB)"] = pd.to_numeric(calibration["peak_memory_bytes"], errors="coerce") / MIB
    table["pre-training (s)"] = calibration["pretrain_seconds"]
    table["compute-matched iterations"] = calibration["matched_iterations"]
    table["FLOP-matched iterations"] = calibration["flop_matched_iterations"]
    return table


def calibration_header(calibration: pd.DataFrame) -> str:
    """Markdown: where and how the costs were measured, and the matched budget they imply."""
    info = calibration.attrs
    hardware = info.get("hardware", {})
    device = hardware.get("gpu") or f"CPU ({hardware.get('cpu', '?')}, {threads_label(hardware)})"
    matched = info.get("matched", {})
    protocol = info.get("protocol", {})
    crop = "×".join(str(v) for v in info.get("crop_size", []))
    return (
        f"**Measured on** {device}, torch {hardware.get('torch', '?')}, {info.get('precision', 'fp32')}, batch "
        f"{info.get('batch_size', '?')} of {crop} px crops ({info.get('dataset', '?')}; student {info.get('student', '?')}, "
        f"teacher {info.get('teacher', '?')}); {protocol.get('rounds', '?')} interleaved rounds × "
        f"{protocol.get('iterations_per_round', '?')} iterations per method after {protocol.get('warmup', '?')} warm-up "
        f"iterations.  \n**Matched budget** {seconds_label(matched.get('budget_seconds', float('nan')))} = "
        f"{matched.get('reference_iterations', '?')} iterations of the reference method "
        f"`{matched.get('reference_method', '?')}`; every method gets that many seconds of training."
    )


def seconds_label(seconds: float) -> str:
    """``"0.102 s"``, ``"12.3 s"``, ``"1,234 s"``: enough digits for tiny test budgets and real ones alike."""
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.3g} s"


def threads_label(hardware: dict) -> str:
    """``"1 thread"`` / ``"2 threads"`` from a calibration's hardware record."""
    threads = hardware.get("threads", "?")
    return f"{threads} thread" + ("" if threads == 1 else "s")


def memory_note(calibration: pd.DataFrame) -> str:
    """Markdown saying whether peak memory was measured (only on CUDA: ``torch.cuda.max_memory_allocated``)."""
    if pd.to_numeric(calibration["peak_memory_bytes"], errors="coerce").isna().all():
        return (
            "**Peak memory: not measured.** The calibration ran on the CPU, where PyTorch keeps no allocator peak; "
            "run `kdrepro calibrate` on a GPU to fill the *peak memory (MiB)* column."
        )
    return "Peak memory: `torch.cuda.max_memory_allocated` over each method's timed iterations (MiB = 2^20 bytes)."


def phase_breakdown(calibration: pd.DataFrame) -> pd.DataFrame:
    """Long table ``method, phase, ms`` of the median per-phase cost of one iteration (``kdrepro.train.timing``)."""
    columns = [f"phase_{phase}" for phase in PHASES if f"phase_{phase}" in calibration]
    long = calibration.melt(id_vars="method", value_vars=columns, var_name="phase", value_name="seconds")
    long["phase"] = long["phase"].str.removeprefix("phase_")
    long["ms"] = 1000.0 * long.pop("seconds")
    return long


def plot_cost(calibration: pd.DataFrame, profile: str = "") -> Figure:
    """Stacked per-phase ms/iteration, cost relative to the student alone, and GFLOPs per iteration, per method."""
    order = list(calibration.sort_values("seconds_per_iteration")["method"])
    phases = phase_breakdown(calibration).pivot(index="method", columns="phase", values="ms").loc[order]
    phases = phases[[phase for phase in PHASES if phase in phases]]
    height = 2.4 + 0.42 * len(order)
    fig, axes = plt.subplots(1, 3, figsize=(13, height), sharey=True, gridspec_kw={"width_ratios": [2.2, 1, 1]})
    phases.plot.barh(stacked=True, ax=axes[0], color=sns.color_palette("tab10", len(phases.columns)), width=0.75, legend=False)
    axes[0].set(xlabel="median ms / iteration (phases stacked)", ylabel="", title="Cost of one training iteration")
    indexed = calibration.set_index("method").loc[order]
    relative = indexed.get(f"relative_to_{STUDENT_ALONE}")
    if relative is not None:
        axes[1].barh(order, relative, color="#4c72b0")
        axes[1].axvline(1.0, color="black", lw=1)
        for y, value in enumerate(relative):
            axes[1].text(value, y, f" {value:.2f}×", va="center", fontsize=9)
        axes[1].set_xlim(0, float(relative.max()) * 1.35)
    axes[1].set(xlabel=f"× student alone ({STUDENT_ALONE})", title="Relative cost")
    axes[2].barh(order, indexed["flops_per_iteration"] / 1e9, color="#55a868")
    axes[2].set(xlabel="GFLOPs / iteration", title="Analytic FLOPs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(labels), frameon=False, fontsize=9, title="phase")
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.25 / height))
    return figure_note(fig, profile)


# ----------------------------------------------------------------------------------------------------- matched


def delta_to(values: pd.Series, methods: pd.Series, reference: str = REFERENCE_METHOD) -> pd.Series:
    """``values − values[reference]`` (NaN everywhere when the reference method is absent or has no value)."""
    reference_values = values[methods == reference]
    if reference_values.empty or pd.isna(reference_values.iloc[0]):
        return pd.Series(np.nan, index=values.index)
    return values - float(reference_values.iloc[0])


def rank_of(values: pd.Series) -> pd.Series:
    """Rank 1 = highest value; ties share the best rank; missing values get no rank."""
    return values.rank(ascending=False, method="min")


def matched_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The central table: per student method, mIoU (%), iterations, rank and Δ to logit KD under iteration-matched
    and compute-matched budgets, and the rank change (positive = the method ranks higher once compute is matched).
    The teacher is the last row (its mIoU in both columns, no rank). Sorted by compute-matched mIoU."""
    students = runs[runs.protocol.isin(["iter_matched", "compute_matched"])]
    table = pd.DataFrame({"method": sorted(students.method.unique())})
    for protocol, tag in (("iter_matched", "iter"), ("compute_matched", "compute")):
        rows = students[students.protocol == protocol].set_index("method")
        table[f"miou_{tag}"] = table.method.map(rows["miou_percent"])
        table[f"iterations_{tag}"] = table.method.map(rows["iterations"])
        table[f"seconds_{tag}"] = table.method.map(rows["train_seconds"])
        table[f"rank_{tag}"] = rank_of(table[f"miou_{tag}"])
        table[f"delta_kd_{tag}"] = delta_to(table[f"miou_{tag}"], table.method)
    table["rank_change"] = table["rank_iter"] - table["rank_compute"]
    table["family"] = table.method.map(method_family)
    table["note"] = table.method.map(_divergence_notes(students))
    table = table.sort_values(["miou_compute", "miou_iter"], ascending=False, na_position="last")
    teacher = runs[runs.protocol == "teacher"]
    if not teacher.empty:
        miou, iterations = teacher.miou_percent.iloc[0], teacher.iterations.iloc[0]
        family = "teacher" if pd.isna(iterations) else f"teacher ({int(iterations):,} it)"
        table = pd.concat([table, pd.DataFrame([{"method": "teacher", "family": family, "miou_iter": miou, "miou_compute": miou}])])
    return table.reset_index(drop=True)


def _divergence_notes(students: pd.DataFrame) -> dict[str, str]:
    """Per method, which protocol's run diverged and at which step (runs recorded with ``on_nonfinite=record``)."""
    if "diverged_at" not in students:
        return {}
    diverged = students.dropna(subset=["diverged_at"])
    notes: dict[str, list[str]] = {}
    for row in diverged.itertuples():
        notes.setdefault(row.method, []).append(f"diverged at step {int(row.diverged_at)} ({PROTOCOL_LABELS[row.protocol]})")
    return {method: "; ".join(parts) for method, parts in notes.items()}


def matched_display(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`matched_table` with two header levels (protocol / quantity) for the HTML report."""
    columns = {
        ("", "method"): table.method,
        ("", "kind"): table.family,
    }
    for tag, label in (("iter", "iteration-matched"), ("compute", "compute-matched")):
        columns[(label, "mIoU (%)")] = table[f"miou_{tag}"]
        columns[(label, "iterations")] = table[f"iterations_{tag}"]
        columns[(label, "train s")] = table[f"seconds_{tag}"]
        columns[(label, "rank")] = table[f"rank_{tag}"]
        columns[(label, f"Δ {REFERENCE_METHOD} (pp)")] = table[f"delta_kd_{tag}"]
    columns[("", "rank change")] = table.rank_change
    if table.get("note", pd.Series(dtype=object)).notna().any():
        columns[("", "note")] = table.note
    frame = pd.DataFrame(columns)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def matched_summary(table: pd.DataFrame) -> str:
    """Markdown: the best method under each protocol, where logit KD ranks, and how many methods change rank."""
    students = table[table.method != "teacher"]
    lines = []
    for tag, label in (("iter", "iteration-matched"), ("compute", "compute-matched")):
        ranked = students.dropna(subset=[f"miou_{tag}"])
        if ranked.empty:
            continue
        best = ranked.loc[ranked[f"miou_{tag}"].idxmax()]
        line = f"- **{label}**: best `{best.method}` ({best[f'miou_{tag}']:.2f} mIoU)"
        reference = ranked[ranked.method == REFERENCE_METHOD]
        if not reference.empty:
            line += f"; logit KD `{REFERENCE_METHOD}` ranks {int(reference[f'rank_{tag}'].iloc[0])} of {len(ranked)}"
        lines.append(line + ".")
    moved = students.dropna(subset=["rank_change"])
    lines.append(f"- {int((moved.rank_change != 0).sum())} of {len(moved)} methods change rank between the two protocols.")
    for row in students.dropna(subset=["note"]).itertuples() if "note" in students else []:
        lines.append(f"- `{row.method}`: {row.note} — a non-finite loss (no mIoU; lower optim.lr or the method's weights).")
    return "\n".join(lines)


def plot_rank_slope(table: pd.DataFrame, profile: str = "") -> Figure:
    """Slope chart: each method's rank under iteration matching (left) and compute matching (right)."""
    ranked = table.dropna(subset=["rank_iter", "rank_compute"])
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * max(len(ranked), 2)))
    for row in ranked.itertuples():
        colour = "#2e7d32" if row.rank_change > 0 else "#c62828" if row.rank_change < 0 else "#616161"
        ax.plot([0, 1], [row.rank_iter, row.rank_compute], color=colour, marker="o", lw=2)
        ax.text(-0.04, row.rank_iter, f"{row.method}  {row.miou_iter:.2f}", ha="right", va="center", fontsize=10)
        ax.text(1.04, row.rank_compute, f"{row.miou_compute:.2f}  {row.method}", ha="left", va="center", fontsize=10)
    ax.set_xlim(-0.7, 1.7)
    ax.set_ylim(len(ranked) + 0.6, 0.4)
    ax.set_xticks([0, 1], ["iteration-matched", "compute-matched"])
    ax.set_yticks(range(1, len(ranked) + 1))
    ax.set_ylabel("rank (1 = best mIoU)")
    ax.set_title("Rank change when every method gets the same wall-clock budget\n(labels: method  mIoU %; green = moves up)")
    ax.grid(axis="x", visible=False)
    fig.tight_layout()
    return figure_note(fig, profile)
