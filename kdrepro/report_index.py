"""``reports/index.html`` (DVC stage ``index``, command ``kdrepro report-index``): links to the rendered reports and
states what they were made from — profile, date, git commit, hardware, and the calibration summary (matched budget,
reference method) — plus a compact mIoU table of every protocol.

The git commit is read from the ``.git`` folder's files (HEAD, loose refs, packed-refs), so no git binary is needed.
It is the commit checked out when the index was written; uncommitted edits are not visible here (``dvc.lock`` pins
the exact inputs of every stage).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import platform
from pathlib import Path
from typing import Any

import pandas as pd

from kdrepro.report import PROTOCOL_LABELS, profile_banner, seconds_label, threads_label

NOTEBOOKS: dict[str, str] = {
    "cost": "Per-iteration cost of every method: phases, relative cost, FLOPs, memory, pre-training",
    "matched": "The central table: mIoU under iteration-matched vs compute-matched budgets, rank change, Δ to logit KD",
    "extended": "Extended training (2×/4×/8× budget), % of teacher, published numbers beside this run's",
    "curves": "mIoU and loss against training seconds, from the dvclive logs",
    "qualitative": "Validation images: ground truth, teacher, student alone and the best distilled student",
}


def git_commit(start: str | Path = ".") -> str | None:
    """The commit checked out in the repository containing ``start``, read from ``.git`` files (None if unknown)."""
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if (folder / ".git").exists():
            return _read_head(folder / ".git")
    return None


def _read_head(git: Path) -> str | None:
    if git.is_file():  # worktree or submodule: "gitdir: <path>"
        git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head
    ref = head.split(":", 1)[1].strip()
    common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
    for base in (git, common):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref:
                return sha
    return None


def calibration_summary(runs_dir: Path) -> dict[str, Any] | None:
    """The header of ``runs_dir/calibration.json`` (None when the calibration has not run)."""
    path = runs_dir / "calibration.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    table["method_names"] = list(table.pop("methods"))
    return table


def _facts(profile: str, runs_dir: Path, calibration: dict[str, Any] | None, commit: str | None) -> list[tuple[str, str]]:
    facts = [
        ("profile", profile),
        ("written", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("git commit", commit or "unknown (no .git found)"),
        ("runs", str(runs_dir)),
    ]
    if calibration is None:
        return [*facts, ("calibration", "not found: run `kdrepro calibrate` first")]
    hardware = calibration.get("hardware", {})
    device = hardware.get("gpu") or f"{hardware.get('device', '?')} ({hardware.get('cpu', '?')}, {threads_label(hardware)})"
    matched = calibration["matched"]
    crop = "×".join(str(v) for v in calibration.get("crop_size", []))
    return [
        *facts,
        ("hardware (calibration)", f"{device}, torch {hardware.get('torch', '?')}, {calibration.get('precision', 'fp32')}"),
        ("report written on", f"{platform.node() or '?'} ({platform.machine()}, {platform.system()})"),
        ("models", f"student {calibration.get('student')} ← teacher {calibration.get('teacher')}, dataset {calibration.get('dataset')}"),
        ("training batch", f"{calibration.get('batch_size')} crops of {crop} px"),
        (
            "matched budget",
            f"{seconds_label(matched['budget_seconds'])} = {matched['reference_iterations']} iterations of "
            f"{matched['reference_method']} (reference method) on this hardware",
        ),
        ("calibrated methods", ", ".join(calibration["method_names"])),
        ("calibrated", str(calibration.get("created", "?"))),
    ]


def miou_overview(results_dir: Path) -> pd.DataFrame | None:
    """mIoU (%) per method (rows) and protocol (columns) from ``results_dir/runs.csv``."""
    path = results_dir / "runs.csv"
    if not path.is_file():
        return None
    runs = pd.read_csv(path)
    runs["protocol"] = [
        f"extended ×{m:g}" if p == "extended" else PROTOCOL_LABELS.get(p, p) for p, m in zip(runs.protocol, runs.multiplier, strict=True)
    ]
    table = runs.pivot_table(index="method", columns="protocol", values="miou", aggfunc="first") * 100.0
    order = [c for c in ("teacher", "iteration-matched", "compute-matched") if c in table] + sorted(c for c in table if c.startswith("extended"))
    table = table[order].round(2)
    table.columns.name = None
    rows = [m for m in ("teacher", "none") if m in table.index] + sorted(m for m in table.index if m not in ("teacher", "none"))
    return table.loc[rows]


def write_index(
    reports_dir: str | Path, runs_dir: str | Path, results_dir: str | Path, profile: str, notebooks: dict[str, str] | None = None
) -> Path:
    """Write ``reports_dir/index.html`` and return its path."""
    reports_dir, runs_dir, results_dir = Path(reports_dir), Path(runs_dir), Path(results_dir)
    notebooks = NOTEBOOKS if notebooks is None else notebooks
    commit = git_commit(reports_dir) or git_commit(Path.cwd())  # reports/ inside the repository, or run from it
    facts = _facts(profile, runs_dir, calibration_summary(runs_dir), commit)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    links = []
    for name, description in notebooks.items():
        target = reports_dir / f"{name}.html"
        link = f'<a href="{name}.html">{name}</a>' if target.is_file() else f"{name} <i>(not rendered yet)</i>"
        links.append(f"<li><b>{link}</b> — {html.escape(description)}</li>")
    overview = miou_overview(results_dir)
    overview_html = (
        overview.to_html(na_rep="—", float_format=lambda v: f"{v:.2f}", border=0, classes="overview")
        if overview is not None
        else "<p>No results table yet (run <code>kdrepro results</code>).</p>"
    )
    page = _PAGE.format(
        profile=html.escape(profile), banner=profile_banner(profile), facts=rows, links="".join(links), overview=overview_html
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kdrepro reports — {profile}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 24px auto; padding: 0 16px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
th, td {{ text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid #ddd; vertical-align: top; }}
table.overview td, table.overview th {{ text-align: right; padding-left: 12px; }}
li {{ margin: 6px 0; }}
</style></head><body>
<h1>kdrepro reports — profile <code>{profile}</code></h1>
{banner}
<p>Knowledge-distillation methods for semantic segmentation compared under <b>iteration-matched</b> budgets (every
method trains the same number of iterations) and <b>compute-matched</b> budgets (every method gets the same measured
wall-clock training time, so cheaper methods train more iterations).</p>
<h2>Reports</h2><ul>{links}</ul>
<h2>Provenance</h2><table>{facts}</table>
<h2>mIoU (%) of every run</h2>{overview}
</body></html>
"""
