"""Links from a report page to what every number on it was read from: each run folder's ``metrics.json``,
``config.yaml`` and dvclive plots, and the tidy CSVs of ``results/<profile>/``.

Links are relative to the reports folder (``../runs/smoke/iter_matched/kd/seed0/metrics.json``), so they work in
the checkout that wrote them and in any copy of it; a file that does not exist is named, not linked.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from kdrepro.report.readers import Inputs

TIDY_TABLES = {"runs.csv": "one row per run", "stats.csv": "mean and 95 % interval per protocol, method and budget",
               "per_class.csv": "IoU per run and class", "curves.csv": "every run's dvclive logs",
               "calibration.csv": "cost per iteration per method", "verdict.json": "regime, checks and verdicts"}  # fmt: skip
PROTOCOL_LABELS = {"iter_matched": "iteration-matched", "compute_matched": "compute-matched", "extended": "extended",
                   "teacher": "teacher"}  # fmt: skip


def _link(target: Path, start: Path, label: str) -> str:
    if not target.exists():
        return f'<span style="color:#888" title="not found">{html.escape(label)}</span>'
    href = Path(os.path.relpath(target, start)).as_posix()
    return f'<a href="{html.escape(href)}">{html.escape(label)}</a>'


def run_files(run_dir: Path, reports_dir: Path) -> str:
    """``metrics.json · config.yaml · dvclive plots`` of one run folder, linked relative to ``reports_dir``."""
    return " · ".join([_link(run_dir / "metrics.json", reports_dir, "metrics.json"),
                       _link(run_dir / "config.yaml", reports_dir, "config.yaml"),
                       _link(run_dir / "dvclive" / "plots" / "metrics", reports_dir, "dvclive plots")])  # fmt: skip


def tidy_tables_html(inputs: Inputs) -> str:
    """A list of links to the tidy tables this page was made from."""
    items = [f"<li>{_link(inputs.results_dir / name, inputs.reports_dir, name)}: {html.escape(what)}</li>"
             for name, what in TIDY_TABLES.items()]  # fmt: skip
    return f'<ul class="kdrepro-tidy">{"".join(items)}</ul>'


def runs_html(runs: pd.DataFrame, inputs: Inputs, names: dict[str, str]) -> str:
    """Every run of the pipeline, one row each (protocol, method, budget, seed, mIoU, iterations, training seconds)
    with links to its files, inside a collapsed ``<details>`` block; a run that diverged or collapsed to one class
    says so in its mIoU cell."""
    rows = []
    for run in runs.itertuples():
        budget = f"{float(run.multiplier):g}×" if run.protocol == "extended" else ""
        seed = "" if pd.isna(run.seed) else str(int(run.seed))
        miou = "diverged" if pd.isna(run.miou) else f"{100 * float(run.miou):.1f}"
        if str(getattr(run, "collapsed", False)).strip().lower() == "true":
            miou += " (collapsed to one class)"
        seconds = "" if pd.isna(run.train_seconds) else f"{float(run.train_seconds):.1f}"
        iterations = "" if pd.isna(run.iterations) else f"{int(run.iterations):,}"
        cells = [PROTOCOL_LABELS.get(run.protocol, run.protocol), names.get(run.method, run.method), budget, seed, miou,
                 iterations, seconds]  # fmt: skip
        files = run_files(inputs.runs_dir / str(run.run), inputs.reports_dir)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + f"<td>{files}</td></tr>")
    header = "".join(f"<th>{label}</th>" for label in
                     ("protocol", "method", "budget", "seed", "mIoU", "iterations", "train s", "files"))  # fmt: skip
    return (f'<details class="kdrepro-runs"><summary>Every run ({len(rows)}) with links to its metrics.json, '
            'config.yaml and dvclive plots</summary><div style="overflow-x:auto"><table class="kdrepro-table" '
            f'style="font-size:90%"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            "</details>")


def _settings_text(terms: dict, prefix: str = "") -> list[str]:
    """``cwd.weight = 3.0``-style lines of a method's ``terms`` (nested keys joined by dots)."""
    lines = []
    for key, value in terms.items():
        if isinstance(value, dict):
            lines += _settings_text(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {value}")
    return lines


def method_config_file(method: str, inputs: Inputs) -> Path | None:
    """The config file a method was composed from: the packaged one, else the plugin folder's of params.yaml."""
    import yaml

    packaged = Path(__file__).resolve().parents[1] / "conf" / "method" / f"{method}.yaml"
    if packaged.is_file():
        return packaged
    params = inputs.root / "params.yaml"
    folder = (yaml.safe_load(params.read_text()) or {}).get("plugins") if params.is_file() else None
    candidate = inputs.root / str(folder) / "method" / f"{method}.yaml" if folder else None
    return candidate if candidate is not None and candidate.is_file() else None


def method_settings_html(runs: pd.DataFrame, inputs: Inputs, names: dict[str, str]) -> str:
    """Every method's hyper-parameters (loss weights, temperatures, ...) as its runs were trained with them (read
    from the saved ``config.yaml`` of its first run), with its config file, one row per method."""
    import yaml

    rows = []
    students = runs[~runs.protocol.isin(["teacher"])]
    for method, group in students.groupby("method", sort=False):
        saved = inputs.runs_dir / str(group.run.iloc[0]) / "config.yaml"
        source = method_config_file(str(method), inputs)
        if saved.is_file():  # what the run was trained with
            config = (yaml.safe_load(saved.read_text()) or {}).get("method", {})
        else:  # no saved run config: the config file as it is now
            config = (yaml.safe_load(source.read_text()) or {}) if source is not None else {}
        terms = _settings_text(config.get("terms") or {}) or ["no distillation term (the student alone)"]
        if not saved.is_file():
            terms.append("(from the config file: no run folder with config.yaml was found)")
        where = html.escape(os.path.relpath(source, inputs.root) if source else "?")
        if source is not None:
            where = _link(source, inputs.reports_dir, Path(os.path.relpath(source, inputs.root)).as_posix())
        rows.append(f"<tr><td><b>{html.escape(names.get(method, str(method)))}</b></td>"
                    f"<td>{'<br>'.join(html.escape(line) for line in terms)}</td><td>{where}</td></tr>")
    return ('<div style="overflow-x:auto"><table class="kdrepro-table kdrepro-settings" style="font-size:90%">'
            "<thead><tr><th>method</th><th>hyper-parameters as trained</th><th>config file</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")
