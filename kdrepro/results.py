"""Read every run of a pipeline into tidy pandas tables for the report notebooks.

Layout written by the DVC pipeline (``dvc.yaml``), one folder per run, each with ``metrics.json`` and ``dvclive/``::

    runs/<profile>/teacher/                      the teacher (trained, or imported)
    runs/<profile>/calibration.json              `kdrepro calibrate`
    runs/<profile>/iter_matched/<method>/        every method at the reference iteration count
    runs/<profile>/compute_matched/<method>/     every method at the matched wall-clock budget
    runs/<profile>/extended/<method>-<mult>/     canonical methods at mult × the matched budget

:func:`collect_runs` returns one row per run; :func:`load_calibration` one row per method; :func:`load_curves` the
dvclive logs (one row per logged step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

PROTOCOLS = ("teacher", "iter_matched", "compute_matched", "extended")


def _run_row(metrics_path: Path, runs_dir: Path) -> dict[str, Any]:
    metrics = json.loads(metrics_path.read_text())
    run_dir = metrics_path.parent
    parts = run_dir.relative_to(runs_dir).parts
    protocol = parts[0]
    method = metrics.get("method", parts[-1])
    multiplier = 1.0
    if protocol == "extended":
        name, _, mult = parts[-1].rpartition("-")
        method, multiplier = name, float(mult)
    row = {
        "run": "/".join(parts),
        "protocol": protocol,
        "method": "teacher" if protocol == "teacher" else method,
        "multiplier": multiplier,
        "miou": metrics.get("miou"),
        "diverged_at": (metrics.get("diverged") or {}).get("step"),  # on_nonfinite=record: the step of the NaN/inf
        "pixel_accuracy": metrics.get("pixel_accuracy"),
        "iterations": metrics.get("iterations"),
        "train_seconds": metrics.get("train_seconds"),
        "seconds_per_iteration": metrics.get("seconds_per_iteration"),
        "precision": metrics.get("precision"),
        "device": metrics.get("device"),
    }
    for phase, seconds in (metrics.get("phase_median_seconds") or {}).items():
        row[f"phase_{phase}"] = seconds
    return row


def collect_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``runs_dir`` (those with ``metrics.json``), sorted by protocol and method."""
    runs_dir = Path(runs_dir)
    rows = [_run_row(path, runs_dir) for path in sorted(runs_dir.glob("**/metrics.json")) if "dvclive" not in path.parts]
    rows = [row for row in rows if row["protocol"] in PROTOCOLS]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in ("miou", "pixel_accuracy", "diverged_at", "train_seconds"):  # None (a diverged run) -> NaN
        frame[column] = pd.to_numeric(frame[column])
    teacher = frame.loc[frame.protocol == "teacher", "miou"]
    if len(teacher):
        frame["percent_of_teacher"] = 100.0 * frame["miou"] / float(teacher.iloc[0])
    order = {name: index for index, name in enumerate(PROTOCOLS)}
    return frame.sort_values(["protocol", "method", "multiplier"], key=lambda c: c.map(order) if c.name == "protocol" else c).reset_index(drop=True)


def load_calibration(path: str | Path) -> pd.DataFrame:
    """One row per calibrated method: seconds/iteration, spread, phase medians, FLOPs, memory, matched iterations."""
    table = json.loads(Path(path).read_text())
    matched = table["matched"]
    rows = []
    for name, entry in table["methods"].items():
        row = {key: value for key, value in entry.items() if not isinstance(value, dict)}
        row["method"] = name
        row["matched_iterations"] = matched["iterations"][name]
        row["flop_matched_iterations"] = (matched.get("flop_matched_iterations") or {}).get(name)
        row.update({f"phase_{phase}": seconds for phase, seconds in entry["phase_median_seconds"].items()})
        rows.append(row)
    frame = pd.DataFrame(rows).set_index("method")
    for baseline in ("none", "kd"):
        if baseline in frame.index:
            frame[f"relative_to_{baseline}"] = frame["seconds_per_iteration"] / frame.loc[baseline, "seconds_per_iteration"]
    frame.attrs.update({key: value for key, value in table.items() if key not in ("methods",)})
    return frame.reset_index()


def load_curves(runs_dir: str | Path) -> pd.DataFrame:
    """dvclive training curves of every run: columns run, protocol, method, step, metric, value."""
    runs_dir = Path(runs_dir)
    frames = []
    for tsv in sorted(runs_dir.glob("**/dvclive/plots/metrics/**/*.tsv")):
        run_dir = tsv.parents[0]
        while run_dir.name != "dvclive":
            run_dir = run_dir.parent
        run_dir = run_dir.parent
        parts = run_dir.relative_to(runs_dir).parts
        metric = tsv.relative_to(run_dir / "dvclive" / "plots" / "metrics").with_suffix("").as_posix()
        data = pd.read_csv(tsv, sep="\t")
        value_column = [c for c in data.columns if c not in ("step", "timestamp")][0]
        frames.append(
            pd.DataFrame(
                {
                    "run": "/".join(parts),
                    "protocol": parts[0],
                    "method": parts[-1],
                    "step": data["step"],
                    "metric": metric,
                    "value": data[value_column],
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "protocol", "method", "step", "metric", "value"])
