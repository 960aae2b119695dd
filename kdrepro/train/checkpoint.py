"""Atomic checkpoints: written to a temporary file in the same folder, then renamed over the old one.

A crash or a kill during a save therefore never leaves a truncated ``checkpoint.pt``: the previous complete one
stays until the new one is whole.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrepro.errors import WeightsError

FORMAT_VERSION = 1


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via ``<path>.tmp`` + ``os.replace``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` via ``<path>.tmp`` + ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a kdrepro checkpoint; a missing or unreadable file is a one-line :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; train it first (e.g. `kdrepro train`) or fix the path")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise WeightsError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); re-create it") from error
    if not isinstance(state, dict) or "model" not in state:
        raise WeightsError(f"{path} is not a kdrepro checkpoint (no 'model' entry); use `kdrepro import-teacher` for mmseg files")
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
