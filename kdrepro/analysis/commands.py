"""``kdrepro results`` and ``kdrepro select``: the analysis stages of the pipeline, from their overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kdrepro.analysis.results import collect_runs, extended_selection, write_json, write_results
from kdrepro.config import load_config
from kdrepro.errors import ConfigError


def results(overrides: list[str]) -> list[Path]:
    """``kdrepro results``: the tidy tables, statistics and verdict of ``runs_dir`` under ``results_dir``."""
    cfg = load_config(overrides)
    runs_dir, results_dir = Path(str(cfg.runs_dir)), Path(str(cfg.results_dir))
    if not runs_dir.is_dir():
        raise ConfigError(f"runs_dir {runs_dir} does not exist; run the training stages first (dvc repro)")
    settings = OmegaConf.to_container(cfg.verdict, resolve=True) if cfg.get("verdict") is not None else None
    return write_results(runs_dir, results_dir, str(cfg.get("profile_name") or "") or None, settings)


def select(overrides: list[str]) -> dict[str, Any]:
    """``kdrepro select``: the segmentation-specific method to extend (the best of this run's compute-matched
    table), written to ``<results_dir>/extended_selection.json`` for the extended stage of that slot."""
    cfg = load_config(overrides)
    runs_dir, results_dir = Path(str(cfg.runs_dir)), Path(str(cfg.results_dir))
    runs = collect_runs(runs_dir) if runs_dir.is_dir() else None
    if runs is None or runs.empty or not (runs.protocol == "compute_matched").any():
        raise ConfigError(f"no compute-matched runs under {runs_dir}; run the compute_matched stages first (dvc repro)")
    selection = extended_selection(runs)
    if selection["method"] is None:
        raise ConfigError(
            f"no segmentation-specific method finished compute-matched under {runs_dir}; add one to methods in "
            "params.yaml (family: segmentation_specific in its config)"
        )
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "extended_selection.json", selection)
    return selection
