"""What a stage's job asks the scheduler for: ``kdrepro/conf/cluster/default.yaml`` under the profile's own file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdrepro.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "cluster"


@dataclass(frozen=True)
class Resources:
    """One job's request; ``gpu_type`` becomes SLURM's ``--constraint``."""

    gpus: int
    cpus: int
    mem_gb: float
    time_min: int
    gpu_type: str | None
    partition: str | None
    exclusive: bool = False

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" + (f" ({self.gpu_type})" if self.gpus and self.gpu_type else "")
        return f"{gpus}, {self.cpus} CPU, {self.mem_gb:g} GB, {self.time_min} min" + (", exclusive" if self.exclusive else "")


def cluster_config(profile: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The default resources, the profile's file over them, then ``key=value`` overrides from the command line."""
    config = OmegaConf.load(CONF / "default.yaml")
    profile_file = CONF / f"{profile}.yaml"
    try:
        if profile_file.is_file():
            config = OmegaConf.merge(config, OmegaConf.load(profile_file))
        OmegaConf.set_struct(config, True)
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        known = ", ".join(str(key) for key in OmegaConf.load(CONF / "default.yaml"))
        raise ConfigError(f"bad cluster setting ({' '.join(str(error).split())[:120]}); known keys: {known}") from None
    _check(config)
    return config


def _check(config: DictConfig) -> None:
    for key in ("gpus", "cpus", "mem_gb", "time_min", "light.cpus", "light.mem_gb", "light.time_min"):
        value = OmegaConf.select(config, key)
        minimum = 0 if key == "gpus" else 1
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise ConfigError(f"cluster setting {key}={value!r} must be a number >= {minimum}; fix kdrepro/conf/cluster/ or the override")


def stage_resources(config: DictConfig | dict[str, Any], kind: str, exclusive: bool = False) -> Resources:
    """The request of a stage of ``kind`` (``train``, ``single`` or ``light``; see :class:`kdrepro.cluster.dag.Stage`)."""
    shared = {"gpu_type": config.get("gpu_type"), "partition": config.get("partition")}
    if kind == "light":
        light = config["light"]
        return Resources(0, int(light["cpus"]), float(light["mem_gb"]), int(light["time_min"]), **shared)
    gpus = int(config["gpus"]) if kind == "train" else min(int(config["gpus"]), 1)
    return Resources(gpus, int(config["cpus"]), float(config["mem_gb"]), int(config["time_min"]), **shared,
                     exclusive=exclusive and bool(config.get("exclusive_calibration", True)))
