"""Compose kdrepro's packaged Hydra configs (``kdrepro/conf``) with command-line overrides.

We use Hydra's compose API rather than ``@hydra.main`` so that every command is a plain function that tests and
notebooks can call, and so that Hydra does not change the working directory or write ``outputs/`` folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from kdrepro.errors import ConfigError

CONF_DIR = Path(__file__).parent / "conf"

#: ``${scale:${reference_iterations},0.25}`` -- a whole number proportional to another setting (e.g. MasKD's
#: pre-training length, a quarter of the standard schedule in the released scripts).
OmegaConf.register_new_resolver("scale", lambda value, factor: int(round(float(value) * float(factor))), replace=True)
GROUPS = ("dataset", "model", "method", "budget", "profile")


def options(group: str) -> list[str]:
    """Names of the leaf configs of a config group, e.g. ``options("method")``."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def load_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides such as ``["method=kd", "budget.iterations=10"]``.

    Raises:
        ConfigError: an override names an unknown option or key; the message lists the valid options.
    """
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except HydraException as error:
        raise ConfigError(_explain(error)) from error
    return cfg


def _explain(error: HydraException) -> str:
    message = " ".join(str(error).split())
    for group in GROUPS:
        if f"'{group}'" in message or f"/{group}" in message or f"{group}=" in message:
            return f"{message.split('Available options')[0].strip()} (valid {group} options: {', '.join(options(group))})"
    return message


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (saved beside every run)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
