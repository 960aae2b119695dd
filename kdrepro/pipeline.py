"""Glue between DVC's ``params.yaml`` and kdrepro's Hydra configs, and the pipeline-only commands.

``params.yaml`` is owned by the user (edit it, or ``dvc exp run -S key=value``); DVC's Hydra integration is *not*
enabled, so nothing rewrites it. ``kdrepro <command> --params params.yaml`` turns its keys into Hydra overrides:

======================  ===========================================
params.yaml             Hydra override
======================  ===========================================
``profile``             ``profile=<name>``
``seed``                ``seed=<n>``
``reference_iterations``  ``reference_iterations=<n>`` (null = the profile's schedule)
``methods``             ``calibrate.methods=[none,a,b,...]`` (the student alone is always calibrated)
``calibrate.<key>``     ``calibrate.<key>=<value>``
======================  ===========================================

Unknown profiles or method names are rejected here, before any stage runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kdrepro.config import load_config, options
from kdrepro.errors import ConfigError

PARAM_KEYS = {"profile", "seed", "reference_iterations", "methods", "calibrate", "extended"}


def read_params(path: Path) -> dict[str, Any]:
    """Load and validate a pipeline params file; every problem is one line naming the key and the fix."""
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist; run from the repository root or pass --params <file>")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        first = " ".join(str(error).split())
        raise ConfigError(f"{path} is not valid YAML ({first}); fix the syntax") from error
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must be a mapping of keys (profile, seed, methods, ...)")
    unknown = set(params) - PARAM_KEYS
    if unknown:
        raise ConfigError(f"{path} has unknown key(s) {sorted(unknown)}; known keys: {sorted(PARAM_KEYS)}")
    profile = params.get("profile", "synthetic")
    if profile not in options("profile"):
        raise ConfigError(f"{path}: unknown profile {profile!r}; use one of {', '.join(options('profile'))}")
    reference = params.get("reference_iterations")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 1):
        raise ConfigError(f"{path}: reference_iterations must be a positive whole number or null, got {reference!r}")
    methods = params.get("methods") or []
    if not isinstance(methods, list):
        raise ConfigError(f"{path}: methods must be a list of method config names")
    if "none" in methods:
        raise ConfigError(
            f"{path}: methods lists `none`; the student alone is the `student` stage (it runs on every profile), "
            "so remove none from methods"
        )
    extended = params.get("extended") or {}
    all_methods = list(methods) + list(extended.get("methods") or [])
    unknown_methods = [name for name in all_methods if name not in options("method")]
    if unknown_methods:
        raise ConfigError(
            f"{path}: unknown method(s) {unknown_methods}; known: {', '.join(options('method'))} "
            "(add kdrepro/conf/method/<name>.yaml for your own)"
        )
    missing = [name for name in extended.get("methods") or [] if name not in methods]
    if missing:
        raise ConfigError(f"{path}: extended.methods {missing} must also be in methods (they need a calibrated cost)")
    for multiplier in extended.get("multipliers") or []:
        try:
            if float(multiplier) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{path}: extended.multipliers must be positive numbers, got {multiplier!r}") from None
    return params


def params_overrides(path: Path) -> list[str]:
    """Hydra overrides from a params file (see the module docstring)."""
    params = read_params(path)
    overrides = [f"profile={params.get('profile', 'synthetic')}"]
    if "seed" in params:
        overrides.append(f"seed={int(params['seed'])}")
    if params.get("reference_iterations") is not None:
        overrides.append(f"reference_iterations={int(params['reference_iterations'])}")
    if params.get("methods"):
        overrides.append(f"calibrate.methods=[{','.join(['none', *params['methods']])}]")
    for key, value in (params.get("calibrate") or {}).items():
        if value is not None:  # null = keep the profile's choice
            overrides.append(f"calibrate.{key}={value}")
    return overrides


def teacher(overrides: list[str]) -> dict[str, Any]:
    """Import ``teacher_import`` if set, else train ``model@teacher`` alone for ``teacher_iterations``."""
    cfg = load_config(overrides)
    if cfg.get("teacher_import"):
        from kdrepro.models.weights import import_teacher

        output = Path(str(cfg.out_dir)) / "checkpoint.pt"
        cfg.import_teacher.output = str(output)
        import_teacher(cfg, Path(str(cfg.teacher_import)))
        return {"imported": str(cfg.teacher_import), "checkpoint": str(output)}
    from kdrepro.train.run import train

    teacher_overrides = [
        *overrides,
        "method=none",
        f"model@student={cfg.teacher.name}",
        f"student.base_width={cfg.teacher.base_width}",
        "budget=iterations",
        f"budget.iterations={int(cfg.teacher_iterations)}",
    ]
    metrics = train(load_config(teacher_overrides))
    return {key: metrics[key] for key in ("miou", "iterations", "train_seconds")}


def write_plot_tables(runs: Any, curves: Any, folder: Path) -> list[Path]:
    """Wide tables for ``dvc plots show`` (declared in dvc.yaml): compute-matched mIoU per method, and the total
    training loss against training seconds of every compute-matched run (one file per method)."""
    import pandas as pd

    (folder / "curves").mkdir(parents=True, exist_ok=True)
    written = [folder / "miou_compute_matched.csv"]
    matched = runs[runs.protocol == "compute_matched"] if not runs.empty else runs
    pd.DataFrame({"method": matched.get("method", []), "miou": 100 * matched.get("miou", pd.Series(dtype=float))}).to_csv(
        written[0], index=False
    )
    if curves.empty:
        return written
    for method, group in curves[curves.protocol == "compute_matched"].groupby("method"):
        wide = group.pivot_table(index="step", columns="metric", values="value").reset_index()
        if {"train/seconds", "train/total"} <= set(wide.columns):
            table = wide[["step", "train/seconds", "train/total"]].rename(columns={"train/seconds": "seconds", "train/total": "total_loss"})
            path = folder / "curves" / f"{method}.csv"
            table.to_csv(path, index=False)
            written.append(path)
    return written


def write_results(overrides: list[str]) -> list[Path]:
    """``runs.csv`` (one row per run), ``calibration.csv`` and ``curves.csv`` under ``results_dir``, plus a small
    ``summary.json`` of mIoU per protocol and method for ``dvc metrics show``."""
    from kdrepro.results import collect_runs, load_calibration, load_curves

    cfg = load_config(overrides)
    runs_dir, results_dir = Path(str(cfg.runs_dir)), Path(str(cfg.results_dir))
    if not runs_dir.is_dir():
        raise ConfigError(f"runs_dir {runs_dir} does not exist; run the training stages first (dvc repro)")
    results_dir.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(runs_dir)
    written = [results_dir / "runs.csv", results_dir / "curves.csv", results_dir / "summary.json"]
    runs.to_csv(written[0], index=False)
    curves = load_curves(runs_dir)
    curves.to_csv(written[1], index=False)
    written += write_plot_tables(runs, curves, results_dir / "plots")
    summary: dict[str, Any] = {"profile": str(cfg.get("profile_name", "")) or None}
    for protocol, group in runs.groupby("protocol") if not runs.empty else []:
        summary[protocol] = {
            f"{row.method}" + (f"-x{row.multiplier:g}" if protocol == "extended" else ""): (
                round(float(row.miou), 4) if row.miou == row.miou else None  # a diverged run (NaN): null in the JSON
            )
            for row in group.itertuples()
        }
    written[2].write_text(json.dumps(summary, indent=2))
    calibration = runs_dir / "calibration.json"
    if calibration.exists():
        load_calibration(calibration).to_csv(results_dir / "calibration.csv", index=False)
        written.append(results_dir / "calibration.csv")
    return written
