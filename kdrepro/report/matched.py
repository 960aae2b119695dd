"""The central page (``notebooks/matched.ipynb``): the verdict on the paper's claims, Table 1 as a paper prints it,
per-class IoU for both protocols, and how ranks change once compute is matched.

Protocols: *iteration-matched* = every method trains the reference iteration count; *compute-matched* = every
method gets the same measured wall-clock budget, so its iteration count follows from its seconds/iteration.
Uncertainty comes from ``stats.csv`` (95 % t-interval over seeds; differences paired by seed). A difference whose
interval includes 0 is marked ≈ and greyed: it is inside the seed noise and supports no ranking.
"""

from __future__ import annotations

import html
import re
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kdrepro.analysis.methods import STUDENT_ALONE
from kdrepro.report.pages import render_template
from kdrepro.report.published import published_entry
from kdrepro.report.style import (
    FAMILIES,
    FAMILY_LINES,
    FAMILY_MARKERS,
    FIGURE_WIDTH,
    family_label,
    figure_note,
    interval,
    method_colours,
)
from kdrepro.report.verdict_text import (
    budget_by_method,
    capacity_gap_sentence,
    claim_in_words,
    collapse_mark,
    collapsed_sentence,
    flags,
    positive_control_sentence,
    seeds_note,
    teacher_schedule,
)
from kdrepro.train.speed_choice import speed_sentence

MATCHED = ("iter_matched", "compute_matched")
BADGE_STYLES = {"supported": "background:#d9f2e6;color:#00553a;border:1px solid #009E73",
                "contradicted": "background:#fbe3d6;color:#8a3200;border:1px solid #D55E00",
                "inconclusive": "background:#eeeeee;color:#333;border:1px solid #888",
                "cannot judge": "background:#fde0e0;color:#9b0000;border:1px solid #c00000"}
BADGE_SYMBOLS = {"supported": "✔", "contradicted": "✘", "inconclusive": "?", "cannot judge": "⚠"}


# ------------------------------------------------------------------------------------------------------- verdict
def regime_line(verdict: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """The regime the verdict was reached in, in sentences: profile, seeds, schedule, the teacher with its schedule
    and its gap, the positive control, the capacity gap, the classes learned and the methods that collapsed."""
    regime = verdict.get("regime", {})
    names = names if names is not None else verdict_names(verdict)
    seeds = regime.get("seeds") or []
    fraction = regime.get("student_fraction_of_4x")
    parts = [
        f"Profile {regime.get('profile', '?')}, {len(seeds)} seeds ({', '.join(str(s) for s in seeds)}), reference "
        f"schedule {regime.get('reference_iterations', '?')} iterations.",
        f"Teacher {teacher_schedule(regime)} vs student alone {_number(regime.get('student_miou'))} mIoU "
        f"(gap {_number(regime.get('teacher_gap'))} points; the paper's gap is 5–5.5).",
    ]
    if regime.get("schedule"):
        sentence = str(regime["schedule"]).strip()
        parts.append(sentence[:1].upper() + sentence[1:] + ("" if sentence.endswith(".") else "."))
    elif fraction is not None:
        parts.append(f"At the reference schedule the student alone has {100 * float(fraction):.0f} % of its mIoU at 4× the schedule.")
    parts += [positive_control_sentence(regime, names), capacity_gap_sentence(regime), classes_sentence(regime),
              collapsed_sentence(regime, names)]
    parts.append(speed_sentence(regime.get("speed")))
    return " ".join(part for part in parts if part)


def verdict_names(verdict: dict[str, Any]) -> dict[str, str]:
    """Display names of every method a verdict mentions (from the method configs)."""
    from kdrepro.report.readers import method_metadata

    found: set[str] = set()
    regime = verdict.get("regime") or {}
    found |= set((regime.get("positive_control") or {}).get("per_method") or {})
    found |= {str(row.get("method")) for row in (verdict.get("compute_check") or {}).get("runs", [])}
    found |= set((verdict.get("compute_check") or {}).get("disturbed") or {})
    found |= set(regime.get("collapsed") or {})
    for claim in verdict.get("claims", []):
        figures = claim.get("figures") or {}
        found |= {str(figures[key]) for key in ("canonical", "best_specific", "method") if figures.get(key)}
        found |= {str(m) for pair in figures.get("flip_pairs") or [] for m in pair}
        found |= {str(m) for m in figures.get("specific_advantage_lost") or []}
    meta = method_metadata(sorted(found)) if found else None
    return dict(zip(meta.method, meta.display_name, strict=True)) if meta is not None else {}


def regime_note(verdict: dict[str, Any]) -> str:
    """Markdown for the top of every report page that shows results: the regime line under a bold lead-in, so no
    number is read without its schedule, teacher gap and seeds ('' when the verdict has no regime)."""
    return f"**Regime of this run.** {regime_line(verdict)}" if verdict.get("regime") else ""


def classes_sentence(regime: dict[str, Any]) -> str:
    """How many of the classes present in validation the student alone learns, naming those at IoU 0 ('' if unknown)."""
    learned = regime.get("classes_learned_by_student") or {}
    if not learned.get("present"):
        return ""
    missing = learned.get("not_learned") or []
    return (f"The student alone learns {learned.get('learned')} of the {learned['present']} classes present in validation"
            + (f" (IoU 0: {', '.join(missing)})." if missing else "."))  # fmt: skip


def _number(value: Any) -> str:
    return "?" if value is None or pd.isna(value) else f"{float(value):.1f}"


def verdict_html(verdict: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """The verdict block (``templates/verdict.html.j2``): the warnings first (a failed positive control or compute
    check, in plain words and red), the regime, then one row per claim: its verdict in words and colour, one
    sentence of evidence with display names, and its figures as a small table."""
    names = names if names is not None else verdict_names(verdict)
    regime = verdict.get("regime") or {}
    claims = []
    for claim in verdict.get("claims", []):
        verdict_word = claim.get("verdict", "inconclusive")
        verdict_word = verdict_word if verdict_word in BADGE_STYLES else "inconclusive"
        claims.append({"id": claim.get("id"), "claim": claim.get("claim", ""), "verdict": verdict_word,
                       "slug": verdict_word.replace(" ", "-"), **claim_in_words(claim, names, regime)})  # fmt: skip
    return render_template("verdict.html.j2", regime_line=regime_line(verdict, names), claims=claims,
                           flags=flags(verdict, names), badge_styles=BADGE_STYLES, badge_symbols=BADGE_SYMBOLS)


# ------------------------------------------------------------------------------------------------------- Table 1
def ordered_methods(meta: pd.DataFrame, stats: pd.DataFrame) -> list[str]:
    """Methods in Table 1 order: family (student, canonical, segmentation-specific), then compute-matched mIoU."""
    compute = stats[(stats.protocol == "compute_matched") & (stats.multiplier == 1.0)].set_index("method").miou_mean
    rank = {family: index for index, family in enumerate(FAMILIES)}
    frame = meta[meta.method != "teacher"].assign(order=lambda f: f.family.map(rank).fillna(len(FAMILIES)),
                                                   score=lambda f: -f.method.map(compute).fillna(-np.inf))
    return list(frame.sort_values(["order", "score", "method"]).method)


def table1(stats: pd.DataFrame, calibration: pd.DataFrame, meta: pd.DataFrame, teacher_miou: float | None = None,
           check: dict[str, Any] | None = None, teacher_iterations: int | None = None) -> pd.DataFrame:
    """Table 1 as numbers: one row per method (family order), the mean and 95 % interval of each protocol with its
    seed count, the paired differences vs the student alone and vs logit KD with their intervals and significance,
    the iterations received against the FLOP-matched ones, the realised training seconds against the budget
    (``check``: the compute check of ``verdict.json``), the relative cost per iteration and the published mIoU
    (Cityscapes) with source and schedule."""
    matched = stats[stats.protocol.isin(MATCHED) & (stats.multiplier == 1.0)]
    budgets = budget_by_method(check)
    cost = calibration.set_index("method").seconds_per_iteration if len(calibration) else pd.Series(dtype=float)
    student_cost = cost.get(STUDENT_ALONE, np.nan)
    info = meta.set_index("method")
    rows = []
    for method in ordered_methods(meta, stats):
        row: dict[str, Any] = {"method": method, "family": info.loc[method, "family"],
                               "display_name": info.loc[method, "display_name"], "reproduces": info.loc[method, "reproduces"],
                               "relative_cost": cost.get(method, np.nan) / student_cost}
        published = published_entry(method)
        row.update({"published_miou": published["miou"] if published else np.nan,
                    "published_source": f"{published['source']} · {published['schedule']}" if published else ""})
        budget = budgets.get(method, {})
        flops = budget.get("flop_iterations")
        if flops is None and len(calibration) and "flop_matched_iterations" in calibration:
            found = calibration.loc[calibration.method == method, "flop_matched_iterations"]
            flops = float(found.iloc[0]) if len(found) and pd.notna(found.iloc[0]) else None
        row.update({"compute_train_seconds": budget.get("seconds", np.nan), "compute_budget_seconds": budget.get("budget", np.nan),
                    "compute_worst_ratio": budget.get("worst_ratio", np.nan), "compute_within_budget": budget.get("within"),
                    "compute_flop_iterations": np.nan if flops is None else flops})  # fmt: skip
        for protocol, tag in zip(MATCHED, ("iter", "compute"), strict=True):
            found = matched[(matched.protocol == protocol) & (matched.method == method)]
            values = found.iloc[0] if len(found) else pd.Series(dtype=object)
            for name in ("miou_mean", "miou_ci_low", "miou_ci_high", "iterations_mean", "n_seeds", "n_diverged", "n_collapsed",
                         "delta_student_mean", "delta_student_ci_low", "delta_student_ci_high", "delta_student_significant",
                         "delta_kd_mean", "delta_kd_ci_low", "delta_kd_ci_high", "delta_kd_significant"):
                row[f"{tag}_{name}"] = values.get(name, np.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    if teacher_miou is not None:
        teacher = published_entry("teacher")
        table = pd.concat([table, pd.DataFrame([{
            "method": "teacher", "family": "teacher", "reproduces": "",
            "display_name": f"Teacher (one run, {teacher_iterations:,} iterations)" if teacher_iterations else "Teacher (one run)",
            "iter_miou_mean": teacher_miou, "compute_miou_mean": teacher_miou,
            "published_miou": teacher["miou"] if teacher else np.nan,
            "published_source": f"{teacher['source']} · {teacher['schedule']}" if teacher else ""}])],
            ignore_index=True)
    return table


def _difference_cell(row: pd.Series, prefix: str) -> str:
    mean = row.get(f"{prefix}_mean", np.nan)
    if pd.isna(mean):
        return "—"
    text = interval(mean, row.get(f"{prefix}_ci_low", np.nan), row.get(f"{prefix}_ci_high", np.nan), signed=True)
    value, _, bounds = text.partition(" ")
    significant = row.get(f"{prefix}_significant")
    if significant is True:
        return f'<span class="kdrepro-significant">{value}</span><br><small style="white-space:nowrap">{bounds}</small>'
    return (f'<span class="kdrepro-noise" title="interval includes 0: inside the seed noise">≈ {value}</span><br>'
            f'<small class="kdrepro-noise" style="white-space:nowrap">{bounds}</small>')


def _miou_cell(row: pd.Series, tag: str) -> str:
    mean = row.get(f"{tag}_miou_mean", np.nan)
    notes = seeds_note(row.get(f"{tag}_n_seeds", 0), row.get(f"{tag}_n_diverged", 0), row.get(f"{tag}_n_collapsed", 0))
    note = "".join(f"<br><small>{text}</small>" for text in notes)
    if pd.isna(mean):
        return "—" + note
    text = interval(mean, row.get(f"{tag}_miou_ci_low", np.nan), row.get(f"{tag}_miou_ci_high", np.nan))
    return f'<span style="white-space:nowrap">{text}</span>{note}'


def table1_display(table: pd.DataFrame) -> pd.DataFrame:
    """Table 1's cells as HTML strings, rows indexed by (family, method), columns grouped by protocol."""
    index = pd.MultiIndex.from_arrays([table.family.map(family_label), [_method_label(r) for _, r in table.iterrows()]],
                                      names=["family", "method"])
    columns: dict[tuple[str, str], list[str]] = {}
    for tag, label in (("iter", "iteration-matched"), ("compute", "compute-matched")):
        columns[(label, "mIoU ± CI")] = [_miou_cell(r, tag) for _, r in table.iterrows()]
        columns[(label, "seeds")] = ["—" if pd.isna(v) else f"{int(v)}" for v in table.get(f"{tag}_n_seeds", pd.Series(np.nan, index=table.index))]
        if tag == "iter":
            columns[(label, "iterations")] = ["—" if pd.isna(v) else f"{v:,.0f}" for v in table.get("iter_iterations_mean", pd.Series(np.nan, index=table.index))]
        else:
            columns[(label, "iterations (FLOP-matched)")] = [_iterations_cell(r) for _, r in table.iterrows()]
            columns[(label, "train s / budget")] = [_budget_cell(r) for _, r in table.iterrows()]
        columns[(label, "Δ student alone")] = [_difference_cell(r, f"{tag}_delta_student") for _, r in table.iterrows()]
        columns[(label, "Δ logit KD")] = [_difference_cell(r, f"{tag}_delta_kd") for _, r in table.iterrows()]
    columns[("this hardware", "cost / it (× student)")] = ["—" if pd.isna(c) else f"{c:.2f}×" for c in table.relative_cost.fillna(np.nan)]
    columns[("published (Cityscapes)", "mIoU")] = [_published_cell(r) for _, r in table.iterrows()]
    frame = pd.DataFrame(columns, index=index)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def _iterations_cell(row: pd.Series) -> str:
    received, flops = row.get("compute_iterations_mean", np.nan), row.get("compute_flop_iterations", np.nan)
    if pd.isna(received):
        return "—"
    return f"{received:,.0f}" + ("" if pd.isna(flops) else f'<br><small title="FLOP-matched iterations">({flops:,.0f})</small>')


def _budget_cell(row: pd.Series) -> str:
    """Realised training seconds (mean over seeds) against the budget; red with ⚠ when a seed left ±15 %."""
    seconds, budget = row.get("compute_train_seconds", np.nan), row.get("compute_budget_seconds", np.nan)
    if pd.isna(seconds) or pd.isna(budget):
        return "—"
    text = f"{seconds:.1f} / {budget:.1f}"
    worst = row.get("compute_worst_ratio", np.nan)
    if row.get("compute_within_budget") is False:
        return (f'<span class="kdrepro-off-budget" style="color:#c00000;font-weight:bold" title="a seed trained '
                f'outside ±15 % of its budget">⚠ {text}<br><small>{100 * worst:.0f} % of budget</small></span>')
    return f"{text}<br><small>{100 * seconds / budget:.0f} %</small>"


def _method_label(row: pd.Series) -> str:
    name = html.escape(str(row.display_name))
    cite = str(row.reproduces or "")
    if not cite:
        return f"<b>{name}</b>"
    return (f'<b>{name}</b><br><small style="font-weight:normal" title="{html.escape(cite)}">'
            f"{html.escape(short_citation(cite))}</small>")


def short_citation(citation: str) -> str:
    """``"Shu et al., Channel-wise ..., ICCV 2021"`` -> ``"Shu et al., ICCV 2021"`` (the full one is the tooltip)."""
    parts = [part.strip() for part in re.sub(r"\s*\([^)]*\)", "", citation).split(",")]
    return f"{parts[0]}, {parts[-1]}" if len(parts) >= 3 else citation


def _published_cell(row: pd.Series) -> str:
    if pd.isna(row.published_miou):
        return "—"
    return f"{row.published_miou:.1f}<br><small>{html.escape(str(row.published_source))}</small>"


def table1_html(table: pd.DataFrame, caption: str) -> str:
    """Table 1 as an HTML table with id ``table1`` (grouped rows and column groups; intervals on a second line)."""
    styler = table1_display(table).style.set_caption(caption).set_table_attributes('class="kdrepro-table"')
    styler = styler.hide(axis="index", names=True)  # no empty "family / method" header row
    styler = styler.set_uuid("table1").set_table_styles([
        {"selector": "th", "props": "text-align:center;padding:3px 6px;font-size:92%;vertical-align:top"},
        {"selector": "th.row_heading", "props": "text-align:left"},
        {"selector": "td", "props": "text-align:right;padding:3px 6px;font-size:92%;vertical-align:top;border-bottom:1px solid #ddd"},
        {"selector": "caption", "props": "caption-side:top;text-align:left;padding:4px 0;font-size:95%"},
    ])
    return f'<div id="table1" class="kdrepro-table1">{styler.to_html()}</div>'


def table1_caption(profile: str, n_seeds: int, speed: dict[str, Any] | None = None) -> str:
    """Table 1's caption; ``speed``: the runs' speed choice (the verdict's ``regime.speed``), stated at its end."""
    return (f"<b>Table 1.</b> mIoU (%) on the {html.escape(profile)} profile's validation set, mean ± half-width of the "
            f"95 % t-interval over the seeds of each row (up to {n_seeds}). Δ: mIoU difference paired by seed, with its 95 % interval below; "
            "<b>bold</b> = the interval excludes 0; <i>≈ grey</i> = inside the seed noise (no ranking). Cost per "
            "iteration relative to the student alone on this hardware. Compute-matched: iterations received with the "
            "FLOP-matched count in brackets, and realised training seconds against the budget (mean over seeds; "
            "<b style=\"color:#c00000\">⚠ red</b>: a seed trained outside ±15 % of its budget, so compute matching did not "
            "hold for that row). Under a mean: seeds that diverged (non-finite loss; left out of the mean) and seeds that "
            "collapsed to one class (at most one class above 1 % IoU; kept in the mean, as a real outcome of the recipe). "
            "Iteration-matched runs repeat bit for bit on "
            "one machine; compute-matched iteration counts come from this run's calibration, so another calibration "
            "(another machine, or the same one on another day) moves them by a few iterations, and their scores with "
            "them. Published: Cityscapes mIoU as reported by the cited source with its schedule (real data and "
            "full-size models: a scale reference, never comparable with this profile's numbers). "
            + html.escape(speed_note(speed)))


def speed_note(speed: dict[str, Any] | None) -> str:
    """The speed sentence and what it means for the numbers ('' when unknown): precision changes the numerics, and
    the time per iteration the compute-matched budgets are made of."""
    sentence = speed_sentence(speed)
    if not sentence:
        return ""
    return (sentence + " Iteration-matched scores depend on the precision this machine chose (bf16 and fp32 runs "
            "differ in their numerics).")


# ------------------------------------------------------------------------------------------------------- figures
def per_class_matrix(per_class: pd.DataFrame, protocol: str, order: list[str], names: dict[str, str]) -> pd.DataFrame:
    """Mean IoU (%) over seeds, method (rows, Table 1 order, display names; the teacher last) × class; classes
    absent from the validation set (NaN in every run) are dropped."""
    rows = per_class[(per_class.protocol.isin([protocol, "teacher"])) & (per_class.multiplier == 1.0)]
    order = [*order, "teacher"]
    matrix = rows.pivot_table(index="method", columns="class_name", values="iou", aggfunc="mean", sort=False)
    matrix = matrix.reindex([m for m in order if m in matrix.index]).dropna(axis=1, how="all")
    matrix.index = [names.get(m, "Teacher" if m == "teacher" else m) for m in matrix.index]
    return matrix


def plot_per_class(per_class: pd.DataFrame, order: list[str], names: dict[str, str], profile: str = "") -> Figure:
    """Heatmaps of per-class IoU, one per protocol (rows = methods, columns = classes), values printed."""
    matrices = [(p, per_class_matrix(per_class, p, order, names)) for p in MATCHED]
    matrices = [(p, m) for p, m in matrices if not m.empty]
    n_rows = max(len(m) for _, m in matrices) if matrices else 1
    fig, axes = plt.subplots(len(matrices) or 1, 1, figsize=(FIGURE_WIDTH, (0.36 * n_rows + 1.4) * max(len(matrices), 1) + 0.8), squeeze=False)
    for ax, (protocol, matrix) in zip(axes[:, 0], matrices, strict=False):
        sns.heatmap(matrix, ax=ax, cmap="cividis", vmin=0, vmax=100, annot=True, fmt=".0f", annot_kws={"fontsize": 9},
                    cbar_kws={"label": "IoU (%)", "pad": 0.01}, linewidths=0.5, linecolor="white")
        ax.set_title(f"{'iteration' if protocol == 'iter_matched' else 'compute'}-matched: per-class IoU (%), mean over seeds")
        ax.set(xlabel="", ylabel="")
        ax.tick_params(axis="x", rotation=40)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    return figure_note(fig, profile)


def plot_rank_change(stats: pd.DataFrame, meta: pd.DataFrame, profile: str = "") -> Figure:
    """Slope chart of mean compute- vs iteration-matched mIoU with 95 % intervals: a line per method, its style
    and marker by family (colour repeats it), labels spread so they never overlap; a label says how many of its
    seeds collapsed to one class, if any did."""
    from kdrepro.report.cost import place_labels

    info = meta.set_index("method")
    wide = stats[stats.protocol.isin(MATCHED) & (stats.multiplier == 1.0)].pivot_table(
        index="method", columns="protocol", values=["miou_mean", "miou_ci_low", "miou_ci_high"])
    wide = wide.dropna(subset=[("miou_mean", p) for p in MATCHED])
    colours = method_colours(wide.index)
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH * 0.8, 1.8 + 0.38 * max(len(wide), 3)))
    dodges = {m: 0.05 * (i - (len(wide) - 1) / 2) for i, m in enumerate(wide.index)}  # every interval stays visible
    for method, row in wide.iterrows():
        family = info.family.get(method, "segmentation_specific")
        ys = [row[("miou_mean", p)] for p in MATCHED]
        errors = [[ys[i] - row[("miou_ci_low", p)] for i, p in enumerate(MATCHED)], [row[("miou_ci_high", p)] - ys[i] for i, p in enumerate(MATCHED)]]
        ax.errorbar([dodges[method], 1 + dodges[method]], ys, yerr=np.nan_to_num(errors), color=colours[method], ls=FAMILY_LINES.get(family, "-"),
                    marker=FAMILY_MARKERS.get(family, "o"), ms=7, lw=1.8, capsize=3)
    low = float(np.nanmin(wide[[("miou_ci_low", p) for p in MATCHED]].to_numpy(dtype=float), initial=np.inf))
    high = float(np.nanmax(wide[[("miou_ci_high", p) for p in MATCHED]].to_numpy(dtype=float), initial=-np.inf))
    means = wide[[("miou_mean", p) for p in MATCHED]].to_numpy(dtype=float)
    low, high = min(low, float(np.nanmin(means))), max(high, float(np.nanmax(means)))
    pad = 0.06 * (high - low + 1e-6)
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))  # mIoU lives in [0, 100]
    ax.set_xlim(-0.3, 1.3)
    rows = stats[stats.protocol.isin(MATCHED) & (stats.multiplier == 1.0)]
    for x, side in ((0, "left"), (1, "right")):  # labels in a column outside the axes: clear of every error bar
        ys = wide[("miou_mean", MATCHED[x])].to_numpy()
        marks = [collapse_mark(rows[(rows.method == m) & (rows.protocol == MATCHED[x])]) for m in wide.index]
        labels = [f"{info.display_name.get(m, m)}{mark} {y:.1f}" if x == 0 else f"{y:.1f} {info.display_name.get(m, m)}{mark}"
                  for m, y, mark in zip(wide.index, ys, marks, strict=True)]
        place_labels(ax, np.array([x + dodges[m] for m in wide.index]), ys, labels, [colours[m] for m in wide.index],
                     side=side, column=True)
    ax.set_ylabel("mIoU (%), mean ± 95 % CI")
    ax.set_title("Each method under both protocols (line style = family)")
    handles = [plt.Line2D([], [], color="#333", ls=FAMILY_LINES[f], marker=FAMILY_MARKERS[f], label=family_label(f))
               for f in ("student", "canonical", "segmentation_specific")]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=3, frameon=False)
    fig.tight_layout()
    return figure_note(fig, profile)
