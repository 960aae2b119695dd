"""Every run of a pipeline as tidy pandas tables, their statistics over seeds, and the verdict on the paper's claims.

Run folders follow :mod:`kdrepro.pipeline.layout` (``runs/<profile>/<protocol>/<method>[-<k>]/seed<s>/``). ``kdrepro results``
writes, under ``results/<profile>/``:

==========================  ============================================================================================
``runs.csv``                one row per run (mIoU as a fraction, as ``kdrepro.evaluate`` stores it), with its seed,
                            the method's family, display name and citation (from the run's saved config), the step
                            it diverged at (``diverged_at``) and whether it collapsed to one class (``collapsed``,
                            :func:`kdrepro.analysis.regime.collapsed`)
``per_class.csv``           one row per run and class: IoU in percent (NaN for a class absent from validation)
``stats.csv``               one row per (protocol, method, multiplier): mean, sd, 95 % t-interval over seeds, and
                            seed-paired differences vs the student alone and vs logit KD (percent points;
                            :mod:`kdrepro.analysis.stats`)
``verdict.json``            the regime (teacher gap, where the schedule sits, positive control, capacity gap, the
                            methods with runs collapsed to one class), the compute check (every compute-matched run's
                            seconds against its budget) and the verdict per claim (:mod:`kdrepro.analysis.verdict`);
                            also a DVC metric
``curves.csv``              the dvclive logs of every run (one row per logged step and metric)
``calibration.csv``         one row per calibrated method (seconds/iteration and its spread, phases, FLOPs, memory)
``summary.json``            mean mIoU per protocol and method (``dvc metrics show``)
``plots/``                  wide tables for ``dvc plots show``
==========================  ============================================================================================
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kdrepro.analysis.regime import classes_learned, collapsed, deciding_classes, regime, teacher_miou_pct
from kdrepro.analysis.stats import summarize
from kdrepro.analysis.verdict import best_specific, judge, preconditions
from kdrepro.pipeline.layout import BEST_SPECIFIC, PROTOCOLS, parse_run_path
from kdrepro.pipeline.matching import read_table
from kdrepro.train.speed_choice import runs_speed_choice


def _method_meta(run_dir: Path) -> dict[str, Any]:
    """family, display_name and reproduces of the run's method, from the config saved with the run."""
    saved = run_dir / "config.yaml"
    method = (yaml.safe_load(saved.read_text()) or {}).get("method", {}) if saved.is_file() else {}
    return {key: method.get(key) for key in ("family", "display_name", "reproduces")}


def _run_row(metrics_path: Path, runs_dir: Path) -> dict[str, Any] | None:
    run_dir = metrics_path.parent
    key = parse_run_path(runs_dir, run_dir)
    if key is None:
        return None
    metrics = json.loads(metrics_path.read_text())
    method = "teacher" if key.protocol == "teacher" else str(metrics.get("method") or key.method)
    meta = _method_meta(run_dir)
    if key.protocol == "teacher":
        meta = {"family": "teacher", "display_name": "Teacher", "reproduces": None}
    seed = key.seed
    if seed is None:
        saved = run_dir / "config.yaml"
        seed = (yaml.safe_load(saved.read_text()) or {}).get("seed") if saved.is_file() else None
    row = {
        "run": run_dir.relative_to(runs_dir).as_posix(),
        "protocol": key.protocol,
        "method": method,
        "slot": key.method if key.method == BEST_SPECIFIC else None,
        "multiplier": key.multiplier,
        "seed": seed,
        **meta,
        "miou": metrics.get("miou"),
        "diverged_at": (metrics.get("diverged") or {}).get("step"),
        "collapsed": metrics.get("miou") is not None and collapsed(metrics.get("per_class_iou")),
        "pixel_accuracy": metrics.get("pixel_accuracy"),
        "iterations": metrics.get("iterations"),
        "train_seconds": metrics.get("train_seconds"),
        "train_cpu_seconds": metrics.get("train_cpu_seconds"),
        "seconds_per_iteration": metrics.get("seconds_per_iteration"),
        "precision": metrics.get("precision"),
        "device": metrics.get("device"),
    }
    if not row["display_name"]:
        row["display_name"] = method
    for phase, seconds in (metrics.get("phase_median_seconds") or {}).items():
        row[f"phase_{phase}"] = seconds
    return row


def _metrics_files(runs_dir: Path) -> list[Path]:
    return [path for path in sorted(runs_dir.glob("**/metrics.json")) if "dvclive" not in path.parts]


def collect_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``runs_dir`` (folders with ``metrics.json`` in the layout of
    :mod:`kdrepro.pipeline.layout`), sorted by protocol, method, multiplier and seed."""
    runs_dir = Path(runs_dir)
    rows = [row for path in _metrics_files(runs_dir) if (row := _run_row(path, runs_dir)) is not None]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for column in ("miou", "pixel_accuracy", "diverged_at", "train_seconds", "train_cpu_seconds", "iterations"):  # None -> NaN
        frame[column] = pd.to_numeric(frame[column])
    teacher = frame.loc[frame.protocol == "teacher", "miou"]
    if len(teacher):
        frame["percent_of_teacher"] = 100.0 * frame["miou"] / float(teacher.iloc[0])
    order = {name: index for index, name in enumerate(PROTOCOLS)}
    return frame.sort_values(
        ["protocol", "method", "multiplier", "seed"], key=lambda c: c.map(order) if c.name == "protocol" else c
    ).reset_index(drop=True)


def collect_per_class(runs_dir: str | Path) -> pd.DataFrame:
    """One row per (run, class): protocol, method, multiplier, seed, class_name, iou (percent)."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in _metrics_files(runs_dir):
        row = _run_row(path, runs_dir)
        if row is None:
            continue
        metrics = json.loads(path.read_text())
        names = metrics.get("class_names") or [str(i) for i in range(len(metrics.get("per_class_iou") or []))]
        for name, iou in zip(names, metrics.get("per_class_iou") or [], strict=False):
            rows.append({key: row[key] for key in ("protocol", "method", "multiplier", "seed")}
                        | {"class_name": name, "iou": math.nan if iou is None else 100.0 * iou})  # fmt: skip
    return pd.DataFrame(rows, columns=["protocol", "method", "multiplier", "seed", "class_name", "iou"])


def load_calibration(path: str | Path) -> pd.DataFrame:
    """One row per calibrated method: seconds/iteration, spread, phase medians, FLOPs, memory, matched iterations."""
    table = read_table(Path(path), "run `kdrepro calibrate` first")
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
    """dvclive training curves of every run: columns run, protocol, method, multiplier, seed, step, metric, value."""
    runs_dir = Path(runs_dir)
    columns = ["run", "protocol", "method", "multiplier", "seed", "step", "metric", "value"]
    frames = []
    methods: dict[Path, str] = {}
    for tsv in sorted(runs_dir.glob("**/dvclive/plots/metrics/**/*.tsv")):
        run_dir = next(parent for parent in tsv.parents if parent.name == "dvclive").parent
        key = parse_run_path(runs_dir, run_dir)
        if key is None:
            continue
        if run_dir not in methods:
            saved = run_dir / "config.yaml"
            name = ((yaml.safe_load(saved.read_text()) or {}).get("method") or {}).get("name") if saved.is_file() else None
            methods[run_dir] = "teacher" if key.protocol == "teacher" else str(name or key.method)
        metric = tsv.relative_to(run_dir / "dvclive" / "plots" / "metrics").with_suffix("").as_posix()
        data = pd.read_csv(tsv, sep="\t").drop_duplicates("step", keep="last")
        value_column = [c for c in data.columns if c not in ("step", "timestamp")][0]
        frames.append(pd.DataFrame({"run": run_dir.relative_to(runs_dir).as_posix(), "protocol": key.protocol,
                                    "method": methods[run_dir], "multiplier": key.multiplier, "seed": key.seed,
                                    "step": data["step"], "metric": metric, "value": data[value_column]}))  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def specific_methods(runs: pd.DataFrame) -> list[str]:
    """The segmentation-specific methods among the runs (by the family in each run's config)."""
    if runs.empty or "family" not in runs:
        return []
    return sorted(runs.loc[runs.family == "segmentation_specific", "method"].unique())


def extended_selection(runs: pd.DataFrame) -> dict[str, Any]:
    """The segmentation-specific method to extend: the best compute-matched mean mIoU of this run."""
    specific = specific_methods(runs[runs.protocol == "compute_matched"]) if not runs.empty else []
    method = best_specific(runs, specific) if specific else None
    if method is None:
        return {"method": None, "by": "compute-matched mean mIoU over seeds", "candidates": specific}
    means = runs[(runs.protocol == "compute_matched") & (runs.method.isin(specific))].groupby("method").miou.mean()
    return {"method": method, "by": "compute-matched mean mIoU over seeds", "candidates": specific,
            "means": {name: round(100 * float(value), 3) for name, value in means.items()}}  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    from kdrepro.io import write_text_atomic

    write_text_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n")
    return path


def write_plot_tables(stats: pd.DataFrame, curves: pd.DataFrame, folder: Path) -> list[Path]:
    """Wide tables for ``dvc plots show`` (declared in dvc.yaml): compute-matched mean mIoU per method, and the
    student's cross-entropy against training seconds of every compute-matched run of the first seed."""
    (folder / "curves").mkdir(parents=True, exist_ok=True)
    written = [folder / "miou_compute_matched.csv"]
    matched = stats[stats.protocol == "compute_matched"] if not stats.empty else stats
    pd.DataFrame({"method": matched.get("method", []), "miou": matched.get("miou_mean", [])}).to_csv(written[0], index=False)
    if curves.empty:
        return written
    matched_curves = curves[curves.protocol == "compute_matched"]
    first_seed = matched_curves.seed.min()
    for method, group in matched_curves[matched_curves.seed == first_seed].groupby("method"):
        wide = group.pivot_table(index="step", columns="metric", values="value").reset_index()
        if {"train/seconds", "train/ce"} <= set(wide.columns):
            table = wide[["step", "train/seconds", "train/ce"]].rename(columns={"train/seconds": "seconds", "train/ce": "ce"})
            path = folder / "curves" / f"{method}.csv"
            table.to_csv(path, index=False)
            written.append(path)
    return written


def read_calibration_json(runs_dir: Path) -> dict[str, Any] | None:
    """``<runs_dir>/calibration.json`` as written by ``kdrepro calibrate`` (None when there is none)."""
    path = runs_dir / "calibration.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict_record(runs: pd.DataFrame, stats: pd.DataFrame, per_class: pd.DataFrame, profile: str | None,
                   calibration: dict[str, Any] | None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``verdict.json``: the regime (with the positive control and the capacity gap), the compute check, and every
    claim's verdict under those preconditions."""
    if runs.empty or stats.empty:
        return {"regime": {"profile": profile}, "claims": []}
    teacher = teacher_miou_pct(runs)
    conditions = preconditions(runs, teacher, calibration, settings)
    record = {"regime": regime(runs, stats, profile), "compute_check": conditions["compute_check"],
              "claims": judge(runs, specific_methods(runs), teacher, conditions)}  # fmt: skip
    record["regime"].update(classes_learned_by_student=classes_learned(per_class),
                            positive_control=conditions["positive_control"], capacity_gap=conditions["capacity_gap"])
    record["can_judge"] = not conditions["withheld"]
    return record


def write_results(runs_dir: Path, results_dir: Path, profile: str | None = None,
                  settings: dict[str, Any] | None = None) -> list[Path]:
    """Every table of the module docstring under ``results_dir`` (``settings``: the ``verdict:`` config)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(runs_dir)
    runs.to_csv(results_dir / "runs.csv", index=False)
    per_class = collect_per_class(runs_dir)
    per_class.to_csv(results_dir / "per_class.csv", index=False)
    teacher = teacher_miou_pct(runs)
    stats = summarize(runs, teacher) if not runs.empty else pd.DataFrame()
    stats.to_csv(results_dir / "stats.csv", index=False)
    curves = load_curves(runs_dir)
    curves.to_csv(results_dir / "curves.csv", index=False)
    verdict = verdict_record(runs, stats, per_class, profile, read_calibration_json(runs_dir), settings)
    verdict["regime"]["speed"] = runs_speed_choice(json.loads(path.read_text()).get("speed") for path in _metrics_files(runs_dir))
    for claim in verdict["claims"]:
        figures = claim["figures"]
        if claim["id"] == "b" and figures.get("canonical") and figures.get("best_specific"):
            figures["per_class"] = deciding_classes(per_class, "compute_matched", figures["canonical"], figures["best_specific"])
    written = [results_dir / name for name in ("runs.csv", "per_class.csv", "stats.csv", "curves.csv")]
    written.append(write_json(results_dir / "verdict.json", verdict))
    summary: dict[str, Any] = {"profile": profile}
    for protocol, group in stats.groupby("protocol", sort=False) if not stats.empty else []:
        summary[protocol] = {
            f"{row.method}" + (f"-x{row.multiplier:g}" if protocol == "extended" else ""): round(float(row.miou_mean), 2)
            for row in group.itertuples()
        }
    written.append(write_json(results_dir / "summary.json", summary))
    written += write_plot_tables(stats, curves, results_dir / "plots")
    calibration = runs_dir / "calibration.json"
    if calibration.exists():
        load_calibration(calibration).to_csv(results_dir / "calibration.csv", index=False)
        written.append(results_dir / "calibration.csv")
    return written
