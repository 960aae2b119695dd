"""``kdrepro calibrate``: measure each method's cost per training iteration on this hardware, then match budgets.

Protocol: every method is built (one shared frozen teacher), warmed up, then timed in interleaved rounds
``A B C, B C A, C A B, ...`` of a few iterations each, with real data, by the *same* code the training loop runs
(:meth:`Trainer.timed_step`). Machine drift (up to ~25 % over half an hour on the 2-core CPUs) therefore hits every
method alike, and the median over all timed iterations is robust to stragglers. A method's pre-training stage (e.g.
MasKD's mask tokens) is timed too and charged once, as ``pretrain_seconds``.

The matched budget and every method's iteration count follow :mod:`kdrepro.pipeline.matching` (the reference choice
-- the slowest method by default, so no method trains below the standard schedule --, the formula, and the files:
``calibrate.output`` = ``calibration.json`` and the per-method folder beside it that DVC stages depend on).
FLOP-matched iteration counts (from ``torch.utils.flop_counter`` on one full training step) are written beside them
as an alternative.

**Incremental re-calibration** (``calibrate.incremental``, default on): every entry carries a fingerprint of what
sets its cost (the method's config, models, data shapes, precision, device, threads, protocol, kdrepro's model /
method / training code). When the previous table exists, only methods whose fingerprint changed (or that are new)
are measured, interleaved with the *anchor* (the previous reference method); their times are rescaled by
``previous anchor seconds / anchor seconds now``, so drift between the two sessions cancels. Unchanged entries are
kept byte for byte. If the anchor itself changed, or ``calibrate.incremental=false``, everything is re-measured.
The anchor is measured even when nothing changed (a forced ``dvc repro -f -s calibrate``), and its drift decides
whether the reused entries still hold (``calibrate.max_anchor_drift``, 10 %; :func:`anchor_drift`): other load makes
every method dearer alike, which no check within one session sees, so an anchor now cheaper by more than that means
the old table was measured under load and everything is measured again; an anchor now dearer keeps the old table
and says how to measure everything again. The table records the drift (``anchor_drift``).

**The clock** (``calibrate.clock``): on GPUs, synchronised wall time (the phases by CUDA events). On CPUs
(``auto``), the CPU time of the calibrating process, summed over its compute threads: another process on the
machine takes cores away, which stretches wall time (and, with two threads on two cores, stalls every OpenMP
barrier on the descheduled thread), but barely changes the CPU time an iteration needs. ``kdrepro calibrate`` sets
``OMP_WAIT_POLICY=PASSIVE`` before torch loads (:func:`kdrepro.cli.passive_openmp`), so threads waiting at a barrier sleep
instead of spinning and their waiting is not counted as work. The medians are expressed in wall-clock seconds by one
factor common to every method (pooled wall / CPU time of all timed iterations, each entry's ``wall_per_cpu``),
so budgets keep their unit and the matched iteration counts depend on the CPU-time ratios alone.

**Disturbed measurements** are re-measured before any budget is derived. A method is disturbed when its timed
iterations spread by more than ``calibrate.max_spread`` (IQR over median; 0.5 by default, where 12 samples per
method on an idle 2-core machine spread by 3–24 %), or when its time per FLOP is more than
``calibrate.max_flop_deviation`` times the methods' median time per FLOP (a cross-check of time ratios against FLOP
ratios: methods whose FLOPs per iteration are nearly equal cannot differ 20-fold in time). Only the dear side is a
sign of load: a method can be cheaper than its FLOPs say (SKD's discriminator and AFDCD's big convolutions run at
0.1–0.2 of the median time per FLOP at the smoke size, where the student's small kernels are overhead-bound). Those methods
are measured again, interleaved with an undisturbed anchor, up to ``calibrate.remeasure`` times; a measurement that
stays disturbed stops the calibration with one line naming the method and the cause, and no table is written (the
previous one stays). A previous table's ``disturbed`` entries are re-measured instead of reused.

**Under torchrun** (``torchrun --nproc_per_node=N -m kdrepro calibrate ...``) every rank builds the same trainers
(DDP students, each rank on its slice of the global batch, exactly as ``kdrepro train`` under torchrun) and runs the
same rounds in lockstep, with a barrier around every timed block; each iteration's timings are reduced to their
maximum over ranks (the pace of a DDP run is its slowest rank's; see :func:`_measure`), FLOPs are summed over ranks,
and rank 0 writes the files. The table and ``budget.json`` record ``world_size``; a compute-matched run under another
number of processes is refused unless ``budget.allow_world_size_mismatch=true`` (:mod:`kdrepro.train.budget`), since
DDP's communication is part of every iteration's cost. They record ``device_type`` too (the GPU's name, or the CPU's
model): a compute-matched run on another device type is refused unless ``budget.allow_device_type_mismatch=true``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from kdrepro.config import check_calibrate, plugin_sources
from kdrepro.data import build_dataset
from kdrepro.data.loader import training_loader
from kdrepro.distributed import (
    DistributedContext,
    barrier,
    check_global_batch,
    setup_device,
    shard,
)
from kdrepro.errors import ConfigError
from kdrepro.pipeline.matching import PHASES, matched_iterations, read_previous, write_calibration
from kdrepro.train.budget import device_type
from kdrepro.train.calibrate_ranks import (
    device_memory_bytes,
    from_rank_zero,
    peak_rss_bytes,
    reduce_over_ranks,
    resident_bytes,
    slowest_rank_history,
)
from kdrepro.train.calibration_check import SETTING_KEY, measured_setting
from kdrepro.train.effects import cost_view
from kdrepro.train.progress import Progress
from kdrepro.train.timing import synchronize
from kdrepro.train.trainer import Trainer, load_teacher, method_uses_teacher

log = logging.getLogger("kdrepro.calibrate")


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """Round ``r`` starts with method ``r mod n`` (A B C, B C A, C A B, ...)."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


class AtenFlopCounter(TorchDispatchMode):
    """Counts FLOPs of every aten op with a formula in ``torch.utils.flop_counter``'s registry.

    ``FlopCounterMode`` itself also tracks modules with autograd hooks, which breaks double backward
    (``autograd.grad(create_graph=True)``, e.g. SKD's WGAN-GP gradient penalty); counting at the dispatch level
    sees the same ops without those hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        #: FLOPs per training-step phase (:data:`kdrepro.pipeline.matching.PHASES`) when :func:`step_flops` counts
        self.by_phase: dict[str, int] = {}
        self.phase = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            self.by_phase[self.phase] = self.by_phase.get(self.phase, 0) + flops
        return out


class _PhaseTagger:
    """Stands in for a trainer's :class:`~kdrepro.train.timing.PhaseTimer` while FLOPs are counted: each phase of
    :meth:`Trainer.step` tags the FLOPs counted inside it (and no time is recorded)."""

    def __init__(self, counter: AtenFlopCounter) -> None:
        self.counter = counter

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.counter.phase = self.counter.phase, name
        try:
            yield
        finally:
            self.counter.phase = previous


def step_flops(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, progress: float = 0.0) -> AtenFlopCounter:
    """Count one full training step (teacher forward, student forward + backward, KD terms, the method's extra step)
    of ``trainer`` on ``images`` / ``labels`` (this process's batch, already on the trainer's device, which may be
    ``meta``). The counter's ``total`` is the FLOPs, ``by_phase`` their split over the step's phases. The step
    really runs: the student, the method's modules and their optimisers are updated once."""
    counter = AtenFlopCounter()
    timer = trainer.timer
    trainer.teacher_grad_context = torch.no_grad  # inference mode would bypass the counter (see Trainer)
    trainer.timer = _PhaseTagger(counter)  # type: ignore[assignment]
    try:
        with counter:
            trainer.step(images, labels, progress=progress)
    finally:
        trainer.teacher_grad_context = torch.inference_mode
        trainer.timer = timer
    return counter


def _flops_per_iteration(trainer: Trainer, batches) -> int:
    """FLOPs of one full training step (:func:`step_flops`) on the global batch: under torchrun each rank counts
    its slice and the counts are summed."""
    images, labels = next(batches)
    images, labels = trainer.to_device(shard(images, trainer.context), shard(labels, trainer.context))
    return int(reduce_over_ranks(step_flops(trainer, images, labels).total, trainer.context, trainer.device, "sum"))


def _progress(cfg: DictConfig, total: int, context: DistributedContext) -> Progress:
    """The timed iterations' progress (rank 0): a line every ``progress.every_seconds`` when not on a terminal."""
    settings = cfg.get("progress") or {}
    return Progress("calibrate", total, "", every_seconds=float(settings.get("every_seconds", 30)), enabled=context.is_main)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * (len(ordered) - 1) + 0.5), len(ordered) - 1)]


def calibrate(base_cfg: DictConfig, method_cfg: Callable[[str], DictConfig]) -> dict[str, Any]:
    """Measure every method in ``base_cfg.calibrate.methods``; ``method_cfg(name)`` composes that method's config."""
    settings = base_cfg.calibrate
    check_calibrate(settings)
    names = list(settings.methods)
    if base_cfg.get("threads"):
        torch.set_num_threads(int(base_cfg.threads))
    context, device = setup_device(str(base_cfg.device))
    check_global_batch(int(base_cfg.loader.batch_size), context)
    torch.manual_seed(int(base_cfg.seed))
    configs = {name: method_cfg(name) for name in names}
    fingerprints = {name: fingerprint(cfg, device, context.world_size) for name, cfg in configs.items()}
    output = Path(str(settings.output))
    previous = read_previous(output) if settings.get("incremental", True) else {}
    previous = from_rank_zero(previous, context)  # every rank measures the same methods, in the same order
    max_spread = settings.get("max_spread")
    kept, anchor = _reusable(previous, fingerprints, settings.get("reference_method"), max_spread)
    to_measure = [name for name in names if name not in kept]
    if anchor is not None and anchor not in to_measure:
        to_measure.append(anchor)  # measured even when nothing changed: its drift tells whether the reused entries hold
    if kept:
        log.info("unchanged since the last calibration: %s; measuring %s against them", ", ".join(kept), ", ".join(to_measure))

    measure = functools.partial(_measure, base_cfg, device=device, context=context)
    measured = _undisturbed(measure, {name: configs[name] for name in to_measure}, previous, kept, settings)
    drift = anchor_drift(previous, measured, anchor, settings.get("max_anchor_drift"), output)
    if drift and drift["remeasure_all"]:
        log.warning("%s", drift["message"])
        kept, anchor = [], None
        measured = _undisturbed(measure, configs, previous, kept, settings)
    elif drift and drift["message"]:
        log.warning("%s", drift["message"])
    methods: dict[str, dict[str, Any]] = {}
    scale = previous[anchor]["seconds_per_iteration"] / measured[anchor]["seconds_per_iteration"] if kept and anchor in measured else None
    for name in names:
        if name in kept:
            methods[name] = previous[name]
            continue
        entry = _rescaled(measured[name], scale, anchor) if scale is not None else measured[name]
        methods[name] = {**entry, "fingerprint": fingerprints[name]}
    matched = matched_iterations(methods, int(base_cfg.reference_iterations), settings.get("reference_method"))
    uses_teacher = any(method_uses_teacher(c.method) for c in configs.values())
    setting = measured_setting(base_cfg, device.type, context.world_size, uses_teacher)
    table = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(base_cfg.dataset.name),
        "student": str(base_cfg.student.name),
        "teacher": str(base_cfg.teacher.name) if uses_teacher else None,
        "teacher_weights": (str(base_cfg.teacher_checkpoint) if base_cfg.get("teacher_checkpoint") else "initial")
        if uses_teacher else None,
        "batch_size": int(base_cfg.loader.batch_size),
        "crop_size": list(base_cfg.dataset.crop_size),
        "precision": str(base_cfg.get("precision", "fp32")),
        "speed": OmegaConf.to_container(base_cfg.speed.choice) if base_cfg.get("speed", {}).get("choice") else None,
        "hardware": _hardware(device, context.world_size),
        "world_size": context.world_size,
        "device_type": device_type(device),
        "device_memory_bytes": device_memory_bytes(device),
        "process_peak_rss_bytes": peak_rss_bytes(),
        "protocol": {key: settings[key] for key in ("warmup", "rounds", "iterations_per_round")},
        "clock": {"kind": clock_kind(settings, device), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "reused": sorted(kept),
        "anchor_drift": drift,
        "max_spread": max_spread,
        "max_flop_deviation": settings.get("max_flop_deviation"),
        "remeasured": {name: entry["remeasured"] for name, entry in measured.items() if entry.get("remeasured")},
        "disturbed": disturbed(methods, max_spread),
        "methods": methods,
        "matched": matched,
        SETTING_KEY: setting,
    }
    if context.is_main:
        for name, spread in table["disturbed"].items():
            log.warning(
                "%s's iteration times varied by %.0f %% (IQR / median > %.0f %%): the machine was busy while it was "
                "measured, so the matched budgets may be off; run the calibration again on an idle machine (`dvc "
                "repro -f -s calibrate`, or `kdrepro calibrate`): it re-measures disturbed entries instead of reusing "
                "them", name, 100 * spread, 100 * max_spread)
        write_calibration(output, table, default=_json_default)
    barrier(context)  # no rank returns before the files exist
    return table


def _measure(
    base_cfg: DictConfig, configs: dict[str, DictConfig], device: torch.device, context: DistributedContext
) -> dict[str, dict[str, Any]]:
    """Interleaved timing of ``configs`` (one shared teacher, real data): one entry per method.

    Under torchrun every rank runs the same rounds in lockstep on its slice of the global batch, as training does
    (DDP student, gradient all-reduce in every backward). Each timed block starts and ends with a barrier. A DDP
    iteration ends when its slowest rank does (the next all-reduce waits for it), so a training run advances at the
    pace of the slowest rank: each iteration's timings are reduced with the *max over ranks* before the medians.
    Rank 0's own clock would hide a straggler (e.g. a GPU sharing its PCIe switch or a slower CPU socket).
    """
    settings = base_cfg.calibrate
    names = list(configs)
    num_classes = int(base_cfg.dataset.num_classes)
    teacher = None
    if any(method_uses_teacher(cfg.method) for cfg in configs.values()):
        teacher = load_teacher(base_cfg, num_classes, device, untrained=True)  # without a checkpoint: initial weights
    trainers = {name: Trainer(cfg, device, teacher, context=context) for name, cfg in configs.items()}
    train_set = build_dataset(base_cfg.dataset, "train", train_transforms=True)
    batches = iter(
        training_loader(train_set, int(base_cfg.loader.batch_size), int(base_cfg.seed), 0, int(base_cfg.loader.num_workers))
    )

    for name in names:  # warm-up first: one-off costs (kernel selection, JIT, allocator growth) are not the method's
        for _ in range(int(settings.warmup)):
            trainers[name].timed_step(batches, 0.0)
        trainers[name].timer.history.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    barrier(context)
    pretrain_seconds = {name: _time_pretrain(trainer, batches, int(settings.iterations_per_round)) for name, trainer in trainers.items()}
    peak_memory: dict[str, int | None] = dict.fromkeys(names)
    own_bytes = {name: resident_bytes(trainer) for name, trainer in trainers.items()}
    shown = _progress(base_cfg, len(names) * int(settings.rounds) * int(settings.iterations_per_round), context)
    for round_index in range(int(settings.rounds)):
        for name in rotated_order(names, round_index):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            barrier(context)
            shown.label = f"{name}, round {round_index + 1}/{int(settings.rounds)}"
            for _ in range(int(settings.iterations_per_round)):
                result, _ = trainers[name].timed_step(batches, 0.0)
                shown.update(loss=result.total)
            barrier(context)
            if device.type == "cuda":  # as if the method trained alone: the other methods' models and banks stay out
                alone = torch.cuda.max_memory_allocated(device) - resident + own_bytes[name]
                peak_memory[name] = max(peak_memory[name] or 0, alone)
        log.info("calibration round %d/%d done", round_index + 1, int(settings.rounds))
    shown.close()

    histories = {name: slowest_rank_history(trainer.timer.history, context, device) for name, trainer in trainers.items()}
    key, scale = clock_key(settings, device), wall_per_clock(histories, settings, device)
    methods: dict[str, dict[str, Any]] = {}
    for name, trainer in trainers.items():
        history = histories[name]
        totals = [record[key] * scale for record in history]
        median = statistics.median(totals)
        distiller = trainer.distiller
        methods[name] = {
            "seconds_per_iteration": median,
            "p25_seconds": _quantile(totals, 0.25),
            "p75_seconds": _quantile(totals, 0.75),
            "relative_spread": (_quantile(totals, 0.75) - _quantile(totals, 0.25)) / median,
            "wall_seconds_per_iteration": statistics.median(record["total"] for record in history),
            "cpu_seconds_per_iteration": statistics.median(record["cpu"] for record in history),
            "wall_per_cpu": scale if key == "cpu" else None,
            "samples": len(totals),
            "phase_median_seconds": {phase: statistics.median(r[phase] for r in history) for phase in PHASES},
            "pretrain_iterations": distiller.pretrain_iterations,
            "pretrain_seconds": reduce_over_ranks(pretrain_seconds[name], context, device, "max"),
            "peak_memory_bytes": None if peak_memory[name] is None else int(reduce_over_ranks(peak_memory[name], context, device, "max")),
            "flops_per_iteration": _flops_per_iteration(trainer, batches),
            "distiller_parameters": sum(p.numel() for p in distiller.parameters()),
            "distiller_buffer_bytes": sum(b.numel() * b.element_size() for b in distiller.buffers()),
            "terms": {term: dict(options or {}) for term, options in (configs[name].method.get("terms") or {}).items()},
        }
    return methods


def clock_kind(settings: DictConfig, device: torch.device) -> str:
    """``wall`` (synchronised wall time; always on GPUs) or ``cpu`` (the process's CPU time; ``auto`` on CPUs)."""
    kind = str(settings.get("clock", "auto"))
    if kind not in ("auto", "wall", "cpu"):
        raise ConfigError(f"calibrate.clock must be auto, wall or cpu, got {kind!r}")
    if device.type == "cuda" or kind == "wall":
        return "wall"
    return "cpu"


def clock_key(settings: DictConfig, device: torch.device) -> str:
    """The timing record's field the calibration's clock reads (:class:`kdrepro.train.timing.PhaseTimer`)."""
    return "cpu" if clock_kind(settings, device) == "cpu" else "total"


def wall_per_clock(histories: dict[str, list[dict[str, float]]], settings: DictConfig, device: torch.device) -> float:
    """The one factor that turns CPU seconds into wall-clock seconds for every method alike: pooled wall time over
    pooled CPU time of all timed iterations (1 for the wall clock). Common to all methods, it leaves the cost ratios,
    hence the matched iteration counts, as the CPU times give them."""
    if clock_key(settings, device) == "total":
        return 1.0
    wall = sum(record["total"] for history in histories.values() for record in history)
    cpu = sum(record["cpu"] for history in histories.values() for record in history)
    return wall / cpu if cpu > 0 else 1.0


def flop_deviations(methods: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each method's time per FLOP over the methods' (geometric) median time per FLOP: 1 where its time ratio to
    the others equals its FLOP ratio. ``{}`` when a method has no FLOP count."""
    if len(methods) < 2 or not all(entry.get("flops_per_iteration") for entry in methods.values()):
        return {}
    logs = {name: math.log(entry["seconds_per_iteration"] / entry["flops_per_iteration"]) for name, entry in methods.items()}
    centre = statistics.median(logs.values())
    return {name: math.exp(value - centre) for name, value in logs.items()}


def disturbance(methods: dict[str, dict[str, Any]], settings: DictConfig) -> dict[str, str]:
    """``{method: cause}`` for every method whose measurement looks disturbed by other load (module docstring):
    its iterations spread too much, or it took far more time than its FLOPs predict."""
    causes = {name: f"its iteration times spread by {100 * spread:.0f} % (limit {100 * float(settings.max_spread):.0f} %, "
                    "calibrate.max_spread)" for name, spread in disturbed(methods, settings.get("max_spread")).items()}
    limit = settings.get("max_flop_deviation")
    if limit is not None:
        for name, deviation in flop_deviations(methods).items():
            if name not in causes and deviation > float(limit):
                causes[name] = (f"its time per FLOP is {deviation:.2g}x the methods' median (limit {float(limit):g}x, "
                                "calibrate.max_flop_deviation)")
    return causes


def _undisturbed(
    measure: Callable[[dict[str, DictConfig]], dict[str, dict[str, Any]]],
    configs: dict[str, DictConfig],
    previous: dict[str, dict[str, Any]],
    kept: Sequence[str],
    settings: DictConfig,
) -> dict[str, dict[str, Any]]:
    """``measure(configs)``, with disturbed methods (:func:`disturbance`) measured again, interleaved with an
    undisturbed anchor whose two measurements rescale the new ones, up to ``calibrate.remeasure`` times; raises a
    one-line :class:`CalibrationDisturbed` if a method stays disturbed."""
    measured = measure(configs)
    for attempt in range(int(settings.get("remeasure", 2)) + 1):
        causes = {name: cause for name, cause in disturbance(_pooled(measured, previous, kept), settings).items()
                  if name in measured}
        if not causes:
            return measured
        if attempt == int(settings.get("remeasure", 2)):
            break
        log.warning("calibration disturbed (%s); measuring %s again (%d/%d)", "; ".join(f"{n}: {c}" for n, c in causes.items()),
                    ", ".join(causes), attempt + 1, int(settings.get("remeasure", 2)))
        measured = _remeasured(measure, configs, measured, list(causes), str(settings.get("reference_method") or ""))
    name, cause = next(iter(causes.items()))
    others = f" (and {len(causes) - 1} more method(s))" if len(causes) > 1 else ""
    raise CalibrationDisturbed(
        f"calibration stayed disturbed after {int(settings.get('remeasure', 2))} re-measurement(s): {name}: {cause}{others}; "
        "another process is using the CPU: stop it and calibrate again (`dvc repro -s calibrate`); no budget was written"
    )


def anchor_drift(previous: dict[str, dict[str, Any]], measured: dict[str, dict[str, Any]], anchor: str | None,
                 max_drift: float | None, output: Path | str = "calibration.json") -> dict[str, Any] | None:
    """How far the anchor's time per iteration moved since the table whose entries are reused (None when nothing is
    reused). Other load only ever makes an iteration dearer, on the CPU clock too (two processes share caches and
    memory bandwidth: a whole calibration beside a test suite came out ~23 % dearer for every method alike, which
    neither the spread nor the time-per-FLOP check can see). So an anchor now cheaper by more than ``max_drift`` means
    the reused entries were measured at a slower pace: every method is measured again (``remeasure_all``). An anchor
    now dearer by more than that means this session is the slow one: the reused entries stay, the fresh ones are
    rescaled to their pace, and the message says how to measure everything again if the machine is idle."""
    if anchor is None or anchor not in previous or anchor not in measured:
        return None
    before = float(previous[anchor]["seconds_per_iteration"])
    now = float(measured[anchor]["seconds_per_iteration"])
    change = now / before - 1.0
    limit = None if max_drift is None else float(max_drift)
    cheaper, dearer = limit is not None and change < -limit, limit is not None and change > limit
    message = ""
    if cheaper:
        message = (f"the anchor {anchor} now costs {1e3 * now:.1f} ms per iteration, {-100 * change:.0f} % less than "
                   f"when the reused entries were measured ({1e3 * before:.1f} ms; calibrate.max_anchor_drift "
                   f"{100 * limit:.0f} %): they were measured at a slower pace (other load?), so every method is "
                   "measured again")
    elif dearer:
        message = (f"the anchor {anchor} now costs {1e3 * now:.1f} ms per iteration, {100 * change:.0f} % more than "
                   f"when the reused entries were measured ({1e3 * before:.1f} ms; calibrate.max_anchor_drift "
                   f"{100 * limit:.0f} %): this machine is slower now (other load?); the reused entries are kept and "
                   "the new ones rescaled to their pace. If nothing else is running, measure every method again: "
                   f"`kdrepro calibrate calibrate.incremental=false`, or in the pipeline move {output} aside and run "
                   "`dvc repro -s calibrate`")
    return {"anchor": anchor, "previous_seconds": before, "seconds": now, "change": change, "max_drift": limit,
            "remeasure_all": cheaper, "message": message}


def _pooled(measured: dict[str, dict[str, Any]], previous: dict[str, dict[str, Any]], kept: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The fresh measurements beside the reused entries, in the previous session's time scale (by the anchor both
    hold), so that the time-per-FLOP check compares like with like."""
    common = [name for name in kept if name in measured]
    if not common:
        return measured
    scale = previous[common[0]]["seconds_per_iteration"] / measured[common[0]]["seconds_per_iteration"]
    fresh = {name: {**entry, "seconds_per_iteration": entry["seconds_per_iteration"] * scale} for name, entry in measured.items()}
    return {**{name: previous[name] for name in kept if name not in measured}, **fresh}


def _remeasured(
    measure: Callable[[dict[str, DictConfig]], dict[str, dict[str, Any]]],
    configs: dict[str, DictConfig],
    measured: dict[str, dict[str, Any]],
    noisy: list[str],
    reference: str,
) -> dict[str, dict[str, Any]]:
    """``measured`` with the ``noisy`` methods measured again beside an undisturbed anchor (the reference method
    when it is one), rescaled to the anchor's first measurement; everything again when no anchor is left."""
    anchors = [name for name in (reference, *measured) if name in measured and name not in noisy]
    if not anchors:
        return {name: {**entry, "remeasured": measured[name].get("remeasured", 0) + 1} for name, entry in measure(configs).items()}
    anchor = anchors[0]
    again = measure({name: configs[name] for name in [*noisy, anchor]})
    scale = measured[anchor]["seconds_per_iteration"] / again[anchor]["seconds_per_iteration"]
    out = dict(measured)
    for name in noisy:
        out[name] = {**_rescaled(again[name], scale, anchor), "remeasured": measured[name].get("remeasured", 0) + 1}
    return out


class CalibrationDisturbed(ConfigError):
    """A calibration that stayed disturbed by other load after its re-measurements (no budget derived from it)."""


#: Whose code the fingerprint hashes: everything `kdrepro calibrate` can run (kdrepro/pipeline/deps.py, which dvc.yaml's
#: deps follow too), so a change to any code a training step runs re-measures the methods.
code_digest_stage = "calibrate"


def fingerprint(cfg: DictConfig, device: torch.device, world_size: int = 1) -> str:
    """A digest of what sets a method's cost per iteration: the cost part of its composed config
    (:func:`kdrepro.train.effects.cost_view`: not the seeds, schedule, paths or logging), with the calibration
    protocol, the hardware, torch build and number of processes, and every kdrepro source file the calibration can
    run."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    digest = hashlib.sha256(json.dumps([cost_view(config), _hardware(device, world_size)], sort_keys=True, default=str).encode())
    digest.update(_code_digest())
    digest.update(_plugin_digest(str(cfg.method.name), tuple(str(f) for f in cfg.get("plugins") or ())))
    return digest.hexdigest()[:16]


def _plugin_digest(method: str, folders: tuple[str, ...]) -> bytes:
    """sha256 over the Python sources of the plugin folder a method's config comes from (empty for built-ins):
    your own method is re-measured, and its stages rerun, when its code changes."""
    digest = hashlib.sha256()
    for source in plugin_sources(method, folders):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.digest()


@functools.cache
def _code_digest() -> bytes:
    """sha256 over the sources `kdrepro calibrate` can run (read once per process)."""
    from kdrepro.pipeline.deps import code_digest

    return code_digest(code_digest_stage)


def disturbed(methods: dict[str, dict[str, Any]], max_spread: float | None) -> dict[str, float]:
    """Methods whose timed iterations spread by more than ``max_spread`` (IQR / median): measured while something
    else loaded the machine. ``{name: spread}``; empty when ``max_spread`` is null."""
    if max_spread is None:
        return {}
    return {name: float(entry["relative_spread"]) for name, entry in methods.items()
            if entry.get("relative_spread", 0.0) > float(max_spread)}


def _reusable(
    previous: dict[str, dict[str, Any]], fingerprints: dict[str, str], reference: str | None, max_spread: float | None = None
) -> tuple[list[str], str | None]:
    """(methods whose previous entry still holds, the anchor to rescale new measurements by) — nothing is reused if
    the anchor (the configured reference, else the previous table's slowest method) changed. A disturbed entry
    (:func:`disturbed`) is not reused: calibrating again re-measures it."""
    noisy = disturbed(previous, max_spread)
    unchanged = [name for name, digest in fingerprints.items()
                 if previous.get(name, {}).get("fingerprint") == digest and name not in noisy]
    if not unchanged:
        return [], None
    anchor = reference if reference is not None else max(previous, key=lambda name: previous[name]["seconds_per_iteration"])
    if anchor not in unchanged:
        return [], None
    return unchanged, anchor


def _rescaled(entry: dict[str, Any], scale: float, anchor: str) -> dict[str, Any]:
    """A fresh measurement expressed in the previous session's time scale (``scale`` = previous / current anchor)."""
    out = dict(entry)
    for key in ("seconds_per_iteration", "p25_seconds", "p75_seconds", "pretrain_seconds"):
        out[key] = entry[key] * scale
    out["phase_median_seconds"] = {phase: seconds * scale for phase, seconds in entry["phase_median_seconds"].items()}
    out["rescaled"] = {"anchor": anchor, "scale": scale}
    return out


def _time_pretrain(trainer: Trainer, batches, samples: int) -> float:
    """Seconds of the method's whole pre-training stage, from the median of a few timed pre-training steps."""
    count = trainer.distiller.pretrain_iterations
    if count == 0:
        return 0.0
    durations = []
    for _ in range(min(samples + 1, count)):
        images, labels = trainer.to_device(*next(batches))
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.pretrain_step(images, labels)
        synchronize(trainer.device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations[1:] or durations) * count


def _hardware(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """What the cost depends on beyond the config (the world size only when > 1: one-process fingerprints keep the
    values they had before calibration ran under torchrun)."""
    info: dict[str, Any] = {
        "device": str(device) if device.type != "cuda" or world_size == 1 else "cuda",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if world_size > 1:
        info["world_size"] = world_size
    return info


def _json_default(value: Any) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(value, resolve=True)
    except ValueError:
        return str(value)
