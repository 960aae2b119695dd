"""Where a report notebook finds its inputs, and the tidy tables it reads.

A notebook opened in ``jupyter lab`` runs with its own folder (``notebooks/``) as working directory, while the DVC
stage runs it from the repository root. :func:`locate` resolves the parameters either way: a relative path is taken
relative to the repository root, found by one rule (:data:`ROOT_RULE`): the nearest folder at or above the working
directory that holds ``dvc.yaml``, ``params.yaml`` or a ``results/`` folder — so a checkout and a copy of its
notebooks and results (without ``dvc.yaml``) both work. ``profile=None`` means the ``profile`` of that root's
``params.yaml``, else the only profile under its ``results/``. Every error about a missing input names the rule and
the root it gave.

Tables (written by ``kdrepro results`` into ``results/<profile>/``): ``runs.csv`` (one row per run; mIoU as a
fraction), ``stats.csv`` (one row per protocol × method × budget over seeds; percent points), ``per_class.csv``,
``curves.csv``, ``calibration.csv``, ``verdict.json``, ``extended_selection.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdrepro.analysis.methods import LOGIT_KD, STUDENT_ALONE, method_info
from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import read_header

RESULTS_HINT = "run `make repro` (or `dvc repro results`) first"
#: What marks the repository root, looked for from the working directory upwards.
ROOT_MARKERS = ("dvc.yaml", "params.yaml", "results")
ROOT_RULE = "the nearest folder at or above the working directory holding dvc.yaml, params.yaml or results/"


@dataclass(frozen=True)
class Inputs:
    """The resolved inputs of one report: the profile and its folders (absolute), and how the root was found."""

    profile: str
    root: Path
    runs_dir: Path
    results_dir: Path
    reports_dir: Path
    rule: str = ROOT_RULE


def repository_root(start: str | Path = ".") -> Path:
    """:data:`ROOT_RULE`: the nearest folder at or above ``start`` holding one of :data:`ROOT_MARKERS` (``start``
    itself when none does)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return start


def root_note(root: Path, start: str | Path = ".") -> str:
    """``repository root /x/y (the nearest folder at or above ... )`` for error messages."""
    found = any((Path(root) / marker).exists() for marker in ROOT_MARKERS)
    how = ROOT_RULE if found else f"no folder at or above {Path(start).resolve()} holds dvc.yaml, params.yaml or results/"
    return f"repository root {root}: {how}"


def default_profile(root: Path, start: str | Path = ".") -> str:
    """The ``profile`` of ``root/params.yaml``, else the only profile with results under ``root/results``."""
    path = root / "params.yaml"
    if path.is_file():
        profile = (yaml.safe_load(path.read_text()) or {}).get("profile")
        if not profile:
            raise ConfigError(f"{path} has no `profile`; set profile in the parameters cell, e.g. profile = \"smoke\"")
        return str(profile)
    found = sorted(p.parent.name for p in (root / "results").glob("*/verdict.json"))
    if len(found) == 1:
        return found[0]
    choices = f" (results exist for {', '.join(found)})" if found else ""
    raise ConfigError(f"profile=None reads `profile` from {path}, which does not exist{choices} ({root_note(root, start)}); "
                      "set profile in the parameters cell, e.g. profile = \"smoke\"")


def locate(profile: str | None = None, runs_dir: str | None = None, results_dir: str | None = None,
           reports_dir: str | None = None, start: str | Path = ".") -> Inputs:
    """Resolve a notebook's parameters. ``runs_dir``/``results_dir`` may contain ``{profile}``; relative paths are
    relative to the repository root, so the same defaults work from ``notebooks/`` and from the root."""
    root = repository_root(start)
    profile = profile or default_profile(root, start)

    def resolve(value: str | None, default: str) -> Path:
        path = Path((value or default).format(profile=profile))
        return path if path.is_absolute() else root / path

    return Inputs(profile, root, resolve(runs_dir, "runs/{profile}"), resolve(results_dir, "results/{profile}"),
                  resolve(reports_dir, "reports"), root_note(root, start))


def _missing(path: Path) -> ConfigError:
    """A missing table: names the root rule as applied from the working directory, where the notebooks start."""
    note = root_note(repository_root("."), ".")
    return ConfigError(f"{path} does not exist ({note}; the parameters' relative paths start there); {RESULTS_HINT}")


def _csv(results_dir: Path, name: str) -> pd.DataFrame:
    path = Path(results_dir) / name
    if not path.is_file():
        raise _missing(path)
    return pd.read_csv(path)


def _json(results_dir: Path, name: str) -> dict[str, Any]:
    path = Path(results_dir) / name
    if not path.is_file():
        raise _missing(path)
    return json.loads(path.read_text())


def select(frame: pd.DataFrame, methods: list[str] | None) -> pd.DataFrame:
    """Rows of the chosen methods, plus the student alone, logit KD and the teacher (the references every table
    needs); ``methods=None`` keeps every row. An unknown method name is an error that lists the known ones."""
    if not methods:
        return frame
    known = set(frame.method)
    unknown = sorted(set(methods) - known)
    if unknown:
        raise ConfigError(f"methods {unknown} have no results; choose among {sorted(known)} in the parameters cell")
    keep = set(methods) | {STUDENT_ALONE, LOGIT_KD, "teacher"}
    return frame[frame.method.isin(keep)].reset_index(drop=True)


def read_runs(results_dir: Path, methods: list[str] | None = None) -> pd.DataFrame:
    """``runs.csv`` with ``miou_percent`` added (the file stores mIoU as a fraction)."""
    runs = _csv(results_dir, "runs.csv")
    if runs.empty:
        raise ConfigError(f"{Path(results_dir) / 'runs.csv'} has no runs; {RESULTS_HINT}")
    runs["miou_percent"] = 100.0 * runs["miou"]
    return select(runs, methods)


def read_stats(results_dir: Path, methods: list[str] | None = None) -> pd.DataFrame:
    """``stats.csv``: mean, standard deviation and 95 % t-interval over seeds, and the paired differences."""
    stats = _csv(results_dir, "stats.csv")
    for column in ("delta_student_significant", "delta_kd_significant"):
        if column in stats:
            stats[column] = stats[column].map(_as_bool)
    return select(stats, methods)


def _as_bool(value: Any) -> bool | None:
    if pd.isna(value) or value == "":
        return None
    return str(value).strip().lower() in ("true", "1", "1.0", "yes")


def read_per_class(results_dir: Path, methods: list[str] | None = None) -> pd.DataFrame:
    """``per_class.csv``: IoU (percent) per protocol, method, budget, seed and class."""
    return select(_csv(results_dir, "per_class.csv"), methods)


def read_curves(results_dir: Path, methods: list[str] | None = None) -> pd.DataFrame:
    """``curves.csv``: the dvclive logs of every run (run, protocol, method, seed, step, metric, value)."""
    return select(_csv(results_dir, "curves.csv"), methods)


def read_calibration(results_dir: Path) -> pd.DataFrame:
    """``calibration.csv``: one row per method (seconds/iteration, p25/p75, phases, FLOPs, matched iterations)."""
    return _csv(results_dir, "calibration.csv")


def read_calibration_header(runs_dir: Path) -> dict[str, Any]:
    """The header of ``runs_dir/calibration.json`` (hardware, matched budget, reference method); {} if absent."""
    return read_header(Path(runs_dir) / "calibration.json")


def read_verdict(results_dir: Path) -> dict[str, Any]:
    """``verdict.json``: the regime and one verdict per claim of the paper."""
    return _json(results_dir, "verdict.json")


def read_extended_selection(results_dir: Path) -> dict[str, Any]:
    """``extended_selection.json``: which segmentation-specific method the pipeline extended, and why ({} if absent)."""
    path = Path(results_dir) / "extended_selection.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def method_metadata(methods: list[str], table: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per method: family, display name and citation (``reproduces``), from the method configs through
    :func:`kdrepro.analysis.methods.method_info`, else from the ``family``/``display_name`` columns of ``table``."""
    rows = []
    for method in dict.fromkeys(methods):
        info = _method_info(method)
        if not info and table is not None and "family" in table:
            match = table[table.method == method]
            if len(match):
                info = {"family": match.family.iloc[0], "display_name": match.get("display_name", match.method).iloc[0]}
        rows.append({
            "method": method,
            "family": info.get("family") or ("teacher" if method == "teacher" else "segmentation_specific"),
            "display_name": info.get("display_name") or method,
            "reproduces": info.get("reproduces") or "",
        })
    return pd.DataFrame(rows, columns=["method", "family", "display_name", "reproduces"])


def _method_info(method: str) -> dict[str, Any]:
    """:func:`kdrepro.analysis.methods.method_info` (the packaged or plugin method config); the teacher is its own."""
    if method == "teacher":
        return {"family": "teacher", "display_name": "Teacher"}
    return method_info(method)


def method_maps(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str], dict[str, str]]:
    """Metadata of every method in ``table`` and the two lookups the figures use: display name and family."""
    meta = method_metadata(sorted(set(table.method)), table)
    return meta, dict(zip(meta.method, meta.display_name, strict=True)), dict(zip(meta.method, meta.family, strict=True))
