"""``kdrepro train``: one budgeted, resumable, honestly timed training run.

Run folder (``out_dir``): ``config.yaml`` (resolved config), ``inputs.json`` (content hashes of the teacher
checkpoint and calibration files), ``checkpoint.pt`` (atomic, every ``checkpoint_every_seconds`` of wall time, on a
signal, and when training ends, *before* the final evaluation), ``dvclive/`` (every loss term, what a method's own
extra/pre-training step returns, lr, train seconds, periodic mIoU) and, once evaluated, ``metrics.json`` (mIoU,
iterations, train seconds, phase split).

Rerunning the same command resumes an interrupted run (an interrupt during the final evaluation costs only the
evaluation) and is a no-op for a finished one. One process at a time writes a folder (:class:`RunLock`). A folder
holding a run of a *different* config or of changed input files is refused, or moved aside with
``on_config_change=archive`` (see :mod:`kdrepro.train.run_folder`). SIGINT/SIGTERM at any moment end the command
with one line and status 130/143 (see :mod:`kdrepro.train.signals`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdrepro.data import build_dataset, class_names
from kdrepro.data.loader import training_loader
from kdrepro.distributed import (
    DistributedContext,
    any_rank,
    barrier,
    broadcast_float,
    check_global_batch,
    setup_device,
)
from kdrepro.errors import ConfigError, Interrupted, MethodCodeError
from kdrepro.evaluate import evaluate
from kdrepro.io import checkpoint_dict, load_checkpoint, save_checkpoint, storage_errors, write_json_atomic
from kdrepro.train.budget import Budget, resolve_budget
from kdrepro.train.calibration_check import check_calibration
from kdrepro.train.checkpoint import restore_rng_state, rng_state
from kdrepro.train.hardware import apply_speed
from kdrepro.train.progress import Progress
from kdrepro.train.run_folder import (
    INPUTS_NAME,
    RunLock,
    claim,
    input_files,
    input_hashes,
    record_start,
    trim_live_logs,
)
from kdrepro.train.signals import Signals, watch_parent
from kdrepro.train.timing import PHASES, process_seconds, summarize, synchronize
from kdrepro.train.trainer import NonFiniteLossError, StepResult, Trainer, check_method, method_uses_teacher

log = logging.getLogger("kdrepro.train")
#: Where ``kdrepro train`` writes the full traceback of a method's code that raised (the error line names it).
ERROR_LOG = "error.log"


@dataclass
class RunState:
    """Where a run stands: what a checkpoint restores."""

    step: int = 0
    train_seconds: float = 0.0
    pretrained: bool = False
    pretrain_cpu_seconds: float = 0.0  # the method's pre-training in process CPU time (its wall time is in train_seconds)
    saved_step: int | None = None  # the step of the checkpoint on disk


@dataclass
class Run:
    """Everything one training run works with."""

    cfg: DictConfig
    out_dir: Path
    budget: Budget
    trainer: Trainer
    dist: DistributedContext
    signals: Signals
    train_set: Any
    val_loader: Any
    live: Any = None
    state: RunState = field(default_factory=RunState)
    eval_steps: frozenset[int] = frozenset()  # validation mIoU before the end (:func:`~kdrepro.train.seeds.evaluation_steps`)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def method(self) -> str:
        return str(self.cfg.method.name)


def check_options(cfg: DictConfig) -> None:
    """Refuse unknown run options, and say which given ones are ignored, before anything is built."""
    if str(cfg.get("on_nonfinite", "error")) not in ("error", "record"):
        raise ConfigError(f"on_nonfinite={cfg.on_nonfinite!r}: use on_nonfinite=error or on_nonfinite=record")
    if cfg.get("teacher_checkpoint") and not method_uses_teacher(cfg.method):
        log.warning("method %s trains the student alone: teacher_checkpoint=%s is ignored (not read)",
                    cfg.method.name, cfg.teacher_checkpoint)


def train(cfg: DictConfig, budget: Budget | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) the training run described by ``cfg``; returns its final metrics.
    ``budget`` is ``cfg.budget`` already resolved (resolved here, when the run starts training, if not given).

    Under ``torchrun`` every rank calls this; rank 0 alone writes files (see :mod:`kdrepro.distributed`).
    """
    check_options(cfg)
    cfg = apply_speed(cfg)  # precision / channels_last / threads `auto`: the pipeline's decision
    check_method(cfg)  # a rejected option must not archive or restore anything first
    out_dir = Path(cfg.out_dir)
    with Signals() as signals, contextlib.ExitStack() as stack:
        watch_parent()
        dist, device = setup_device(str(cfg.device))
        check_calibration(cfg, device.type, dist.world_size, method_uses_teacher(cfg.method))
        lock = stack.enter_context(RunLock(out_dir, enabled=dist.is_main))
        inputs = input_hashes(input_files(cfg, method_uses_teacher(cfg.method))) if dist.is_main else {}
        finished = claim(out_dir, cfg, inputs, lock) if dist.is_main else None
        if any_rank(finished is not None, dist, device):
            if finished is not None:
                log.info("%s already holds this finished run (%s); nothing to do", out_dir, _outcome(finished))
            return finished or {"method": str(cfg.method.name), "miou": None, "rank": dist.rank}
        with storage_errors(out_dir / "checkpoint.pt"), _traceback_logged(out_dir, dist.is_main):
            run = _start(cfg, out_dir, dist, device, signals, inputs, budget)
            return _train_and_evaluate(run)


@contextlib.contextmanager
def _traceback_logged(out_dir: Path, is_main: bool) -> Iterator[None]:
    """A method's code that raised: its full traceback goes to ``<out_dir>/error.log`` and the one-line error
    says so."""
    try:
        yield
    except MethodCodeError as error:
        if not is_main or error.__cause__ is None:
            raise
        log_path = out_dir / ERROR_LOG
        text = "".join(traceback.format_exception(error.__cause__))
        try:
            log_path.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {error}\n{text}")
        except OSError:  # the log is a courtesy: never hide the error behind a failed write
            raise error from error.__cause__
        raise MethodCodeError(f"{error}; the full traceback is in {log_path}") from error.__cause__


def _start(cfg: DictConfig, out_dir: Path, dist: DistributedContext, device: torch.device, signals: Signals,
           inputs: dict, budget: Budget | None = None) -> Run:
    """Build the run and restore its checkpoint, if any (signals raise at once meanwhile)."""
    budget = budget or resolve_budget(cfg.budget, str(cfg.method.name), device)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    check_global_batch(int(cfg.loader.batch_size), dist)
    torch.manual_seed(int(cfg.seed))
    train_set = build_dataset(cfg.dataset, "train", train_transforms=True)
    val_loader = _eval_loader(cfg)
    trainer = Trainer(cfg, device, context=dist)
    run = Run(cfg, out_dir, budget, trainer, dist, signals, train_set, val_loader, eval_steps=_eval_steps(cfg, budget))
    resumed = run.checkpoint_path.exists()
    if resumed:
        _resume(run)
    elif dist.is_main:
        record_start(out_dir, cfg, inputs)
    if dist.is_main:
        if resumed and cfg.get("allow_changed_inputs", False):
            write_json_atomic(out_dir / INPUTS_NAME, inputs)
        for stale in out_dir.glob("*.tmp"):  # a write killed by SIGKILL; we hold the lock, nobody else writes
            stale.unlink()
        run.live = open_live(out_dir, resumed)
        if resumed:
            trim_live_logs(out_dir / "dvclive", run.state.step)
    return run


def evaluation_steps(iterations: int, points: int, every: int = 0) -> list[int]:
    """The steps before the end of an ``iterations``-step run at which validation mIoU is evaluated (the end is
    always evaluated): with ``points`` > 0 the first step at or after each k/(points+1) of the run,
    ``ceil(k * iterations / (points + 1))`` for k = 1..points -- exactly ``points`` distinct steps whenever the run has
    more than ``points`` iterations; else every ``every`` steps (none for 0)."""
    if points > 0:
        steps = {math.ceil(k * iterations / (points + 1)) for k in range(1, points + 1)}
    else:
        steps = set(range(every, iterations, every)) if every > 0 else set()
    return sorted(step for step in steps if 0 < step < iterations)


def _eval_steps(cfg: DictConfig, budget: Budget) -> frozenset[int]:
    """The steps before the end at which a run of an iteration budget evaluates (a seconds budget: see
    :func:`_evaluates`)."""
    if budget.iterations is None:
        if int(cfg.get("eval_points") or 0) > 0:
            raise ConfigError("eval_points needs an iteration budget (budget=iterations or budget=calibrated); use eval_every")
        return frozenset()
    points = int(cfg.get("eval_points") or 0)
    steps = evaluation_steps(int(budget.iterations), points, int(cfg.get("eval_every") or 0))
    if len(steps) < points:
        log.warning("eval_points=%d on a run of %d iterations: validation at %d step(s) before the end (%s), not %d",
                    points, budget.iterations, len(steps), ", ".join(map(str, steps)) or "none", points)
    return frozenset(steps)


def _evaluates(run: Run, step: int) -> bool:
    """Whether validation mIoU is evaluated after ``step`` (a seconds budget: every ``eval_every`` steps)."""
    if run.budget.iterations is None:
        every = int(run.cfg.get("eval_every") or 0)
        return every > 0 and step % every == 0
    return step in run.eval_steps


def _resume(run: Run) -> None:
    state = load_checkpoint(run.checkpoint_path)
    run.trainer.load_state_dict(state)
    restore_rng_state(state["rng"])
    run.state = RunState(int(state["step"]), float(state["train_seconds"]), bool(state["pretrained"]),
                         float(state.get("pretrain_cpu_seconds", 0.0)), int(state["step"]))
    run.trainer.timer.history = [dict(zip(state["timing_keys"], row, strict=True)) for row in state["timing"].tolist()]
    log.info("resuming %s at step %d (%.1f train seconds)", run.out_dir, run.state.step, run.state.train_seconds)


def _train_and_evaluate(run: Run) -> dict[str, Any]:
    run.state.pretrained = run.state.pretrained or run.trainer.distiller.pretrain_iterations == 0
    run.signals.deferred()
    if not run.state.pretrained:
        wall, cpu = _pretrain(run)
        run.state.train_seconds += wall
        run.state.pretrain_cpu_seconds += cpu
        run.state.pretrained = True
    try:
        _train_to_budget(run)
    except NonFiniteLossError as error:
        if str(run.cfg.get("on_nonfinite", "error")) != "record":
            raise
        if not run.dist.is_main:
            return {"method": run.method, "miou": None, "diverged": {"step": error.step}, "rank": run.dist.rank}
        return _record_divergence(run, error)
    if run.state.saved_step != run.state.step:
        _save(run)  # the final checkpoint comes before the evaluation: an interrupt there costs only the evaluation
    if run.signals.pending:
        raise Interrupted(run.signals.signum or signal.SIGTERM, f"interrupted by signal {run.signals.signum} after "
                          f"training ended at step {run.state.step}; checkpoint saved, rerun to evaluate it")
    if not run.dist.is_main:
        return {"method": run.method, "miou": None, "iterations": run.state.step,
                "train_seconds": run.state.train_seconds, "rank": run.dist.rank}
    return _evaluate_and_record(run)


def _evaluate_and_record(run: Run) -> dict[str, Any]:
    message = (f"during the final evaluation; the trained weights (step {run.state.step}) are saved in "
               f"{run.checkpoint_path}, rerun the same command to evaluate them")
    with run.signals.immediate_phase(message):
        metrics, _ = validate(run.trainer, run.cfg, run.val_loader)
    result = _result(run, metrics)
    run.live.log_metric("val/miou", metrics.miou, plot=False)
    run.live.summary.update({"miou": metrics.miou, "iterations": run.state.step, "train_seconds": run.state.train_seconds})
    run.live.end()
    write_json_atomic(run.out_dir / "metrics.json", result)
    log.info("%s: mIoU %.4f after %d iterations, %.1f train seconds", run.out_dir, metrics.miou, run.state.step,
             run.state.train_seconds)
    return result


def train_cpu_seconds(history: list[dict[str, float]], pretrain_cpu: float = 0.0) -> float | None:
    """The run's training in process CPU time (every iteration's ``cpu`` record plus the method's pre-training): the
    clock a CPU calibration measures in, so the compute check compares like with like when other load stretched the
    wall time. ``None`` when an iteration has no CPU record."""
    if not history or any("cpu" not in record for record in history):
        return None
    return float(sum(record["cpu"] for record in history)) + float(pretrain_cpu)


def _result(run: Run, metrics: Any) -> dict[str, Any]:
    history = run.trainer.timer.history
    summary = summarize(history, skip=min(5, max(len(history) - 1, 0)))
    budget = run.budget
    return {
        **metrics.to_json(class_names(run.cfg.dataset)),
        "method": run.method,
        "iterations": run.state.step,
        "train_seconds": run.state.train_seconds,
        "train_cpu_seconds": train_cpu_seconds(history, run.state.pretrain_cpu_seconds),
        "seconds_per_iteration": summary.get("median", {}).get("total"),
        "phase_median_seconds": {k: v for k, v in summary.get("median", {}).items() if k in PHASES},
        "phase_total_seconds": {k: v for k, v in summary.get("total", {}).items() if k in PHASES},
        "budget": {"kind": budget.kind, "iterations": budget.iterations, "seconds": budget.seconds, "source": budget.source},
        "precision": str(run.cfg.get("precision", "fp32")),
        "speed": speed_record(run.cfg),
        "device": str(run.trainer.device),
        "world_size": run.dist.world_size,
    }


def speed_record(cfg: DictConfig) -> dict[str, Any] | None:
    """The speed settings the run trained with and why (``speed.choice``, set by :func:`apply_speed`)."""
    choice = (cfg.get("speed") or {}).get("choice")
    return OmegaConf.to_container(choice, resolve=True) if choice is not None else None


def _eval_loader(cfg: DictConfig):
    dataset = build_dataset(cfg.dataset, "val", train_transforms=False)
    return torch.utils.data.DataLoader(dataset, batch_size=int(cfg.get("eval_batch_size", 1)), num_workers=0)


def validate(trainer: Trainer, cfg: DictConfig, loader) -> tuple[Any, Any]:
    return evaluate(
        trainer.student,
        loader,
        trainer.num_classes,
        trainer.ignore_index,
        mode=str(cfg.dataset.eval_mode),
        slide_crop=list(cfg.dataset.slide_crop),
        slide_stride=list(cfg.dataset.slide_stride),
        device=trainer.device,
        autocast_dtype=torch.bfloat16 if cfg.get("precision") == "bf16" else None,
        reporter=Progress("evaluate", len(loader), f"{cfg.method.name}, seed {cfg.seed}",
                          every_seconds=float((cfg.get("progress") or {}).get("every_seconds", 30))),
    )


def _outcome(metrics: dict[str, Any]) -> str:
    if metrics.get("diverged"):
        return f"diverged at step {metrics['diverged']['step']}"
    return f"mIoU {metrics['miou']:.4f}"


def _record_divergence(run: Run, error: NonFiniteLossError) -> dict[str, Any]:
    """``on_nonfinite=record``: a diverged run is a result (mIoU null, the step and terms recorded), not a failed
    stage, so the other methods' runs and the reports still get built. Its checkpoint is removed: the run is over."""
    result = {
        "method": run.method,
        "miou": None,
        "diverged": {"step": error.step, "terms": error.terms, "message": str(error)},
        "iterations": error.step,
        "train_seconds": None,
        "precision": str(run.cfg.get("precision", "fp32")),
        "speed": speed_record(run.cfg),
    }
    run.live.summary.update({"diverged_at_step": error.step})
    run.live.end()
    run.checkpoint_path.unlink(missing_ok=True)
    write_json_atomic(run.out_dir / "metrics.json", result)
    log.warning("%s: %s; recorded as diverged (on_nonfinite=record), its checkpoint removed", run.out_dir, error)
    return result


def open_live(out_dir: Path, resumed: bool):
    from dvclive import Live

    return Live(str(out_dir / "dvclive"), dvcyaml=False, save_dvc_exp=False, resume=resumed, report=None)


def _pretrain(run: Run) -> tuple[float, float]:
    """The method's pre-training stage (e.g. MasKD's mask tokens), inside the training clock; what each pre-training
    step returns is logged as ``pretrain/<term>.<name>``. Returns its (wall, process CPU) seconds."""
    trainer, cfg = run.trainer, run.cfg
    loader = iter(training_loader(run.train_set, int(cfg.loader.batch_size), int(cfg.seed) + 1, 0, int(cfg.loader.num_workers)))
    synchronize(trainer.device)
    start, cpu_start = time.perf_counter(), process_seconds()
    progress = progress_of(run, trainer.distiller.pretrain_iterations, stage=f"{run.cfg.progress.stage} method pre-training")
    for index in range(trainer.distiller.pretrain_iterations):
        images, labels = trainer.to_device(*next(loader))
        logs = trainer.pretrain_step(images, labels)
        progress.update(index + 1, sum(float(value) for value in logs.values()) if logs else None)
        if run.live is not None and ((index + 1) % max(int(cfg.log_every), 1) == 0):
            run.live.step = index + 1
            for name, value in logs.items():
                run.live.log_metric(f"pretrain/{name}", float(value))
        if run.signals.pending:
            raise Interrupted(run.signals.signum or signal.SIGTERM, f"interrupted by signal {run.signals.signum} during "
                              f"{run.method} pre-training; nothing of it was saved, rerun to restart it")
    progress.close()
    synchronize(trainer.device)
    return time.perf_counter() - start, process_seconds() - cpu_start


def _train_to_budget(run: Run) -> None:
    state, cfg, trainer = run.state, run.cfg, run.trainer
    loader = iter(training_loader(run.train_set, int(cfg.loader.batch_size), int(cfg.seed), state.step,
                                  int(cfg.loader.num_workers), trainer.device.type == "cuda"))
    last_save = time.monotonic()
    progress = progress_of(run, run.budget.iterations, state.step)
    while not run.budget.exhausted(state.step, state.train_seconds):
        result = _step(run, loader)
        progress.update(state.step, result.total, run.budget.progress(state.step, state.train_seconds))
        _log_and_validate(run, result)
        if any_rank(run.signals.pending, run.dist, trainer.device):
            if state.saved_step != state.step:  # (a signal during a periodic save needs no second one)
                _save(run)
            signum = run.signals.signum or signal.SIGTERM
            raise Interrupted(signum, f"interrupted by signal {signum} at step {state.step}; checkpoint saved to "
                              f"{run.checkpoint_path}, rerun the same command to resume")
        if time.monotonic() - last_save > float(cfg.checkpoint_every_seconds):
            _save(run)
            last_save = time.monotonic()
    progress.close()


def _step(run: Run, loader) -> StepResult:
    state = run.state
    result, wall = run.trainer.timed_step(loader, run.budget.progress(state.step, state.train_seconds), state.step)
    state.train_seconds += wall
    if run.budget.seconds is not None:  # every rank must stop at the same step
        state.train_seconds = broadcast_float(state.train_seconds, run.dist, run.trainer.device)
    state.step += 1
    return result


def _log_and_validate(run: Run, result: StepResult) -> None:
    state, cfg = run.state, run.cfg
    done = run.budget.exhausted(state.step, state.train_seconds)
    if run.live is not None and (state.step % max(int(cfg.log_every), 1) == 0 or done):
        log_step(run.live, result, run.trainer.last_lr, state.train_seconds, state.step)
    if _evaluates(run, state.step) and not done:
        if run.live is not None:
            metrics, _ = validate(run.trainer, cfg, run.val_loader)
            run.live.log_metric("val/miou", metrics.miou)
        barrier(run.dist)


def log_step(live, result: StepResult, lr: float, train_seconds: float, step: int) -> None:
    """Every loss term, the total, what the method's extra step returned (``train/<term>.<name>``), lr, seconds."""
    live.step = step
    for name, value in result.losses.items():
        live.log_metric(f"train/{name}", float(value.detach()))
    live.log_metric("train/total", float(result.total.detach()))
    for name, value in result.logs.items():
        live.log_metric(f"train/{name}", float(value.detach() if isinstance(value, torch.Tensor) else value))
    live.log_metric("train/lr", lr)
    live.log_metric("train/seconds", train_seconds)
    live.make_summary()


def progress_of(run: Run, total: int | None, step: int = 0, stage: str | None = None) -> Progress:
    """The run's progress display (rank 0 only): a tqdm bar on a terminal, else a line every
    ``progress.every_seconds`` naming ``progress.stage``, the method and the seed."""
    settings = run.cfg.get("progress") or {}
    return Progress(stage or str(settings.get("stage", "train")), total, f"{run.method}, seed {run.cfg.seed}", step,
                    float(settings.get("every_seconds", 30)), enabled=run.dist.is_main)


def checkpoint_state(trainer: Trainer, cfg: DictConfig, state: RunState) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds: weights, optimiser and method state, RNGs, step, clock and timing history."""
    history = trainer.timer.history
    keys = list(history[0]) if history else [*PHASES, "total"]
    trained = trainer.state_dict()
    return checkpoint_dict(
        trained.pop("model"), trainer.num_classes, OmegaConf.to_container(cfg.student, resolve=True), finished=False,
        **trained,
        step=state.step,
        train_seconds=state.train_seconds,
        pretrained=state.pretrained,
        pretrain_cpu_seconds=state.pretrain_cpu_seconds,
        rng=rng_state(),
        timing_keys=keys,
        timing=torch.tensor([[record[k] for k in keys] for record in history], dtype=torch.float64).reshape(-1, len(keys)),
        config=OmegaConf.to_yaml(cfg, resolve=True),
    )


def _save(run: Run) -> None:
    """Rank 0 writes the checkpoint atomically; every rank waits for it. ``finished`` = training reached its budget."""
    if run.dist.is_main:
        state = checkpoint_state(run.trainer, run.cfg, run.state)
        state["finished"] = run.budget.exhausted(run.state.step, run.state.train_seconds)
        save_checkpoint(state, run.checkpoint_path)
    run.state.saved_step = run.state.step  # on every rank: they must agree on whether a final save is due
    barrier(run.dist)

