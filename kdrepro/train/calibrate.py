"""``kdrepro calibrate``: measure each method's cost per training iteration on this hardware, then match budgets.

Protocol: every method is built (one shared frozen teacher), warmed up, then timed in interleaved rounds
``A B C, B C A, C A B, ...`` of a few iterations each, with real data, by the *same* code the training loop runs
(:meth:`Trainer.timed_step`). Machine drift (up to ~25 % over half an hour on the 2-core CPUs) therefore hits every
method alike, and the median over all timed iterations is robust to stragglers. A method's pre-training stage (e.g.
MasKD's mask tokens) is timed too and charged once, as ``pretrain_seconds``.

The matched budget is ``reference_iterations × seconds_per_iteration(reference) + pretrain_seconds(reference)``, the
reference being the slowest method by default, so no method trains below the standard schedule; each method then
gets ``(budget − its pretrain_seconds) / its seconds_per_iteration`` iterations. FLOP-matched iteration counts (from
``torch.utils.flop_counter`` on one full training step) are written beside them as an alternative.

Outputs: ``calibrate.output`` (``calibration.json``, the whole table, read by the reports) and, beside it, a folder
of the same stem holding ``budget.json`` (reference method, iterations, budget seconds) and ``<method>.json`` (that
method's entry). A training stage reads only ``budget.json`` and its own method's file, so DVC reruns only what a
change touches.

**Incremental re-calibration** (``calibrate.incremental``, default on): every entry carries a fingerprint of what
sets its cost (the method's config, models, data shapes, precision, device, threads, protocol, kdrepro's model /
method / training code). When the previous table exists, only methods whose fingerprint changed (or that are new)
are measured, interleaved with the *anchor* (the previous reference method); their times are rescaled by
``previous anchor seconds / anchor seconds now``, so drift between the two sessions cancels. Unchanged entries are
kept byte for byte. If the anchor itself changed, or ``calibrate.incremental=false``, everything is re-measured.

**Disturbed measurements**: a method whose timed iterations spread by more than ``calibrate.max_spread`` (IQR over
median; 0.5 by default, where 12 samples per method on an idle 2-core machine spread by 3–24 %) was measured while
something else loaded the machine. The table lists it under ``disturbed``, a warning says so, and the next
calibration re-measures it instead of reusing it.

**Under torchrun** (``torchrun --nproc_per_node=N -m kdrepro calibrate ...``) every rank builds the same trainers
(DDP students, each rank on its slice of the global batch, exactly as ``kdrepro train`` under torchrun) and runs the
same rounds in lockstep, with a barrier around every timed block; each iteration's timings are reduced to their
maximum over ranks (the pace of a DDP run is its slowest rank's; see :func:`_measure`), FLOPs are summed over ranks,
and rank 0 writes the files. The table and ``budget.json`` record ``world_size``; a compute-matched run under another
number of processes is refused unless ``budget.allow_world_size_mismatch=true`` (:mod:`kdrepro.train.budget`), since
DDP's communication is part of every iteration's cost.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from kdrepro.config import check_calibrate
from kdrepro.data import build_dataset
from kdrepro.data.loader import training_loader
from kdrepro.distributed import (
    DistributedContext,
    barrier,
    check_global_batch,
    init_from_environment,
    rank_device,
    shard,
)
from kdrepro.errors import ConfigError
from kdrepro.io import write_text_atomic
from kdrepro.train.budget import whole_iterations
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
from kdrepro.train.timing import PHASES, synchronize
from kdrepro.train.trainer import Trainer, load_teacher, method_uses_teacher, resolve_device

log = logging.getLogger("kdrepro.calibrate")


def rotated_order(names: Sequence[str], round_index: int) -> list[str]:
    """Round ``r`` starts with method ``r mod n`` (A B C, B C A, C A B, ...)."""
    shift = round_index % len(names)
    return list(names[shift:]) + list(names[:shift])


def matched_iterations(
    methods: dict[str, dict[str, Any]], reference_iterations: int, reference_method: str | None = None
) -> dict[str, Any]:
    """Budget seconds and each method's iteration count from measured seconds/iteration (see module docstring)."""
    if reference_iterations <= 0:
        raise ConfigError(f"reference_iterations must be positive, got {reference_iterations}")
    if reference_method is None:
        reference_method = max(methods, key=lambda name: methods[name]["seconds_per_iteration"])
    if reference_method not in methods:
        raise ConfigError(f"calibrate.reference_method {reference_method!r} is not among the calibrated methods {sorted(methods)}")
    reference = methods[reference_method]
    budget = reference_iterations * reference["seconds_per_iteration"] + reference.get("pretrain_seconds", 0.0)
    iterations = {
        name: max(whole_iterations(budget - entry.get("pretrain_seconds", 0.0), entry["seconds_per_iteration"]), 0)
        for name, entry in methods.items()
    }
    result: dict[str, Any] = {
        "reference_method": reference_method,
        "reference_iterations": reference_iterations,
        "budget_seconds": budget,
        "iterations": iterations,
    }
    if all(entry.get("flops_per_iteration") for entry in methods.values()):
        reference_flops = reference_iterations * reference["flops_per_iteration"]
        result["flop_matched_iterations"] = {
            name: whole_iterations(reference_flops, entry["flops_per_iteration"]) for name, entry in methods.items()
        }
    return result


class AtenFlopCounter(TorchDispatchMode):
    """Counts FLOPs of every aten op with a formula in ``torch.utils.flop_counter``'s registry.

    ``FlopCounterMode`` itself also tracks modules with autograd hooks, which breaks double backward
    (``autograd.grad(create_graph=True)``, e.g. SKD's WGAN-GP gradient penalty); counting at the dispatch level
    sees the same ops without those hooks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _flops_per_iteration(trainer: Trainer, batches) -> int:
    """FLOPs of one full training step (teacher forward, student forward + backward, KD terms, method step) on the
    global batch: under torchrun each rank counts its slice and the counts are summed."""
    images, labels = next(batches)
    images, labels = trainer.to_device(shard(images, trainer.context), shard(labels, trainer.context))
    counter = AtenFlopCounter()
    trainer.teacher_grad_context = torch.no_grad
    try:
        with counter:
            trainer.step(images, labels, progress=0.0)
    finally:
        trainer.teacher_grad_context = torch.inference_mode
    return int(reduce_over_ranks(counter.total, trainer.context, trainer.device, "sum"))


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
    context = init_from_environment(str(base_cfg.device))
    device = rank_device(resolve_device(str(base_cfg.device)), context)
    check_global_batch(int(base_cfg.loader.batch_size), context)
    torch.manual_seed(int(base_cfg.seed))
    configs = {name: method_cfg(name) for name in names}
    fingerprints = {name: fingerprint(cfg, device, context.world_size) for name, cfg in configs.items()}
    output = Path(str(settings.output))
    previous = _previous_methods(output) if settings.get("incremental", True) else {}
    previous = from_rank_zero(previous, context)  # every rank measures the same methods, in the same order
    max_spread = settings.get("max_spread")
    kept, anchor = _reusable(previous, fingerprints, settings.get("reference_method"), max_spread)
    to_measure = [name for name in names if name not in kept]
    if to_measure and anchor is not None and anchor not in to_measure:
        to_measure.append(anchor)
    if kept:
        log.info("unchanged since the last calibration: %s; measuring %s against %s", ", ".join(kept), ", ".join(to_measure) or "nothing", anchor)

    measured = _measure(base_cfg, {name: configs[name] for name in to_measure}, device, context) if to_measure else {}
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
        "batch_size": int(base_cfg.loader.batch_size),
        "crop_size": list(base_cfg.dataset.crop_size),
        "precision": str(base_cfg.get("precision", "fp32")),
        "hardware": _hardware(device, context.world_size),
        "world_size": context.world_size,
        "device_memory_bytes": device_memory_bytes(device),
        "process_peak_rss_bytes": peak_rss_bytes(),
        "protocol": {key: settings[key] for key in ("warmup", "rounds", "iterations_per_round")},
        "reused": sorted(kept),
        "max_spread": max_spread,
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
        write_text_atomic(output, json.dumps(table, indent=2, default=_json_default) + "\n")
        _write_per_method(output.with_suffix(""), methods, matched, context.world_size, setting)
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
        teacher = load_teacher(base_cfg, num_classes, device)
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
    for round_index in range(int(settings.rounds)):
        for name in rotated_order(names, round_index):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            barrier(context)
            for _ in range(int(settings.iterations_per_round)):
                trainers[name].timed_step(batches, 0.0)
            barrier(context)
            if device.type == "cuda":  # as if the method trained alone: the other methods' models and banks stay out
                alone = torch.cuda.max_memory_allocated(device) - resident + own_bytes[name]
                peak_memory[name] = max(peak_memory[name] or 0, alone)
        log.info("calibration round %d/%d done", round_index + 1, int(settings.rounds))

    methods: dict[str, dict[str, Any]] = {}
    for name, trainer in trainers.items():
        history = slowest_rank_history(trainer.timer.history, context, device)
        totals = [record["total"] for record in history]
        median = statistics.median(totals)
        distiller = trainer.distiller
        methods[name] = {
            "seconds_per_iteration": median,
            "p25_seconds": _quantile(totals, 0.25),
            "p75_seconds": _quantile(totals, 0.75),
            "relative_spread": (_quantile(totals, 0.75) - _quantile(totals, 0.25)) / median,
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
    for folder in map(Path, folders):
        if (folder / "method" / f"{method}.yaml").is_file():
            for source in sorted(folder.glob("*.py")):
                digest.update(source.name.encode())
                digest.update(source.read_bytes())
    return digest.digest()


@functools.cache
def _code_digest() -> bytes:
    """sha256 over the sources `kdrepro calibrate` can run (read once per process)."""
    from kdrepro.pipeline.deps import code_digest

    return code_digest(code_digest_stage)


def _previous_methods(output: Path) -> dict[str, dict[str, Any]]:
    """Entries of an earlier calibration table at ``output`` ({} if there is none or it cannot be read)."""
    try:
        methods = json.loads(output.read_text())["methods"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: entry for name, entry in methods.items() if isinstance(entry, dict) and "fingerprint" in entry}


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


def _write_per_method(
    folder: Path, methods: dict[str, dict[str, Any]], matched: dict[str, Any], world_size: int = 1,
    setting: dict[str, Any] | None = None,
) -> None:
    """``budget.json`` (with the world size and the setting it was measured at) and one ``<method>.json`` per method
    (stale files of dropped methods removed); a file whose content is unchanged keeps its bytes, so DVC sees no
    change in it."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"budget": {key: matched[key] for key in ("reference_method", "reference_iterations", "budget_seconds")}}
    files["budget"]["world_size"] = world_size
    if setting is not None:
        files["budget"][SETTING_KEY] = setting
    files.update(methods)
    for stale in folder.glob("*.json"):
        if stale.stem not in files:
            stale.unlink()
    for name, data in files.items():
        path = folder / f"{name}.json"
        text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
        if not path.is_file() or path.read_text() != text:
            write_text_atomic(path, text)


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
