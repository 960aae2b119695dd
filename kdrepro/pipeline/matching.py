"""Compute matching, in one place: which method sets the budget, the formula, and the calibration files.

``kdrepro calibrate`` measures every method's median seconds per iteration ``s_m`` (and the seconds of its own
pre-training stage ``p_m``, e.g. MasKD's tokens). The **reference** is ``calibrate.reference_method``, else the
slowest method per iteration. The matched **budget** is what the reference costs at the reference schedule, and every
method trains as many whole iterations as fit in ``multiplier × budget`` after its pre-training::

    B   = reference_iterations × s_ref + p_ref
    n_m = floor((multiplier × B − p_m) / s_m)

Calibration files (written by :func:`write_calibration`, read by everything else through this module):

* ``calibration.json``: the whole table (``methods``: one entry per method; ``matched``: reference, budget seconds
  and iteration counts; the header: hardware, world size, protocol, ...);
* ``calibration/`` beside it: ``budget.json`` (reference, budget seconds, world size) and one ``<method>.json`` per
  method, the files DVC stages depend on (a method's training stage reruns only when its own entry changes).

``calibrate`` (the measurement), ``train/budget`` (a calibrated run's iterations), ``plan`` (the pipeline's cost
before it runs), ``analysis/results`` (``calibration.csv``) and the report pages call it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdrepro.errors import ConfigError

#: The phases of one training iteration, as the training loop times them and the calibration records them
#: (``phase_median_seconds``).
PHASES = ("data", "teacher", "student", "distill", "backward", "optimizer", "method_step")

Entry = Mapping[str, Any]


def whole_iterations(seconds: float, seconds_per_iteration: float) -> int:
    """``floor(seconds / seconds_per_iteration)``, robust to float round-off (100 × 0.4 / 0.4 is 100, not 99)."""
    return math.floor(seconds / seconds_per_iteration + 1e-9)


def reference_method(methods: Mapping[str, Entry], configured: str | None = None) -> str:
    """The method that sets the budget: ``configured`` (``calibrate.reference_method``), else the slowest per
    iteration; a one-line error if ``configured`` was not calibrated."""
    if configured is None:
        return max(methods, key=lambda name: float(methods[name]["seconds_per_iteration"]))
    if configured not in methods:
        raise ConfigError(f"calibrate.reference_method {configured!r} is not among the calibrated methods {sorted(methods)}")
    return configured


def budget_seconds(reference: Entry, reference_iterations: int) -> float:
    """``B = reference_iterations × s_ref + p_ref``: what the reference method costs at the reference schedule."""
    return reference_iterations * float(reference["seconds_per_iteration"]) + float(reference.get("pretrain_seconds") or 0.0)


def iterations_within(seconds: float, entry: Entry) -> int:
    """``floor((seconds − p_m) / s_m)``: the whole iterations of a method that fit in ``seconds`` after its own
    pre-training stage (negative when even the pre-training does not fit)."""
    return whole_iterations(seconds - float(entry.get("pretrain_seconds") or 0.0), float(entry["seconds_per_iteration"]))


def matched_iterations(
    methods: Mapping[str, Entry], reference_iterations: int, configured_reference: str | None = None
) -> dict[str, Any]:
    """The ``matched`` section of a calibration: reference, budget seconds, each method's iteration count (and the
    FLOP-matched counts when every method has its FLOPs)."""
    if reference_iterations <= 0:
        raise ConfigError(f"reference_iterations must be positive, got {reference_iterations}")
    reference = reference_method(methods, configured_reference)
    budget = budget_seconds(methods[reference], reference_iterations)
    result: dict[str, Any] = {
        "reference_method": reference,
        "reference_iterations": reference_iterations,
        "budget_seconds": budget,
        "iterations": {name: max(iterations_within(budget, entry), 0) for name, entry in methods.items()},
    }
    if all(entry.get("flops_per_iteration") for entry in methods.values()):
        reference_flops = reference_iterations * methods[reference]["flops_per_iteration"]
        result["flop_matched_iterations"] = {
            name: whole_iterations(reference_flops, entry["flops_per_iteration"]) for name, entry in methods.items()
        }
    return result


# -- files ------------------------------------------------------------------------------------------------------------
def read_table(path: Path, fix: str = "run `kdrepro calibrate` (or the calibrate stage) first") -> dict[str, Any]:
    """A whole ``calibration.json``; a one-line error if it is missing or malformed (``fix`` says what to do)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration {path} does not exist; {fix}")
    try:
        table = json.loads(path.read_text())
        methods = table["methods"]
        if not all(float(entry["seconds_per_iteration"]) > 0 for entry in methods.values()):
            raise ValueError("a seconds_per_iteration is not positive")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"calibration {path} is malformed ({error}); re-run `kdrepro calibrate`") from error
    return table


def read_header(path: Path) -> dict[str, Any]:
    """A ``calibration.json`` without its per-method entries (hardware, matched budget, reference); {} if absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    header = json.loads(path.read_text())
    header.pop("methods", None)
    return header


def read_previous(path: Path) -> dict[str, dict[str, Any]]:
    """The fingerprinted entries of an earlier ``calibration.json`` ({} if there is none or it cannot be read)."""
    try:
        methods = json.loads(Path(path).read_text())["methods"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: entry for name, entry in methods.items() if isinstance(entry, dict) and "fingerprint" in entry}


def read_method(path: Path, method: str) -> tuple[float, int, dict[str, Any] | None, list[str]]:
    """``(budget seconds, world size measured at, the method's entry or None, the calibrated methods)`` from a
    ``calibration.json`` or the folder beside it (``budget.json`` + ``<method>.json``, what DVC stages depend on).
    Tables from before the world size was recorded count as 1."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"calibration {path} does not exist; run `kdrepro calibrate` first or set budget.calibration")
    try:
        if path.is_dir():
            budget_file = json.loads((path / "budget.json").read_text())
            entry_path = path / f"{method}.json"
            entry = json.loads(entry_path.read_text()) if entry_path.is_file() else None
            known = sorted(p.stem for p in path.glob("*.json") if p.stem != "budget")
            return float(budget_file["budget_seconds"]), int(budget_file.get("world_size", 1)), entry, known
        table = json.loads(path.read_text())
        methods = table["methods"]
        budget = float(table["matched"]["budget_seconds"])
        return budget, int(table.get("world_size", 1)), methods.get(method), sorted(methods)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"calibration {path} is malformed or incomplete ({error}); re-run `kdrepro calibrate`") from error


def write_calibration(output: Path, table: dict[str, Any], default: Any = None) -> None:
    """Write ``table`` to ``output`` (``calibration.json``) and the per-method folder beside it: ``budget.json``
    (with the world size it was measured at) and one ``<method>.json`` per method, stale files of dropped methods
    removed; a file whose content is unchanged keeps its bytes, so DVC sees no change in it. ``default`` serialises
    what JSON cannot (as :func:`json.dumps`)."""
    from kdrepro.io import write_text_atomic  # torch stays out of the report kernels, which read these files

    output = Path(output)
    write_text_atomic(output, json.dumps(table, indent=2, default=default) + "\n")
    matched, folder = table["matched"], output.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    files = {"budget": {key: matched[key] for key in ("reference_method", "reference_iterations", "budget_seconds")}}
    files["budget"]["world_size"] = table.get("world_size", 1)
    files.update(table["methods"])
    for stale in folder.glob("*.json"):
        if stale.stem not in files:
            stale.unlink()
    for name, data in files.items():
        path = folder / f"{name}.json"
        text = json.dumps(data, indent=2, sort_keys=True, default=default) + "\n"
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)
