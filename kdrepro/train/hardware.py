"""Speed settings chosen on the user's machine: ``precision: auto``, ``channels_last: auto``, ``threads: auto``.

The CPU profiles leave these to the machine the pipeline runs on, because the fastest choice differs between CPUs:
bf16 autocast is faster than fp32 on a CPU with native bf16 (AVX512-BF16 / AMX) and several times slower on one
without it (AVX2), where oneDNN emulates it. ``kdrepro hardware`` (the pipeline's first stage) decides once per
pipeline, so every method of a run trains with the same precision:

* **capability**: bf16 is a candidate only where oneDNN reports native bf16 (CUDA: ``is_bf16_supported``);
* **measurement**: one training step of the profile's student alone, of its teacher and of a logit-KD step, on
  random batches of the profile's shape, for every candidate (fp32 / bf16 × NCHW / channels_last), interleaved
  round by round (order rotated), in process CPU time on one thread (other load on the machine barely moves it;
  CUDA: synchronised wall time);
* **one choice per role** (:data:`ROLES`), each scored on the workload that role runs, because the workloads
  disagree (on a 2-core Xeon with native bf16 the width-8 student's own step is fastest in fp32 / channels_last, the
  kd step and the width-16 teacher's in bf16 / channels_last): ``methods`` -- every method's runs and the
  calibration, one choice for all of them so that the comparison is like with like -- by the logit-KD step (a
  compute-matched run's budget is the reference method's iterations times its step time, so this step sets the
  methods' wall-clock time); ``teacher`` -- the teacher's training and its backbone's pre-training -- by the
  teacher's step; ``student`` -- the student backbone's pre-training -- by the student's step. A run names its role
  in ``speed.role`` (null: ``methods``);
* **rule**: the first of fp32/NCHW, fp32/channels_last, bf16/NCHW, bf16/channels_last whose median step is within
  :data:`MARGIN` of the best, so a choice never costs more than 5 % against the fastest fixed one measured, and a
  faster-looking alternative must beat the plain choice by more than the margin. A previous decision of the same
  machine stays as long as it is within the margin (the stage reruns on every ``dvc repro``; a re-measurement
  that wobbles around the margin must not retrain the pipeline). The ``teacher`` and ``student`` roles start from
  the ``methods`` role's choice and leave it only for a candidate more than the margin faster on their own step:
  otherwise a step whose candidates lie within a few per cent of each other (the width-8 student's: bf16 1-8 %
  faster than fp32 in two runs here) flips between runs of the same machine, and with it the pre-trained backbone
  every student run starts from (about 1.5 mIoU for every method between two otherwise identical runs);
* ``threads: auto``: the cores this process may run on.

The decision file (``runs/<profile>/hardware.json``, what the training stages depend on) holds only the choices and
their reasons (the ``methods`` role's at the top, every role's under ``roles``), so it is byte-identical whenever the
machine decides the same; the measured times go to ``hardware_measurements.json`` beside it, which nothing depends
on. Without a decision file (a plain ``kdrepro train`` outside the pipeline) ``auto`` is decided in the process,
once. Every run's ``metrics.json`` and the calibration record the choice and its reason (``speed`` in the config).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from kdrepro.errors import ConfigError
from kdrepro.train.budget import cpu_model
from kdrepro.train.speed_choice import speed_sentence

log = logging.getLogger("kdrepro.hardware")

AUTO = "auto"
SPEED_KEYS = ("precision", "channels_last", "threads")
#: a candidate within this fraction of the fastest one measured counts as fast as it
MARGIN = 0.05
#: candidates (precision, channels_last), most preferred first: fp32 and the plain layout unless the others pay
PREFERENCE: tuple[tuple[str, bool], ...] = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
WORKLOADS = ("student", "teacher", "kd")
#: role -> the workload its choice is scored on (module docstring); ``methods`` is the default role
ROLES = {"methods": "kd", "teacher": "teacher", "student": "student"}
DEFAULT_ROLE = "methods"
STEP_NAMES = {"kd": "the logit-KD training step", "teacher": "the teacher's training step", "student": "the student's training step"}
MEASUREMENTS_SUFFIX = "_measurements"


# -- capability ----------------------------------------------------------------------------------------------------
def bf16_native(device_type: str) -> bool:
    """Whether bf16 runs natively: oneDNN's own check on CPUs (AVX512-BF16 or AMX), ``is_bf16_supported`` on CUDA."""
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; ``os.cpu_count`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def machine(device_type: str) -> dict[str, Any]:
    """What the decision depends on besides the config: CPU model and ISA level, native bf16, cores, torch."""
    import torch

    info: dict[str, Any] = {
        "device": device_type,
        "cpu": cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(device_type),
        "cores": available_cores(),
        "torch": torch.__version__,
    }
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- the decision ------------------------------------------------------------------------------------------------------
def candidates(cfg: DictConfig, device_type: str) -> list[tuple[str, bool]]:
    """The (precision, channels_last) pairs worth measuring for this config on this device, preferred first."""
    precision, layout = cfg.get("precision", "fp32"), cfg.get("channels_last", False)
    precisions = ["fp32", "bf16"] if precision == AUTO else [str(precision)]
    if precision == AUTO and not bf16_native(device_type):
        precisions = ["fp32"]
    layouts = [False, True] if layout == AUTO else [bool(layout)]
    ordered = [c for c in PREFERENCE if c[0] in precisions and c[1] in layouts]
    return ordered or [(p, c) for p in precisions for c in layouts]


def choose(scores: dict[tuple[str, bool], float], previous: tuple[str, bool] | None = None) -> tuple[str, bool]:
    """The previous choice if still within :data:`MARGIN` of the fastest, else the first of :data:`PREFERENCE` that is."""
    best = min(scores.values())
    order = [*([previous] if previous in scores else []), *PREFERENCE, *scores]
    return next(c for c in order if c in scores and scores[c] <= best * (1 + MARGIN))


def decide(cfg: DictConfig, device_type: str, measure: Callable[[list[tuple[str, bool]]], dict] | None = None,
           previous: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The decision for ``cfg``'s ``auto`` settings and the raw measurements (empty when nothing was measured).

    ``measure(candidates)`` returns ``{candidate: {workload: [seconds, ...]}}`` (default :func:`measure_steps`);
    ``previous`` is the last decision file of this machine, whose choices are kept while within the margin. The
    decision holds one choice per role (:data:`ROLES`) under ``roles``; its top level is the ``methods`` role's.
    """
    options = candidates(cfg, device_type)
    measured: dict[tuple[str, bool], dict[str, list[float]]] = {}
    if len(options) > 1:
        measured = (measure or functools.partial(measure_steps, cfg, device_type))(options)
    roles = {DEFAULT_ROLE: _role_choice(cfg, device_type, options, measured, ROLES[DEFAULT_ROLE],
                                        role_of(previous, DEFAULT_ROLE))}
    anchor = role_of(roles[DEFAULT_ROLE], DEFAULT_ROLE)
    for role, workload in ROLES.items():
        if role != DEFAULT_ROLE:
            roles[role] = _role_choice(cfg, device_type, options, measured, workload, role_of(previous, role) or anchor,
                                       anchor)
    threads = {"threads": _threads(cfg, device_type), "reason": _threads_reason(cfg, device_type)}
    top = roles[DEFAULT_ROLE]
    decision = {
        "precision": top["precision"],
        "channels_last": top["channels_last"],
        "threads": threads["threads"],
        "reason": {**top["reason"], "threads": threads["reason"]},
        "roles": roles,
    }
    return decision, _measurements(device_type, options, measured, decision)


def _role_choice(cfg: DictConfig, device_type: str, options: list[tuple[str, bool]],
                 measured: dict[tuple[str, bool], dict[str, list[float]]], workload: str,
                 previous: tuple[str, bool] | None, methods: tuple[str, bool] | None = None) -> dict[str, Any]:
    """One role's (precision, channels_last) and reasons: the rule applied to its workload's median steps, starting
    from ``previous``. ``methods``: the methods' choice, for another role; the reasons say when the role shares it.
    The reasons depend on the choices only, never on how close the measurement was, so that a decision that holds
    writes the same bytes."""
    chosen = options[0]
    if measured:
        chosen = choose({c: statistics.median(measured[c][workload]) for c in options}, previous)
    step = STEP_NAMES[workload]
    shared = ""
    if methods is not None and chosen == methods and len(options) > 1:
        shared = f"{_label(chosen)}: the methods' choice; no other measured more than {MARGIN:.0%} faster here on {step}"
    return {
        "precision": chosen[0],
        "channels_last": chosen[1],
        "reason": {
            "precision": shared or _precision_reason(cfg, device_type, chosen[0], step),
            "channels_last": shared or _layout_reason(cfg, options, chosen[1], step),
        },
    }


def role_of(decision: dict[str, Any] | None, role: str) -> tuple[str, bool] | None:
    """``(precision, channels_last)`` of ``role`` in a decision (its top level for one without roles), or None."""
    if not decision:
        return None
    entry = (decision.get("roles") or {}).get(role, decision)
    return str(entry["precision"]), bool(entry["channels_last"])


def _threads(cfg: DictConfig, device_type: str) -> int | None:
    threads = cfg.get("threads")
    if threads == AUTO:
        return available_cores() if device_type == "cpu" else None
    return None if threads is None else int(threads)


def _precision_reason(cfg: DictConfig, device_type: str, chosen: str, step: str) -> str:
    if cfg.get("precision", "fp32") != AUTO:
        return f"{chosen}: set in the config"
    if not bf16_native(device_type):
        return "fp32: this machine has no native bf16, where bf16 autocast is emulated and several times slower"
    if chosen == "bf16":
        return f"bf16: native on this machine and measured faster than fp32 here on {step}"
    return f"fp32: bf16 is native on this machine but was not measured more than {MARGIN:.0%} faster than fp32 here on {step}"


def _layout_reason(cfg: DictConfig, options: list[tuple[str, bool]], chosen: bool, step: str) -> str:
    name = "channels_last" if chosen else "NCHW"
    if cfg.get("channels_last", False) != AUTO:
        return f"{name}: set in the config"
    if chosen:
        return f"channels_last: measured faster than NCHW here on {step}"
    return f"NCHW: channels_last was not measured more than {MARGIN:.0%} faster here on {step}"


def _threads_reason(cfg: DictConfig, device_type: str) -> str:
    threads = cfg.get("threads")
    if threads == AUTO:
        return "the cores this process may use" if device_type == "cpu" else "not used on a GPU"
    return "torch's default" if threads is None else "set in the config"


def _measurements(device_type: str, options: list, measured: dict, decision: dict) -> dict[str, Any]:
    if not measured:
        return {}
    medians = {_label(c): {w: statistics.median(t) for w, t in measured[c].items()} for c in options}
    return {
        "machine": machine(device_type),
        "unit": "process CPU seconds per training step, one thread" if device_type == "cpu" else "seconds per step",
        "margin": MARGIN,
        "seconds": {_label(c): measured[c] for c in options},
        "median_seconds": medians,
        "roles": dict(ROLES),
        "chosen": _label((decision["precision"], decision["channels_last"])),
        "chosen_by_role": {role: _label(role_of(decision, role)) for role in ROLES},
    }


def _label(candidate: tuple[str, bool]) -> str:
    return f"{candidate[0]}/{'channels_last' if candidate[1] else 'nchw'}"


# -- measurement -------------------------------------------------------------------------------------------------------
def measure_steps(cfg: DictConfig, device_type: str, options: list[tuple[str, bool]], rounds: int | None = None,
                  warmup: int | None = None) -> dict[tuple[str, bool], dict[str, list[float]]]:
    """Time one training step per workload (:data:`WORKLOADS`) and candidate, interleaved: ``warmup`` untimed steps
    each, then ``rounds`` rounds over every (candidate, workload) pair, the order rotated each round."""
    import torch

    rounds = int(rounds if rounds is not None else cfg.speed.rounds)
    warmup = int(warmup if warmup is not None else cfg.speed.warmup)
    threads = torch.get_num_threads()
    if device_type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: what the step costs, whatever else runs on the machine
    try:
        steps = {(c, w): step for c in options for w, step in workload_steps(cfg, device_type, *c).items()}
        for step in steps.values():
            for _ in range(warmup):
                step()
        times: dict[tuple[str, bool], dict[str, list[float]]] = {c: {w: [] for w in WORKLOADS} for c in options}
        keys = list(steps)
        for index in range(rounds):
            for key in keys[index % len(keys):] + keys[: index % len(keys)]:
                times[key[0]][key[1]].append(timed(steps[key], device_type))
    finally:
        torch.set_num_threads(threads)
    return times


def timed(step: Callable[[], None], device_type: str) -> float:
    """Seconds of one call: process CPU time on a CPU, synchronised wall time on CUDA."""
    import torch

    if device_type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    step()
    return time.process_time() - start


def workload_steps(cfg: DictConfig, device_type: str, precision: str, channels_last: bool) -> dict[str, Callable[[], None]]:
    """One closure per workload running a real :class:`~kdrepro.train.trainer.Trainer` step on a random batch of the
    profile's batch and crop size (randomly initialised models: the cost does not depend on the weights)."""
    import torch

    from kdrepro.config import load_config
    from kdrepro.models import build_segmentor
    from kdrepro.train.trainer import Trainer

    device = torch.device(device_type)
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(base):
        base.precision, base.channels_last, base.threads = precision, channels_last, None
        base.student.pretrained, base.teacher.pretrained, base.compile = None, None, False
    methods = {name: load_config([f"method={name}"]).method for name in ("none", "kd")}
    student = _with(base, method=methods["none"])
    teacher_alone = _with(base, method=methods["none"], student=base.teacher)
    classes = int(base.dataset.num_classes)
    teacher_model = build_segmentor(OmegaConf.to_container(base.teacher, resolve=True), classes)
    trainers = {
        "student": Trainer(student, device),
        "teacher": Trainer(teacher_alone, device),
        "kd": Trainer(_with(base, method=methods["kd"]), device, teacher=teacher_model.to(device).eval()),
    }
    height, width = (int(v) for v in base.dataset.crop_size)
    batch = int(base.loader.batch_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    labels = torch.randint(0, classes, (batch, height, width), generator=generator)
    steps = {}
    for name, trainer in trainers.items():
        on_device = trainer.to_device(images, labels)
        steps[name] = functools.partial(trainer.step, *on_device, 0.0)
    return steps


def _with(cfg: DictConfig, **values: Any) -> DictConfig:
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(copy):
        for key, value in values.items():
            copy[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    return copy


# -- decision files ----------------------------------------------------------------------------------------------------
def is_auto(cfg: DictConfig) -> bool:
    return any(cfg.get(key) == AUTO for key in SPEED_KEYS)


def measurements_path(decision_file: Path) -> Path:
    return decision_file.with_name(decision_file.stem + MEASUREMENTS_SUFFIX + decision_file.suffix)


def write_decision(cfg: DictConfig) -> tuple[dict[str, Any], Path]:
    """``kdrepro hardware``: decide ``cfg``'s speed settings and write ``speed.file`` and its measurements beside it.

    A decision already made on this machine (same CPU, ISA level, cores, torch) for the same models, data shapes and
    settings is kept without measuring again, unless ``speed.remeasure=true`` (which still keeps it while it is within
    the margin): the stage runs on every ``dvc repro`` and costs a process start.
    """
    from kdrepro.distributed import resolve_device
    from kdrepro.io import write_text_atomic

    if not cfg.speed.get("file"):
        raise ConfigError("kdrepro hardware needs speed.file=<decision file>, e.g. speed.file=runs/synthetic/hardware.json")
    path = Path(str(cfg.speed.file))
    device_type = resolve_device(str(cfg.device)).type
    previous = _previous(path, device_type, cfg)
    if previous is not None and not cfg.speed.get("remeasure", False):
        log.info("%s: decided on this machine before for this config; kept (speed.remeasure=true measures again)", path)
        return previous, path
    decision, measurements = decide(cfg, device_type, previous=previous)
    record = {**measurements, "machine": machine(device_type), "config": _measured_config(cfg)}
    write_text_atomic(path, json.dumps(decision, indent=2) + "\n")
    write_text_atomic(measurements_path(path), json.dumps(record, indent=2) + "\n")
    for role, entry in decision["roles"].items():
        log.info("%s: %s; %s", role, entry["reason"]["precision"], entry["reason"]["channels_last"])
    return decision, path


def _measured_config(cfg: DictConfig) -> dict[str, Any]:
    """The settings a decision was made for (models, data shapes, batch, the speed keys), as plain JSON values."""
    part = OmegaConf.to_container(_cost_part(cfg), resolve=True)
    assert isinstance(part, dict)
    part.pop("speed", None)
    return json.loads(json.dumps(part, sort_keys=True, default=str))


def _previous(path: Path, device_type: str, cfg: DictConfig) -> dict[str, Any] | None:
    """The last decision written at ``path`` if it was made on this machine for this config, else None."""
    try:
        decision = json.loads(path.read_text())
        record = json.loads(measurements_path(path).read_text())
    except (OSError, ValueError):
        return None
    same = record.get("machine") == machine(device_type) and record.get("config") == _measured_config(cfg)
    # a decision from before the roles (one choice for every run) is made again
    return decision if same and isinstance(decision, dict) and "roles" in decision else None


def read_decision(path: Path) -> dict[str, Any]:
    """A decision file written by ``kdrepro hardware``; one-line errors when it is missing or unreadable."""
    if not path.is_file():
        raise ConfigError(f"speed decision {path} does not exist; run `kdrepro hardware --params params.yaml` (the "
                          "pipeline's first stage, `dvc repro hardware`) or set precision and channels_last explicitly")
    try:
        decision = json.loads(path.read_text())
        _ = decision["precision"], decision["channels_last"], decision["reason"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"speed decision {path} is not one written by `kdrepro hardware`; delete it and rerun "
                          "`dvc repro hardware`") from None
    return decision


@functools.cache
def _decided_here(config_yaml: str, device_type: str) -> str:
    """The decision for a config without a decision file, measured once per process (seeds of one command agree)."""
    decision, _ = decide(OmegaConf.create(config_yaml), device_type)
    return json.dumps(decision)


def _cost_part(cfg: DictConfig) -> DictConfig:
    """What the measurement depends on (not the seed, method or folders): one measurement serves every seed."""
    keys = ("student", "teacher", "dataset", "loader", "precision", "channels_last", "threads", "speed", "plugins",
            "optim", "aux_weight", "device")
    part = OmegaConf.create({key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), DictConfig)
                             else cfg.get(key) for key in keys})
    if part.get("speed"):  # one decision serves every role
        part.speed.pop("role", None)
        part.speed.pop("choice", None)
    return part


def apply_speed(cfg: DictConfig) -> DictConfig:
    """``cfg`` with its ``auto`` speed settings replaced by the decision (the ``speed.file`` when set, else decided
    now) and ``speed.choice`` = the settings used and their reasons, which metrics and calibration record."""
    from kdrepro.distributed import resolve_device

    if not is_auto(cfg) and (cfg.get("speed") or {}).get("choice") is not None:
        return cfg  # decided already (applying twice changes nothing)
    device_type = resolve_device(str(cfg.device)).type
    if not is_auto(cfg):
        decision, _ = decide(cfg, device_type)
    elif cfg.speed.get("file"):
        decision = read_decision(Path(str(cfg.speed.file)))
    else:
        log.info("deciding precision / channels_last / threads on this machine (set speed.file to reuse a decision)")
        decision = json.loads(_decided_here(OmegaConf.to_yaml(_cost_part(cfg)), device_type))
    role = run_role(cfg)
    decision = {**decision, **_role_entry(decision, role)}
    resolved = cfg.copy()
    with open_dict(resolved):
        for key in SPEED_KEYS:
            if resolved.get(key) == AUTO:
                resolved[key] = decision[key]
        resolved.speed.choice = {
            "precision": str(resolved.precision), "channels_last": bool(resolved.channels_last),
            "threads": None if resolved.get("threads") is None else int(resolved.threads),
            "reason": {key: decision["reason"][key] if cfg.get(key) == AUTO else _explicit(cfg, key) for key in SPEED_KEYS},
            **({"role": role} if role != DEFAULT_ROLE else {}),
        }
    if is_auto(cfg):
        log.info("speed: %s", speed_sentence(resolved.speed.choice))
    return resolved


def run_role(cfg: DictConfig) -> str:
    """The role a run's speed settings come from (``speed.role``; null: ``methods``); a one-line error for others."""
    role = (cfg.get("speed") or {}).get("role") or DEFAULT_ROLE
    if role not in ROLES:
        raise ConfigError(f"speed.role={role!r} is not a role: use one of {', '.join(ROLES)} (or null for methods)")
    return str(role)


def _role_entry(decision: dict[str, Any], role: str) -> dict[str, Any]:
    """``role``'s precision, layout and reasons (the threads' reason kept); a decision without roles serves all."""
    entry = (decision.get("roles") or {}).get(role)
    if entry is None:
        return {}
    return {"precision": entry["precision"], "channels_last": entry["channels_last"],
            "reason": {**decision["reason"], **entry["reason"]}}


def _explicit(cfg: DictConfig, key: str) -> str:
    """The reason of a setting the config gives (worded as :func:`decide` words it)."""
    if key == "precision":
        return f"{cfg.get('precision', 'fp32')}: set in the config"
    if key == "channels_last":
        return f"{'channels_last' if cfg.get('channels_last') else 'NCHW'}: set in the config"
    return "torch's default" if cfg.get("threads") is None else "set in the config"
