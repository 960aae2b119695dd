"""Glue between DVC's ``params.yaml`` and kdrepro's Hydra configs.

``params.yaml`` is owned by the user (edit it, or ``dvc exp run -S key=value``); DVC's Hydra integration is *not*
enabled, so nothing rewrites it. ``kdrepro <command> --params params.yaml`` turns its keys into Hydra overrides:

========================  ===========================================================================
params.yaml               Hydra override
========================  ===========================================================================
``profile``               ``profile=<name>``
``seeds``                 ``seeds=[0,1,2]`` (``kdrepro train`` trains one run per seed)
``reference_iterations``  ``reference_iterations=<n>`` (null = the profile's schedule)
``methods``               ``calibrate.methods=[none,a,b,...]`` (the student alone is always calibrated)
``calibrate.<key>``       ``calibrate.<key>=<value>``
``plugins``               ``plugins=[folder]``: the folder of your own methods, outside the package
``verdict.<key>``         ``verdict.<key>=<value>`` (the results stage: the positive control's methods, ...)
``extended``              read by dvc.yaml only (the multipliers of the extended runs)
========================  ===========================================================================

Every command also gets ``speed.file=runs/<profile>/hardware.json``: the decision of the ``hardware`` stage (the
pipeline's first), which settles a profile's ``auto`` precision, channels_last and threads once for every stage.

Unknown profiles or method names are rejected here, before any stage runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from kdrepro.config import CONF_DIR, options, roles
from kdrepro.errors import ConfigError

PARAM_KEYS = {"profile", "seeds", "reference_iterations", "methods", "calibrate", "extended", "plugins", "verdict"}
#: The pipeline's statistics (a t-interval per method, seed-paired differences) and its verdict need two seeds; one
#: seed would train every stage and then have nothing to judge with, so ``validate`` refuses it up front.
MIN_SEEDS = 2
RENAMED = {
    "seed": "seed became seeds: a list such as [0, 1, 2] (every training run is repeated per seed)",
}


def _check_seeds(path: Path, seeds: Any) -> None:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{path}: seeds must be a non-empty list such as [0, 1, 2], got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: seeds must be distinct whole numbers >= 0, got {seeds!r}")
    if len(seeds) < MIN_SEEDS:
        raise ConfigError(
            f"{path}: seeds {seeds!r} is one seed, but the pipeline's statistics and verdict compare methods by "
            f"seed-paired intervals, which need at least {MIN_SEEDS}; list two or more, e.g. seeds: [0, 1] (one "
            "run by hand: kdrepro train seed=<s>)"
        )


def _check_extended(path: Path, extended: Any, methods: list[str]) -> None:
    if not isinstance(extended, dict):
        raise ConfigError(f"{path}: extended must be a mapping with multipliers: [...]")
    if "methods" in extended:
        raise ConfigError(
            f"{path}: extended.methods is not a setting any more: the extended runs are the student alone, kd, "
            "fitnet and the best segmentation-specific method of the compute-matched table; delete extended.methods"
        )
    unknown = set(extended) - {"multipliers"}
    if unknown:
        raise ConfigError(f"{path}: extended has unknown key(s) {sorted(unknown)}; it takes multipliers only")
    missing = [name for name in roles().canonical if name not in methods]  # the extended runs (conf/roles.yaml)
    if missing:
        raise ConfigError(f"{path}: methods must include {missing}: the extended runs and the verdict compare against them")
    if "multipliers" in extended and not extended["multipliers"]:
        raise ConfigError(f"{path}: extended.multipliers is empty, but claim (c) and the teacher's capacity gap are "
                          'measured on the extended runs; give at least one budget, e.g. multipliers: ["4"]')
    for multiplier in extended.get("multipliers") or []:
        try:
            if float(multiplier) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{path}: extended.multipliers must be positive numbers, got {multiplier!r}") from None


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
        raise ConfigError(f"{path} must be a mapping of keys (profile, seeds, methods, ...)")
    for old, advice in RENAMED.items():
        if old in params:
            raise ConfigError(f"{path}: {advice}; replace `{old}:` accordingly")
    unknown = set(params) - PARAM_KEYS
    if unknown:
        raise ConfigError(f"{path} has unknown key(s) {sorted(unknown)}; known keys: {sorted(PARAM_KEYS)}")
    profile = params.get("profile", "synthetic")
    if profile not in options("profile"):
        raise ConfigError(f"{path}: unknown profile {profile!r}; use one of {', '.join(options('profile'))}")
    if "seeds" in params:
        _check_seeds(path, params["seeds"])
    reference = params.get("reference_iterations")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 1):
        raise ConfigError(f"{path}: reference_iterations must be a positive whole number or null, got {reference!r}")
    folder = params.get("plugins")
    if folder is not None and (not isinstance(folder, str) or not folder):
        raise ConfigError(f"{path}: plugins must be one folder (your own methods), e.g. plugins: plugins")
    if folder is not None and not Path(folder).is_dir():
        raise ConfigError(
            f"{path}: plugins folder {folder} does not exist; create it (it may stay empty) or point plugins at yours"
        )
    plugins = [folder] if folder else []
    methods = params.get("methods") or []
    if not isinstance(methods, list):
        raise ConfigError(f"{path}: methods must be a list of method config names")
    if "none" in methods:
        raise ConfigError(
            f"{path}: methods lists `none`; the student alone is the `student` stage (it runs on every profile), "
            "so remove none from methods"
        )
    known = options("method", plugins)
    unknown_methods = [name for name in methods if name not in known]
    if unknown_methods:
        raise ConfigError(
            f"{path}: unknown method(s) {unknown_methods}; known: {', '.join(known)} "
            "(your own: a folder in plugins with method/<name>.yaml)"
        )
    if "extended" in params:
        _check_extended(path, params["extended"] or {}, methods)
    if "verdict" in params:
        _check_verdict(path, params["verdict"] or {}, methods)
    return params


def _check_verdict(path: Path, verdict: Any, methods: list[str]) -> None:
    if not isinstance(verdict, dict):
        raise ConfigError(f"{path}: verdict must be a mapping such as {{positive_control: [kd, cwd]}}")
    known = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["verdict"]
    unknown = set(verdict) - set(known)
    if unknown:
        raise ConfigError(f"{path}: verdict has unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    controls = verdict.get("positive_control")
    if controls is not None and (not isinstance(controls, list) or not controls):
        raise ConfigError(f"{path}: verdict.positive_control must be a list of methods such as [kd, cwd]")
    missing = [name for name in controls or [] if name not in methods]
    if missing:
        raise ConfigError(f"{path}: verdict.positive_control names {missing}, which methods does not run; add them "
                          "to methods or choose other control methods")


def params_overrides(path: Path) -> list[str]:
    """Hydra overrides from a params file (see the module docstring)."""
    params = read_params(path)
    profile = params.get("profile", "synthetic")
    overrides = [f"profile={profile}", f"speed.file=runs/{profile}/hardware.json"]  # the `hardware` stage's decision
    if params.get("seeds"):
        overrides.append(f"seeds=[{','.join(str(int(s)) for s in params['seeds'])}]")
    if params.get("reference_iterations") is not None:
        overrides.append(f"reference_iterations={int(params['reference_iterations'])}")
    if params.get("methods"):
        overrides.append(f"calibrate.methods=[{','.join(['none', *params['methods']])}]")
    for key, value in (params.get("calibrate") or {}).items():
        if value is not None:  # null = keep the profile's choice
            overrides.append(f"calibrate.{key}={value}")
    if params.get("plugins"):
        overrides.append(f"plugins=[{params['plugins']}]")
    for key, value in (params.get("verdict") or {}).items():
        if value is not None:
            text = f"[{','.join(str(v) for v in value)}]" if isinstance(value, list) else value
            overrides.append(f"verdict.{key}={text}")
    return overrides


def method_from(overrides: list[str]) -> list[str]:
    """Replace a ``method_from=<selection.json>`` override by ``method=<the method it names>``."""
    chosen = [o for o in overrides if o.startswith("method_from=")]
    if not chosen:
        return overrides
    path = Path(chosen[-1].split("=", 1)[1])
    if not path.is_file():
        raise ConfigError(f"method_from={path}: no such file; run `kdrepro select` (the select stage) first")
    try:
        method = json.loads(path.read_text())["method"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"method_from={path} is not a selection written by `kdrepro select`; rerun it") from None
    return [o for o in overrides if not o.startswith("method_from=")] + [f"method={method}"]
