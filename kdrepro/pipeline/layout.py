"""Where every run of a pipeline lives: one function builds the path, one parses it back.

::

    runs/<profile>/teacher/                                  the teacher (trained once, or imported)
    runs/<profile>/calibration.json, calibration/            `kdrepro calibrate` (shared by every seed)
    runs/<profile>/<protocol>/<method>/seed<s>/              iter_matched | compute_matched, one folder per seed
    runs/<profile>/extended/<method>-<k>/seed<s>/            k x the compute-matched budget

``<method>`` is the method config's name (``none`` = the student alone). The extended run of the best
segmentation-specific method is chosen at run time, so its DVC stage writes the slot folder
``extended/best_specific-<k>/``; the method it trained is in each run's ``metrics.json``.
A DVC training stage owns the ``<method>[-<k>]`` folder and trains every seed into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("teacher", "iter_matched", "compute_matched", "extended")
SUPERSEDED = ".superseded-"  # kdrepro.train.run_folder.SUPERSEDED_INFIX (a test checks they agree)
BEST_SPECIFIC = "best_specific"  # the extended slot of the best segmentation-specific method (chosen at run time)


@dataclass(frozen=True)
class RunKey:
    """What a run folder stands for."""

    protocol: str
    method: str
    multiplier: float = 1.0
    seed: int | None = None


def format_multiplier(multiplier: float | str) -> str:
    """``2`` for 2.0, ``1.5`` for 1.5: the ``-<k>`` suffix of an extended folder."""
    return f"{float(multiplier):g}"


def method_dir(runs_dir: str | Path, protocol: str, method: str, multiplier: float | str | None = None) -> Path:
    """The folder a DVC stage owns: ``<runs_dir>/<protocol>/<method>[-<k>]`` (the teacher: ``<runs_dir>/teacher``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {PROTOCOLS}")
    if protocol == "teacher":
        return Path(runs_dir) / "teacher"
    if (protocol == "extended") != (multiplier is not None):
        raise ValueError("a multiplier is given for extended runs, and only for them")
    name = f"{method}-{format_multiplier(multiplier)}" if protocol == "extended" else method
    return Path(runs_dir) / protocol / name


def seed_dir(folder: str | Path, seed: int) -> Path:
    """One seed's run inside a stage's folder."""
    return Path(folder) / f"seed{int(seed)}"


def run_path(
    runs_dir: str | Path, protocol: str, method: str, multiplier: float | str | None = None, seed: int | None = None
) -> Path:
    """The folder of one run (``seed=None``: the stage folder, as for the teacher)."""
    folder = method_dir(runs_dir, protocol, method, multiplier)
    return folder if seed is None else seed_dir(folder, seed)


def parse_run_path(runs_dir: str | Path, path: str | Path) -> RunKey | None:
    """The :class:`RunKey` of a run folder under ``runs_dir``; None for anything that is not a run folder."""
    try:
        parts = Path(path).relative_to(runs_dir).parts
    except ValueError:
        return None
    if any(SUPERSEDED in part for part in parts):  # a run moved aside by on_config_change=archive
        return None
    if parts == ("teacher",):
        return RunKey("teacher", "teacher")
    if len(parts) not in (2, 3) or parts[0] not in PROTOCOLS[1:]:
        return None
    protocol, name = parts[0], parts[1]
    seed = None
    if len(parts) == 3:
        if not (parts[2].startswith("seed") and parts[2][4:].isdigit()):
            return None
        seed = int(parts[2][4:])
    multiplier = 1.0
    if protocol == "extended":
        name, _, suffix = name.rpartition("-")
        try:
            multiplier = float(suffix)
        except ValueError:
            return None
        if not name:
            return None
    return RunKey(protocol, name, multiplier, seed)
