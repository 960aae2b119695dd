"""``reports/index.html`` (DVC stage ``index``, command ``kdrepro report-index``), rendered from the Jinja2 template
``templates/index.html.j2``: the verdict on the paper's claims first, Table 1, links to every page and executed
notebook, and what the reports were made from (profile, date, git commit, hardware, matched budget).

The commit is read with dulwich (the git library DVC itself uses): the commit checked out when the index was
written. Uncommitted edits are not visible in it; ``dvc.lock`` pins the exact inputs of every stage.
"""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

from kdrepro.errors import ConfigError
from kdrepro.report import readers
from kdrepro.report.cost import seconds_label
from kdrepro.report.matched import table1, table1_caption, table1_html, verdict_html
from kdrepro.report.pages import PAGES, nav_links, render_template
from kdrepro.report.style import profile_banner


def git_commit(start: str | Path = ".") -> tuple[str | None, str | None]:
    """(commit, branch) of the repository containing ``start``; (None, None) outside a repository or before the
    first commit."""
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    try:
        repo = Repo.discover(str(start))
    except NotGitRepository:
        return None, None
    with repo:
        try:
            chain, sha = repo.refs.follow(b"HEAD")
        except KeyError:
            return None, None
        branch = chain[-1].decode().removeprefix("refs/heads/") if len(chain) > 1 else None
        return (sha.decode() if sha else None), branch


DATE_FORMAT = "%Y-%m-%d %H:%M UTC"


def utc_date(value: str | dt.datetime | None) -> str:
    """Every date of the reports in one format (``2026-11-30 05:00 UTC``); an unreadable value is shown as it is."""
    if value is None:
        return "?"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime(DATE_FORMAT)


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the repository root (``runs/smoke``), never the absolute path of the machine."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).name


def provenance(profile: str, inputs: readers.Inputs, header: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows: profile, date, commit, folders (relative to the repository), the CPU or GPU and the
    precision the runs were calibrated and trained with, models, batch, matched budget; one date format."""
    commit, branch = git_commit(inputs.root)
    facts = [
        ("profile", profile),
        ("written", utc_date(dt.datetime.now(dt.timezone.utc))),
        ("git commit", f"{commit} ({branch})" if commit and branch else commit or "unknown (not a git repository)"),
        ("runs", relative(inputs.runs_dir, inputs.root)),
        ("results", relative(inputs.results_dir, inputs.root)),
        ("report written on", f"{platform.machine()}, {platform.system()}"),
    ]
    if not header:
        return [*facts, ("calibration", "not found: run `kdrepro calibrate` (the DVC calibrate stage) first")]
    hardware = header.get("hardware", {})
    device = (f"GPU {hardware['gpu']}" if hardware.get("gpu") else
              f"CPU {hardware.get('cpu', '?')} ({hardware.get('threads', '?')} threads)")  # fmt: skip
    matched = header.get("matched", {})
    crop = "×".join(str(v) for v in header.get("crop_size", []))
    budget = matched.get("budget_seconds")
    return [
        *facts,
        ("hardware (calibration and training)", f"{device}, torch {hardware.get('torch', '?')}"),
        ("precision", str(header.get("precision", "fp32"))),
        ("models", f"student {header.get('student', '?')} ← teacher {header.get('teacher', '?')}, dataset {header.get('dataset', '?')}"),
        ("training batch", f"{header.get('batch_size', '?')} crops of {crop} px"),
        ("matched budget", f"{seconds_label(budget) if budget is not None else '?'} = {matched.get('reference_iterations', '?')} "
                           f"iterations of {matched.get('reference_method', '?')} (reference method) on this hardware"),
        ("calibrated", utc_date(header.get("created"))),
    ]


def page_entries(reports_dir: Path) -> list[dict[str, Any]]:
    """Every report page with its description and whether it (and its executed notebook) exists."""
    return [{"name": name, "title": title, "description": description,
             "rendered": (reports_dir / f"{name}.html").is_file(), "notebook": (reports_dir / f"{name}.ipynb").is_file()}
            for name, (title, description) in PAGES.items()]


def index_context(inputs: readers.Inputs) -> dict[str, Any]:
    """Everything ``index.html.j2`` shows; the verdict and Table 1 only once the results stage has run."""
    header = readers.read_calibration_header(inputs.runs_dir)
    context: dict[str, Any] = {"profile": inputs.profile, "banner": profile_banner(inputs.profile),
                               "nav": nav_links("index"), "pages": page_entries(inputs.reports_dir),
                               "facts": provenance(inputs.profile, inputs, header), "verdict": None, "table1": None,
                               "missing": None}
    try:
        verdict = readers.read_verdict(inputs.results_dir)
        stats = readers.read_stats(inputs.results_dir)
        calibration = readers.read_calibration(inputs.results_dir)
    except ConfigError as error:
        context["missing"] = str(error)
        return context
    meta = readers.method_metadata(sorted(set(stats.method)), stats)
    regime = verdict.get("regime", {})
    context["verdict"] = verdict_html(verdict, dict(zip(meta.method, meta.display_name, strict=True)))
    n_seeds = int(stats.n_seeds.max()) if "n_seeds" in stats and len(stats) else 0
    table = table1(stats, calibration, meta, regime.get("teacher_miou"), verdict.get("compute_check"),
                   regime.get("teacher_iterations"))
    context["table1"] = table1_html(table, table1_caption(inputs.profile, n_seeds, regime.get("speed")))
    return context


def write_index(inputs: readers.Inputs) -> Path:
    """Render ``templates/index.html.j2`` to ``<reports_dir>/index.html`` and return its path."""
    page = render_template("index.html.j2", **index_context(inputs))
    inputs.reports_dir.mkdir(parents=True, exist_ok=True)
    path = inputs.reports_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
