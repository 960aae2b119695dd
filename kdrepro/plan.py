"""``kdrepro plan``: what the whole pipeline will cost, before it runs, from a calibration measured on your hardware.

Every training stage is an iteration budget, so its cost is ``iterations × seconds/iteration`` (+ the method's
pre-training stage, e.g. MasKD's tokens), with seconds/iteration from ``kdrepro calibrate`` (the median of the
interleaved rounds, at the world size it was measured with) and the compute-matched counts from
:mod:`kdrepro.pipeline.matching`:

* once per pipeline: the backbones' pre-training where the profile trains them (the embedded profiles' stand-in for
  ImageNet; copying ImageNet weights is free), the teacher (imported: free; trained: ``teacher_iterations`` × an
  estimate from FLOPs, since the teacher's training step is not calibrated) and the calibration itself;
* per seed: the student alone and every method at the reference schedule (``iter_matched``) and at the matched budget
  (``compute_matched``); the extended runs (the student alone, kd, fitnet and the best segmentation-specific method,
  chosen at run time from the results: priced as the *most expensive* segmentation-specific method per iteration,
  which only matters for memory and rounding, since a compute-matched run costs its budget whatever the method).

Totals per seed and for all seeds, with and without the extended runs, in hours and GPU-hours (hours × processes),
each method's peak memory against the device's, and the iteration-matched protocol at the paper's schedule (80k
iterations on Cityscapes, 160k on ADE20K, for every method) beside the compute-matched one. Not included: evaluation,
checkpointing, process start-up and data preparation (minutes per stage, not hours).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from kdrepro.analysis.methods import CANONICAL, STUDENT_ALONE, method_info
from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import budget_seconds, iterations_within, read_table, reference_method

#: The paper's (and mmsegmentation's) schedules: the iteration-matched protocol trains every method this long.
PAPER_ITERATIONS = {"cityscapes": 80_000, "ade20k": 160_000}
HOUR = 3600.0


def _run(stage: str, method: str, iterations: int, entry: dict[str, Any], per: str, note: str = "") -> dict[str, Any]:
    seconds_per_iteration = float(entry["seconds_per_iteration"])
    pretrain = float(entry.get("pretrain_seconds") or 0.0)
    return {"stage": stage, "method": method, "per": per, "iterations": int(iterations),
            "seconds_per_iteration": seconds_per_iteration, "pretrain_seconds": pretrain,
            "seconds": iterations * seconds_per_iteration + pretrain, "note": note}  # fmt: skip


def matched_runs(stage: str, names: list[str], methods: dict, budget: float, per: str = "seed") -> list[dict[str, Any]]:
    """One run per method at ``budget`` seconds: ``(budget − pre-training) / seconds per iteration`` iterations."""
    rows = []
    for name in names:
        rows.append(_run(stage, name, max(iterations_within(budget, methods[name]), 0), methods[name], per))
    return rows


def best_specific(kd_methods: list[str], methods: dict, plugins: list[str]) -> tuple[str | None, str]:
    """The segmentation-specific method to price the extended slot with (the most expensive per iteration)."""
    specific = [name for name in kd_methods if method_info(name, plugins).get("family") == "segmentation_specific"]
    if not specific:
        return None, "no segmentation-specific method in methods: the extended runs are priced without one"
    name = max(specific, key=lambda m: float(methods[m]["seconds_per_iteration"]))
    return name, (f"the extended segmentation-specific method is chosen from the results at run time; priced as {name}, "
                  f"the most expensive segmentation-specific method per iteration")  # fmt: skip


def teacher_flop_ratio(methods: dict) -> float | None:
    """How many times the student alone's training step the teacher's costs, from the calibrated FLOPs (training
    FLOPs ≈ 3 × forward; kd − none ≈ the teacher's forward, none ≈ 3 × the student's forward); None without them."""
    none, kd = methods.get("none", {}), methods.get("kd", {})
    if not (none.get("flops_per_iteration") and kd.get("flops_per_iteration")):
        return None
    return 3.0 * (kd["flops_per_iteration"] - none["flops_per_iteration"]) / none["flops_per_iteration"]


def teacher_run(cfg: DictConfig, methods: dict) -> tuple[dict[str, Any], str]:
    """The teacher stage: free when imported, else an estimate from FLOPs (its training step is not calibrated)."""
    iterations = int(cfg.teacher_iterations)
    if cfg.get("teacher_import"):
        return _run("teacher", str(cfg.teacher.name), 0, {"seconds_per_iteration": 0.0}, "pipeline", "imported"), ""
    ratio = teacher_flop_ratio(methods)
    if ratio is None:
        row = _run("teacher", str(cfg.teacher.name), iterations, {"seconds_per_iteration": 0.0}, "pipeline", "not priced")
        return row, "teacher training is not priced: calibrate none and kd (their FLOPs give the estimate)"
    entry = {"seconds_per_iteration": float(methods["none"]["seconds_per_iteration"]) * ratio}
    note = "estimate: student-alone s/it × teacher/student training FLOPs"
    return _run("teacher", str(cfg.teacher.name), iterations, entry, "pipeline", note), (
        f"teacher training is estimated from FLOPs ({ratio:.1f}× the student alone per iteration), not timed; "
        "set teacher_import to an mmsegmentation checkpoint to skip it")  # fmt: skip


def pretrain_runs(cfg: DictConfig, methods: dict) -> list[dict[str, Any]]:
    """The pretrain stage where it trains the backbones (the embedded profiles' stand-in for ImageNet; copying
    ImageNet weights is free): the student's pre-training at the student alone's calibrated cost per iteration,
    the teacher's at the FLOP estimate of :func:`teacher_flop_ratio` (the pre-training head differs in its number
    of classes only, a negligible share of the step); an imported teacher needs none."""
    from kdrepro.train.pretrain import iterations

    if "none" not in methods:
        return []
    student = float(methods["none"]["seconds_per_iteration"])
    ratio = teacher_flop_ratio(methods)
    rows = []
    if iterations(cfg, "student") > 0:
        rows.append(_run("pretrain", f"{cfg.student.name} backbone", iterations(cfg, "student"),
                         {"seconds_per_iteration": student}, "pipeline", "estimate: the student alone's s/it"))
    if iterations(cfg, "teacher") > 0 and ratio is not None and not cfg.get("teacher_import"):
        rows.append(_run("pretrain", f"{cfg.teacher.name} backbone", iterations(cfg, "teacher"),
                         {"seconds_per_iteration": student * ratio}, "pipeline", "estimate from FLOPs, as the teacher"))
    return rows


def calibration_run(cfg: DictConfig, names: list[str], methods: dict) -> dict[str, Any]:
    """The calibrate stage: warm-up + timed rounds + one FLOP-counting step per method."""
    settings = cfg.calibrate
    iterations = int(settings.warmup) + int(settings.rounds) * int(settings.iterations_per_round) + 1
    seconds = sum(iterations * float(methods[n]["seconds_per_iteration"]) for n in names)
    return {"stage": "calibrate", "method": f"{len(names)} methods", "per": "pipeline", "iterations": iterations * len(names),
            "seconds_per_iteration": seconds / (iterations * len(names)), "pretrain_seconds": 0.0, "seconds": seconds,
            "note": f"{iterations} iterations per method"}  # fmt: skip


def protocol_costs(names: list[str], methods: dict, reference_iterations: int, reference: str) -> dict[str, float]:
    """Seconds per seed of training every method (the student alone included) under each protocol."""
    iteration = sum(_run("", n, reference_iterations, methods[n], "seed")["seconds"] for n in names)
    budget = budget_seconds(methods[reference], reference_iterations)
    compute = sum(row["seconds"] for row in matched_runs("", names, methods, budget))
    return {"reference_iterations": reference_iterations, "iteration_matched_seconds": iteration,
            "compute_matched_seconds": compute, "budget_seconds": budget}  # fmt: skip


def build_plan(cfg: DictConfig, table: dict[str, Any], multipliers: list[float]) -> dict[str, Any]:
    """The plan of ``cfg``'s pipeline (profile, seeds, methods, calibrate.*) priced with ``table``."""
    methods = table["methods"]
    names = list(dict.fromkeys(["none", *cfg.calibrate.methods]))
    missing = [name for name in names if name not in methods]
    if missing:
        raise ConfigError(f"the calibration has no entry for {missing}; add them to methods and re-run `kdrepro calibrate`")
    kd_methods = [name for name in names if name != "none"]
    plugins = list(cfg.get("plugins") or [])
    reference = reference_method({name: methods[name] for name in names}, cfg.calibrate.get("reference_method") or None)
    reference_iterations = int(cfg.reference_iterations)
    budget = budget_seconds(methods[reference], reference_iterations)
    seeds = [int(s) for s in (cfg.get("seeds") or [cfg.seed])]
    world_size = int(table.get("world_size", 1))
    teacher, teacher_note = teacher_run(cfg, methods)
    best, best_note = best_specific(kd_methods, methods, plugins)
    rows = [*pretrain_runs(cfg, methods), teacher, calibration_run(cfg, names, methods)]
    rows += [_run("iter_matched", n, reference_iterations, methods[n], "seed") for n in names]
    rows += matched_runs("compute_matched", names, methods, budget)
    extended_names = [n for n in (STUDENT_ALONE, *CANONICAL, best) if n is not None and n in methods]
    for multiplier in multipliers:
        rows += matched_runs(f"extended ×{multiplier:g}", extended_names, methods, multiplier * budget)
    if best is not None:
        for row in rows:
            if row["stage"].startswith("extended") and row["method"] == best:
                row["note"] = "best segmentation-specific, priced as the most expensive"
    totals = _totals(rows, len(seeds), world_size)
    paper = PAPER_ITERATIONS.get(str(table.get("dataset", cfg.dataset.name)))
    protocols = {"pipeline": protocol_costs(names, methods, reference_iterations, reference)}
    if paper is not None and paper != reference_iterations:
        protocols["paper"] = protocol_costs(names, methods, paper, reference)
    for entry in protocols.values():
        for key in ("iteration_matched", "compute_matched"):
            entry[f"{key}_hours_all_seeds"] = entry[f"{key}_seconds"] * len(seeds) / HOUR
            entry[f"{key}_gpu_hours_all_seeds"] = entry[f"{key}_hours_all_seeds"] * world_size
    notes = [n for n in (teacher_note, best_note) if n]
    notes.append("not included: evaluation, checkpoints, process start-up and data preparation")
    if table.get("process_peak_rss_bytes") and not any(row["peak_memory_bytes"] for row in memory_rows(names, table)):
        notes.append(f"no per-method peak memory on this device (CPU); the calibration process, every method and the "
                     f"teacher at once, peaked at {_gib(table['process_peak_rss_bytes'])} of {_gib(table.get('device_memory_bytes'))}")  # fmt: skip
    return {
        "profile": str(cfg.profile_name), "dataset": table.get("dataset"), "hardware": table.get("hardware"),
        "world_size": world_size, "seeds": seeds, "methods": kd_methods, "reference_method": reference,
        "reference_iterations": reference_iterations, "budget_seconds": budget, "multipliers": multipliers,
        "extended_best_specific": best, "stages": rows, "totals": totals, "protocols": protocols,
        "memory": memory_rows(names, table), "notes": notes,
    }  # fmt: skip


def _totals(rows: list[dict[str, Any]], seeds: int, world_size: int) -> dict[str, Any]:
    once = sum(r["seconds"] for r in rows if r["per"] == "pipeline")
    core = sum(r["seconds"] for r in rows if r["per"] == "seed" and not r["stage"].startswith("extended"))
    extended = sum(r["seconds"] for r in rows if r["stage"].startswith("extended"))
    seconds = {"once": once, "per_seed_without_extended": core, "per_seed_with_extended": core + extended,
               "all_seeds_without_extended": once + seeds * core,
               "all_seeds_with_extended": once + seeds * (core + extended)}  # fmt: skip
    return {key: {"seconds": value, "hours": value / HOUR, "gpu_hours": value / HOUR * world_size} for key, value in seconds.items()}


def memory_rows(names: list[str], table: dict[str, Any]) -> list[dict[str, Any]]:
    """Each method's measured peak memory against the device's (GPU: per process; CPU: not measured per method)."""
    device_memory = table.get("device_memory_bytes")
    rows = []
    for name in names:
        peak = table["methods"][name].get("peak_memory_bytes")
        fraction = peak / device_memory if peak and device_memory else None
        rows.append({"method": name, "peak_memory_bytes": peak, "device_memory_bytes": device_memory, "fraction": fraction,
                     "fits": None if fraction is None else fraction <= 1.0})  # fmt: skip
    return rows


def extended_multipliers(cfg: DictConfig) -> list[float]:
    """``plan.multipliers``, else ``extended.multipliers`` of the ``plan.params`` file (none if it is missing)."""
    values = cfg.plan.get("multipliers")
    path = Path(str(cfg.plan.params))
    if values is None and path.is_file():
        try:
            values = ((yaml.safe_load(path.read_text()) or {}).get("extended") or {}).get("multipliers") or []
        except (yaml.YAMLError, AttributeError) as error:
            raise ConfigError(f"{path}: cannot read extended.multipliers ({' '.join(str(error).split())[:120]}); fix the file") from error
    try:
        multipliers = [float(m) for m in values or []]
    except (TypeError, ValueError):
        multipliers = [-1.0]
    if any(m <= 0 for m in multipliers):
        raise ConfigError(f"extended multipliers must be positive numbers, got {list(values or [])}; fix plan.multipliers or {path}")
    return multipliers


def write_plan(cfg: DictConfig) -> tuple[dict[str, Any], str, Path]:
    """Build the plan of ``cfg`` (a ``plan`` config), write ``plan.json`` and ``plan.md``; return both and the path."""
    calibration = Path(str(cfg.plan.calibration or Path("runs") / str(cfg.profile_name) / "calibration.json"))
    table = read_table(calibration, "run `kdrepro calibrate` (or the calibrate stage) first, or set plan.calibration")
    plan = build_plan(cfg, table, extended_multipliers(cfg))
    plan["calibration"] = str(calibration)
    text = markdown(plan)
    output = Path(str(cfg.plan.output or calibration.parent / "plan.json"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(plan, indent=2) + "\n")
    output.with_suffix(".md").write_text(text)
    return plan, text, output


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``12.34 h``."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < HOUR:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / HOUR:,.2f} h"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _gib(value: float | None) -> str:
    return "not measured" if value is None else f"{value / 2**30:.2f} GiB"


def markdown(plan: dict[str, Any]) -> str:
    """The plan as markdown tables (what ``kdrepro plan`` prints and writes to ``plan.md``)."""
    seeds, world = len(plan["seeds"]), plan["world_size"]
    hardware = plan.get("hardware") or {}
    lines = [
        f"# Cost plan: profile {plan['profile']} ({plan['dataset']})", "",
        f"Calibration {plan.get('calibration', '')}: {hardware.get('gpu') or hardware.get('cpu') or hardware.get('device')}, "
        f"{world} process(es); seeds {plan['seeds']}; compute-matched budget = {plan['reference_method']} × "
        f"{plan['reference_iterations']:,} iterations = {duration(plan['budget_seconds'])} per run; "
        f"extended × {', '.join(f'{m:g}' for m in plan['multipliers']) or 'none'}.", "",
        "| stage | method | runs | iterations | s / iteration | time per run | time, all runs |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in plan["stages"]:
        runs = 1 if row["per"] == "pipeline" else seeds
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['stage']} | {row['method']}{note} | {runs} | {row['iterations']:,} | {row['seconds_per_iteration']:.4g} "
                     f"| {duration(row['seconds'])} | {duration(row['seconds'] * runs)} |")  # fmt: skip
    labels = {"once": "once per pipeline (pre-training, teacher, calibration)", "per_seed_without_extended": "per seed, without extended",
              "per_seed_with_extended": "per seed, with extended", "all_seeds_without_extended": f"all {seeds} seeds, without extended",
              "all_seeds_with_extended": f"all {seeds} seeds, with extended"}  # fmt: skip
    lines += ["", f"| total | time | GPU-hours (× {world} processes) |", "|---|---|---|"]
    lines += [f"| {labels[k]} | {duration(v['seconds'])} | {_number(v['gpu_hours'])} |" for k, v in plan["totals"].items()]
    lines += ["", f"| protocol (every method and the student alone, {seeds} seeds) | iterations per method | time | GPU-hours |",
              "|---|---|---|---|"]  # fmt: skip
    same = "" if "paper" in plan["protocols"] or plan["dataset"] not in PAPER_ITERATIONS else " = the paper's schedule"
    for key, entry in plan["protocols"].items():
        where = "paper schedule" if key == "paper" else f"this pipeline{same}"
        lines.append(f"| iteration-matched, {where} | {entry['reference_iterations']:,} | "
                     f"{duration(entry['iteration_matched_seconds'] * seeds)} | {_number(entry['iteration_matched_gpu_hours_all_seeds'])} |")
        lines.append(f"| compute-matched, {where} | budget {duration(entry['budget_seconds'])} | "
                     f"{duration(entry['compute_matched_seconds'] * seeds)} | {_number(entry['compute_matched_gpu_hours_all_seeds'])} |")  # fmt: skip
    lines += ["", "| method | peak memory | device memory | share | fits |", "|---|---|---|---|---|"]
    for row in plan["memory"]:
        share = "" if row["fraction"] is None else f"{100 * row['fraction']:.0f} %"
        fits = "" if row["fits"] is None else ("yes" if row["fits"] else "**no**")
        lines.append(f"| {row['method']} | {_gib(row['peak_memory_bytes'])} | {_gib(row['device_memory_bytes'])} | {share} | {fits} |")
    lines += ["", *(f"- {note}" for note in plan["notes"])]
    return "\n".join(lines) + "\n"
