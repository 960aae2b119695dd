"""What kdrepro knows about a method besides its losses, for packaged and plugin methods alike: its family, display
name, citation (``reproduces``) and base method (``base:`` in a variant's config, e.g. ``cwd_published`` -> ``cwd``),
and the roles of the paper's protocol (``conf/roles.yaml``: the control, logit KD, the canonical methods)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kdrepro.config import CONF_DIR, options, roles

STUDENT_ALONE = roles().control
LOGIT_KD = roles().logit_kd
CANONICAL = roles().canonical
#: The keys of a method config that describe the method (the rest builds it).
METADATA_KEYS = ("family", "display_name", "reproduces")


def plugins_of(start: str | Path = ".") -> list[Path]:
    """The ``plugins`` folder of the nearest ``params.yaml`` at or above ``start`` (none without one)."""
    for folder in (Path(start).resolve(), *Path(start).resolve().parents):
        params = folder / "params.yaml"
        if params.is_file():
            plugins = (yaml.safe_load(params.read_text()) or {}).get("plugins")
            return [folder / plugins] if isinstance(plugins, str) else []
    return []


def method_info(name: str, plugins: Sequence[str | Path] | None = None, start: str | Path = ".") -> dict[str, Any]:
    """family, display_name, reproduces (those set) and base of a method config: the packaged one, else the one in
    ``plugins`` (default: the ``plugins`` folder of the nearest ``params.yaml`` at or above ``start``); {} when there
    is none."""
    folders = [CONF_DIR, *(Path(p) for p in (plugins_of(start) if plugins is None else plugins))]
    for folder in folders:
        path = folder / "method" / f"{name}.yaml"
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            info = {key: config.get(key) for key in METADATA_KEYS if config.get(key)}
            return {**info, "base": str(config.get("base") or name)}
    return {}


def base_method(name: str) -> str:
    """The method a config variant reproduces (its ``base:``), the name itself for a method of its own."""
    return method_info(name, plugins=[]).get("base", name)


def method_names(plugins: Sequence[str | Path] = ()) -> list[str]:
    """Every method config, packaged and in ``plugins``, the control left out."""
    return [name for name in options("method", plugins) if name != STUDENT_ALONE]
