"""Compose kdrepro's packaged Hydra configs (``kdrepro/conf``) with command-line overrides.

We use Hydra's compose API rather than ``@hydra.main`` so that every command is a plain function that tests and
notebooks can call, and so that Hydra does not change the working directory or write ``outputs/`` folders.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrepro.errors import ConfigError, MethodCodeError

CONF_DIR = Path(__file__).parent / "conf"

#: ``${scale:${reference_iterations},0.25}`` -- a whole number proportional to another setting (e.g. MasKD's
#: pre-training length, a quarter of the standard schedule in the released scripts).
OmegaConf.register_new_resolver("scale", lambda value, factor: int(round(float(value) * float(factor))), replace=True)
GROUPS = ("dataset", "model", "method", "budget", "profile")


_IMPORTED_PLUGINS: dict[Path, object] = {}


def options(group: str, plugins: Sequence[str | Path] = ()) -> list[str]:
    """Names of the leaf configs of a config group, e.g. ``options("method")``; ``plugins`` are folders of your own
    configs (``<folder>/<group>/<name>.yaml``) searched after the packaged ones."""
    folders = [CONF_DIR / group, *(Path(folder) / group for folder in plugins)]
    return sorted({path.stem for folder in folders for path in folder.glob("*.yaml")})


@dataclass(frozen=True)
class Roles:
    """The roles methods play in the paper's protocol (``conf/roles.yaml``)."""

    control: str  # the student alone
    logit_kd: str  # canonical logit KD
    canonical: tuple[str, ...]  # canonical KD methods, always extended


@functools.cache
def roles() -> Roles:
    """The method roles declared in ``conf/roles.yaml``."""
    declared = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "roles.yaml"))
    assert isinstance(declared, dict)
    return Roles(str(declared["control"]), str(declared["logit_kd"]), tuple(str(m) for m in declared["canonical"]))


def plugin_folders(overrides: Sequence[str]) -> list[Path]:
    """The ``plugins=[folder, ...]`` override, if any: folders holding your own methods outside the package."""
    folders: list[Path] = []
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if o.split("=")[0] == "plugins"])
    except HydraException as error:
        raise ConfigError(f"plugins must be a list of folders, e.g. plugins=[my_methods] ({error})") from error
    for override in parsed:
        value = override.value()
        folders = [Path(str(item)) for item in (value if isinstance(value, list) else [value] if value else [])]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(
                f"plugins folder {folder} does not exist; create it with <name>.py and method/<name>.yaml, "
                "or remove it from plugins"
            )
    return folders


def plugin_sources(method: str, folders: Sequence[str | Path]) -> list[Path]:
    """The Python sources of the plugin folder that defines ``method`` (``<folder>/method/<method>.yaml``): every
    ``<folder>/*.py``, since :func:`import_plugins` imports them all (empty for a packaged method). A change to any
    of them is a change to the method: its runs retrain and its cost is re-measured."""
    for folder in map(Path, folders):
        if (folder / "method" / f"{method}.yaml").is_file():
            return sorted(folder.glob("*.py"))
    return []


def import_plugins(folders: Sequence[Path]) -> None:
    """Import every ``<folder>/*.py`` once per process: your own methods register themselves with
    ``@kdrepro.distill.register("<term name>")`` when imported."""
    for folder in folders:
        for path in sorted(folder.glob("*.py")):
            key = path.resolve()
            if key in _IMPORTED_PLUGINS:
                continue
            name = f"kdrepro_plugin_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, key)
            if spec is None or spec.loader is None:
                raise ConfigError(f"cannot import plugin {path}; it must be a Python source file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as error:  # the user's code: one line naming the file and line (-v: the traceback)
                del sys.modules[name]
                raise MethodCodeError.wrap(error, path.stem, f"importing plugin {path}", [folder]) from error
            _IMPORTED_PLUGINS[key] = module


def load_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides such as ``["method=kd", "budget.iterations=10"]``.

    ``plugins=[folder, ...]`` adds your own methods kept outside the package: ``<folder>/method/<name>.yaml`` joins
    the ``method`` group (and :func:`import_plugins`, called where distillers are built, imports every
    ``<folder>/*.py``, which registers its Distiller). The method config's
    file name is the method's name (``cfg.method.name``), so a copied config can never borrow another's identity.

    Raises:
        ConfigError: an override names an unknown option or key; the message lists the valid options.
    """
    folders = plugin_folders(overrides)
    extra = [f"hydra.searchpath=[{','.join('file://' + str(f.resolve()) for f in folders)}]"] if folders else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*overrides, *extra], return_hydra_config=True)
    except HydraException as error:
        raise ConfigError(_explain(error, folders)) from error
    choice = cfg.hydra.runtime.choices.get("method")
    with open_dict(cfg):
        del cfg["hydra"]
        if choice is not None and "method" in cfg:
            if cfg.method.get("name") not in (None, choice):
                raise ConfigError(
                    f"method config {choice}.yaml says name: {cfg.method.name}; the file name is the method's name, "
                    "so delete the name: line (or rename the file)"
                )
            cfg.method.name = choice
    return cfg


def trained_alone(
    cfg: DictConfig, model: DictConfig, iterations: int, seed: int, changes: dict[str, Any] | None = None
) -> DictConfig:
    """A derived run, as a config: ``model`` trained alone (the control method, no teacher) for ``iterations``
    iterations with seed ``seed`` -- ``cfg`` with the student replaced by a copy of ``model``, the method by the
    control's config, the budget by an iteration count, and ``changes`` (dotted keys) applied on top. The teacher,
    the backbones' pre-training and the learning-curve benchmark are such runs."""
    run = cfg.copy()
    control = roles().control
    with open_dict(run):
        run.student = OmegaConf.create(OmegaConf.to_container(model))
        run.method = OmegaConf.load(CONF_DIR / "method" / f"{control}.yaml")
        run.method.name = control
        run.budget = OmegaConf.load(CONF_DIR / "budget" / "iterations.yaml")
        run.budget.iterations = int(iterations)
        run.seeds, run.seed = None, int(seed)
        for key, value in (changes or {}).items():
            OmegaConf.update(run, key, value, merge=True)
        # Its schedule is its own: settings that follow the methods' schedule (``teacher_iterations`` by default)
        # are fixed at their values, and the methods' schedule is no part of its identity, so changing
        # ``reference_iterations`` does not retrain the teacher or the pre-trained backbones.
        OmegaConf.resolve(run)
        run.reference_iterations = None
    return run


def check_calibrate(settings: DictConfig) -> None:
    """One-line errors for a ``calibrate`` section that cannot run: no or repeated methods, rounds or iterations per
    round below 1, a ``max_spread`` that is not a positive number or null. ``kdrepro validate`` runs this before a
    pipeline starts, and ``kdrepro calibrate`` again."""
    names = list(settings.methods)
    if not names:
        raise ConfigError("calibrate.methods is empty; list the methods to compare, e.g. calibrate.methods=[none,kd]")
    if len(set(names)) != len(names):
        raise ConfigError(f"calibrate.methods lists a method twice: {names}")
    for key in ("rounds", "iterations_per_round"):
        if int(settings[key]) < 1:
            raise ConfigError(f"calibrate.{key} must be at least 1, got {settings[key]}")
    spread = settings.get("max_spread")
    if spread is not None and (isinstance(spread, bool) or not isinstance(spread, int | float) or spread <= 0):
        raise ConfigError(f"calibrate.max_spread must be a positive number (e.g. 0.5) or null, got {spread!r}")
    deviation = settings.get("max_flop_deviation")
    if deviation is not None and (isinstance(deviation, bool) or not isinstance(deviation, int | float) or deviation <= 1):
        raise ConfigError(f"calibrate.max_flop_deviation must be a number above 1 (e.g. 4) or null, got {deviation!r}")
    drift = settings.get("max_anchor_drift")
    if drift is not None and (isinstance(drift, bool) or not isinstance(drift, int | float) or not 0 < drift < 1):
        raise ConfigError(f"calibrate.max_anchor_drift must be a fraction between 0 and 1 (e.g. 0.1) or null, got {drift!r}")
    remeasure = settings.get("remeasure", 0)
    if isinstance(remeasure, bool) or not isinstance(remeasure, int) or remeasure < 0:
        raise ConfigError(f"calibrate.remeasure must be a whole number of re-measurements (0 or more), got {remeasure!r}")
    if str(settings.get("clock", "auto")) not in ("auto", "wall", "cpu"):
        raise ConfigError(f"calibrate.clock must be auto, wall or cpu, got {settings.get('clock')!r}")


def _explain(error: HydraException, plugins: Sequence[Path] = ()) -> str:
    message = " ".join(str(error).split())
    for group in GROUPS:
        if f"'{group}'" in message or f"/{group}" in message or f"{group}=" in message:
            valid = ", ".join(options(group, plugins))
            return f"{message.split('Available options')[0].strip()} (valid {group} options: {valid})"
    return message


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (saved beside every run)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
