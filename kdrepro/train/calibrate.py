"""``kdrepro calibrate``: measure each method's cost per training iteration on this hardware, then match budgets.

Protocol (DESIGN §5): every method is built (one shared frozen teacher), warmed up, then timed in interleaved rounds
``A B C, B C A, C A B, ...`` of a few iterations each, with real data, by the *same* code the training loop runs
(:meth:`Trainer.timed_step`). Machine drift (up to ~25 % over half an hour on the 2-core CPUs) therefore hits every
method alike, and the median over all timed iterations is robust to stragglers. A method's pre-training stage (e.g.
MasKD's mask tokens) is timed too and charged once, as ``pretrain_seconds``.

The matched budget is ``reference_iterations × seconds_per_iteration(reference) + pretrain_seconds(reference)``, the
reference being the slowest method by default, so no method trains below the standard schedule; each method then
gets ``(budget − its pretrain_seconds) / its seconds_per_iteration`` iterations. FLOP-matched iteration counts (from
``torch.utils.flop_counter`` on one full training step) are written beside them as an alternative.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from kdrepro.data import build_dataset
from kdrepro.errors import ConfigError
from kdrepro.train.budget import whole_iterations
from kdrepro.train.data import training_loader
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
    """FLOPs of one full training step (teacher forward, student forward + backward, KD terms, method step)."""
    images, labels = trainer.to_device(*next(batches))
    counter = AtenFlopCounter()
    trainer.teacher_grad_context = torch.no_grad
    try:
        with counter:
            trainer.step(images, labels, progress=0.0)
    finally:
        trainer.teacher_grad_context = torch.inference_mode
    return counter.total


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * (len(ordered) - 1) + 0.5), len(ordered) - 1)]


def calibrate(base_cfg: DictConfig, method_cfg: Callable[[str], DictConfig]) -> dict[str, Any]:
    """Measure every method in ``base_cfg.calibrate.methods``; ``method_cfg(name)`` composes that method's config."""
    settings = base_cfg.calibrate
    names = list(settings.methods)
    if not names:
        raise ConfigError("calibrate.methods is empty; list the methods to compare, e.g. calibrate.methods=[none,kd]")
    if len(set(names)) != len(names):
        raise ConfigError(f"calibrate.methods lists a method twice: {names}")
    for key in ("rounds", "iterations_per_round"):
        if int(settings[key]) < 1:
            raise ConfigError(f"calibrate.{key} must be at least 1, got {settings[key]}")
    if base_cfg.get("threads"):
        torch.set_num_threads(int(base_cfg.threads))
    device = resolve_device(str(base_cfg.device))
    torch.manual_seed(int(base_cfg.seed))
    configs = {name: method_cfg(name) for name in names}
    num_classes = int(base_cfg.dataset.num_classes)
    teacher = None
    if any(method_uses_teacher(cfg.method) for cfg in configs.values()):
        teacher = load_teacher(base_cfg, num_classes, device)
    trainers = {name: Trainer(cfg, device, teacher) for name, cfg in configs.items()}
    train_set = build_dataset(base_cfg.dataset, "train", train_transforms=True)
    batches = iter(
        training_loader(train_set, int(base_cfg.loader.batch_size), int(base_cfg.seed), 0, int(base_cfg.loader.num_workers))
    )

    pretrain_seconds = {name: _time_pretrain(trainer, batches, int(settings.iterations_per_round)) for name, trainer in trainers.items()}
    for name in names:
        for _ in range(int(settings.warmup)):
            trainers[name].timed_step(batches, 0.0)
        trainers[name].timer.history.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    peak_memory: dict[str, int | None] = dict.fromkeys(names)
    for round_index in range(int(settings.rounds)):
        for name in rotated_order(names, round_index):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(int(settings.iterations_per_round)):
                trainers[name].timed_step(batches, 0.0)
            if device.type == "cuda":
                peak_memory[name] = max(peak_memory[name] or 0, torch.cuda.max_memory_allocated(device))
        log.info("calibration round %d/%d done", round_index + 1, int(settings.rounds))

    methods: dict[str, dict[str, Any]] = {}
    for name, trainer in trainers.items():
        history = trainer.timer.history
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
            "pretrain_seconds": pretrain_seconds[name],
            "peak_memory_bytes": peak_memory[name],
            "flops_per_iteration": _flops_per_iteration(trainer, batches),
            "distiller_parameters": sum(p.numel() for p in distiller.parameters()),
            "distiller_buffer_bytes": sum(b.numel() * b.element_size() for b in distiller.buffers()),
            "terms": {term: dict(options or {}) for term, options in (configs[name].method.get("terms") or {}).items()},
        }
    matched = matched_iterations(methods, int(base_cfg.reference_iterations), settings.get("reference_method"))
    table = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": str(base_cfg.dataset.name),
        "student": str(base_cfg.student.name),
        "teacher": str(base_cfg.teacher.name) if teacher is not None else None,
        "batch_size": int(base_cfg.loader.batch_size),
        "crop_size": list(base_cfg.dataset.crop_size),
        "precision": str(base_cfg.get("precision", "fp32")),
        "hardware": _hardware(device),
        "protocol": {key: settings[key] for key in ("warmup", "rounds", "iterations_per_round")},
        "methods": methods,
        "matched": matched,
    }
    output = Path(str(settings.output))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=2, default=_json_default))
    tmp.replace(output)
    return table


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


def _hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _json_default(value: Any) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(value, resolve=True)
    except ValueError:
        return str(value)
