"""``kdrepro train``: one budgeted, resumable, honestly timed training run.

Run folder (``out_dir``): ``config.yaml`` (resolved config), ``checkpoint.pt`` (atomic, every
``checkpoint_every_seconds`` of wall time and at the end), ``dvclive/`` (every loss term, lr, train seconds, periodic
mIoU) and, once finished, ``metrics.json`` (mIoU, iterations, train seconds, phase split). Rerunning the same command
resumes an interrupted run and is a no-op for a finished one; a folder holding a run of a *different* config is
refused. SIGINT/SIGTERM write a checkpoint and exit with status 130/143.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdrepro.data import build_dataset, class_names
from kdrepro.distributed import any_rank, barrier, broadcast_float, init_from_environment
from kdrepro.errors import ConfigError, KdreproError
from kdrepro.evaluate import evaluate
from kdrepro.train.budget import Budget, resolve_budget
from kdrepro.train.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_atomic,
    write_text_atomic,
)
from kdrepro.train.data import training_loader
from kdrepro.train.timing import PHASES, summarize, synchronize
from kdrepro.train.trainer import NonFiniteLossError, Trainer, resolve_device

log = logging.getLogger("kdrepro.train")

#: Config keys that do not change what a run computes (may differ when resuming or re-running).
RUNTIME_KEYS = ("out_dir", "device", "threads", "checkpoint_every_seconds", "log_every", "on_nonfinite")


class Interrupted(KdreproError):
    """SIGINT / SIGTERM arrived; a checkpoint was written."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved to {path}, rerun to resume")
        self.exit_code = 128 + signum


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of a config that defines a run's result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    for key in RUNTIME_KEYS:
        container.pop(key, None)
    container.get("loader", {}).pop("num_workers", None)
    container.pop("calibrate", None)
    return container


def check_out_dir(out_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """Refuse a folder holding a different run; return the finished metrics of the same run, if any."""
    saved = out_dir / "config.yaml"
    if not saved.exists():
        if (out_dir / "checkpoint.pt").exists() or (out_dir / "metrics.json").exists():
            raise ConfigError(f"{out_dir} holds a run without config.yaml; choose another out_dir or delete it")
        return None
    previous = identity(OmegaConf.load(saved))
    current = identity(cfg)
    if previous != current:
        differing = sorted(_diff_keys(previous, current))
        raise ConfigError(
            f"{out_dir} holds a run of a different config (differs in {', '.join(differing[:5])}); "
            "use another out_dir, or delete the folder to start over"
        )
    metrics = out_dir / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: set[str] = set()
        for key in set(a) | set(b):
            keys |= _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return set() if a == b else {prefix.rstrip(".")}


class SignalFlag:
    """Remembers the first SIGINT/SIGTERM so the loop can stop cleanly after the current iteration."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume, or skip if finished) the training run described by ``cfg``; returns its final metrics.

    Under ``torchrun`` every rank calls this; rank 0 alone writes files (see :mod:`kdrepro.distributed`).
    """
    out_dir = Path(cfg.out_dir)
    finished = check_out_dir(out_dir, cfg)
    if finished is not None:
        log.info("%s already holds this finished run (%s); nothing to do", out_dir, _outcome(finished))
        return finished
    budget = resolve_budget(cfg.budget, str(cfg.method.name))
    if str(cfg.get("on_nonfinite", "error")) not in ("error", "record"):
        raise ConfigError(f"on_nonfinite={cfg.on_nonfinite!r}: use on_nonfinite=error or on_nonfinite=record")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dist_context = init_from_environment(str(cfg.device))
    device = resolve_device(str(cfg.device))
    if dist_context.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_context.local_rank)
    batch = int(cfg.loader.batch_size)
    if batch % dist_context.world_size or batch // dist_context.world_size < 2:
        raise ConfigError(
            f"loader.batch_size={batch} is the global batch: it must split into at least 2 images on each of the "
            f"{dist_context.world_size} processes (BatchNorm on the pooled PSP branch needs 2); use a multiple of "
            f"{2 * dist_context.world_size}"
        )
    torch.manual_seed(int(cfg.seed))
    train_set = build_dataset(cfg.dataset, "train", train_transforms=True)
    val_loader = _eval_loader(cfg)
    trainer = Trainer(cfg, device, context=dist_context)

    checkpoint_path = out_dir / "checkpoint.pt"
    step, train_seconds, pretrained, history = 0, 0.0, trainer.distiller.pretrain_iterations == 0, []
    resumed = checkpoint_path.exists()
    if resumed:
        state = load_checkpoint(checkpoint_path)
        trainer.load_state_dict(state)
        restore_rng_state(state["rng"])
        step, train_seconds, pretrained = int(state["step"]), float(state["train_seconds"]), bool(state["pretrained"])
        history = [dict(zip(state["timing_keys"], row, strict=True)) for row in state["timing"].tolist()]
        log.info("resuming %s at step %d (%.1f train seconds)", out_dir, step, train_seconds)
    elif dist_context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.timer.history = history

    live = _open_live(out_dir, resumed) if dist_context.is_main else None
    context = {"cfg": cfg, "budget": budget, "trainer": trainer, "path": checkpoint_path, "dist": dist_context}
    with SignalFlag() as flag:
        if not pretrained:
            train_seconds += _pretrain(trainer, train_set, cfg, flag)
            pretrained = True
        try:
            step, train_seconds = _loop(trainer, train_set, val_loader, cfg, budget, step, train_seconds, live, flag, context)
        except NonFiniteLossError as error:
            if str(cfg.get("on_nonfinite", "error")) != "record":
                raise
            if not dist_context.is_main:
                return {"method": str(cfg.method.name), "miou": None, "diverged": {"step": error.step}, "rank": dist_context.rank}
            return _record_divergence(cfg, out_dir, error, live)
    if not dist_context.is_main:
        barrier(dist_context)  # pairs with rank 0's final checkpoint save
        return {"method": str(cfg.method.name), "miou": None, "iterations": step, "train_seconds": train_seconds,
                "rank": dist_context.rank}
    metrics, _ = validate(trainer, cfg, val_loader)
    summary = summarize(trainer.timer.history, skip=min(5, max(len(trainer.timer.history) - 1, 0)))
    result = {
        **metrics.to_json(class_names(cfg.dataset)),
        "method": str(cfg.method.name),
        "iterations": step,
        "train_seconds": train_seconds,
        "seconds_per_iteration": summary.get("median", {}).get("total"),
        "phase_median_seconds": {k: v for k, v in summary.get("median", {}).items() if k in PHASES},
        "phase_total_seconds": {k: v for k, v in summary.get("total", {}).items() if k in PHASES},
        "budget": {"kind": budget.kind, "iterations": budget.iterations, "seconds": budget.seconds, "source": budget.source},
        "precision": str(cfg.get("precision", "fp32")),
        "device": str(device),
        "world_size": dist_context.world_size,
    }
    _save(context, step, train_seconds, True, finished=True, metrics=result)
    live.log_metric("val/miou", metrics.miou, plot=False)
    live.summary.update({"miou": metrics.miou, "iterations": step, "train_seconds": train_seconds})
    live.end()
    write_json_atomic(out_dir / "metrics.json", result)
    log.info("%s: mIoU %.4f after %d iterations, %.1f train seconds", out_dir, metrics.miou, step, train_seconds)
    return result


def _outcome(metrics: dict[str, Any]) -> str:
    if metrics.get("diverged"):
        return f"diverged at step {metrics['diverged']['step']}"
    return f"mIoU {metrics['miou']:.4f}"


def _record_divergence(cfg: DictConfig, out_dir: Path, error: NonFiniteLossError, live) -> dict[str, Any]:
    """``on_nonfinite=record``: a diverged run is a result (mIoU null, the step and terms recorded), not a failed
    stage, so the other methods' runs and the reports still get built. The weights are non-finite: no checkpoint."""
    result = {
        "method": str(cfg.method.name),
        "miou": None,
        "diverged": {"step": error.step, "terms": error.terms, "message": str(error)},
        "iterations": error.step,
        "train_seconds": None,
        "precision": str(cfg.get("precision", "fp32")),
    }
    if live is not None:
        live.summary.update({"diverged_at_step": error.step})
        live.end()
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    write_json_atomic(out_dir / "metrics.json", result)
    log.warning("%s: %s; recorded as diverged (on_nonfinite=record)", out_dir, error)
    return result


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def _open_live(out_dir: Path, resumed: bool):
    from dvclive import Live

    return Live(str(out_dir / "dvclive"), dvcyaml=False, save_dvc_exp=False, resume=resumed, report=None)


def _pretrain(trainer: Trainer, train_set, cfg: DictConfig, flag: SignalFlag) -> float:
    """The method's pre-training stage (e.g. MasKD's mask tokens), inside the training clock."""
    loader = iter(training_loader(train_set, int(cfg.loader.batch_size), int(cfg.seed) + 1, 0, int(cfg.loader.num_workers)))
    synchronize(trainer.device)
    start = time.perf_counter()
    for _ in range(trainer.distiller.pretrain_iterations):
        images, labels = trainer.to_device(*next(loader))
        trainer.pretrain_step(images, labels)
        if flag.signum is not None:
            raise KdreproError(f"interrupted by signal {flag.signum} during {cfg.method.name} pre-training; rerun to restart it")
    synchronize(trainer.device)
    return time.perf_counter() - start


def _loop(trainer, train_set, val_loader, cfg, budget: Budget, step, train_seconds, live, flag, context):
    loader = iter(
        training_loader(
            train_set, int(cfg.loader.batch_size), int(cfg.seed), step, int(cfg.loader.num_workers), trainer.device.type == "cuda"
        )
    )
    dist = context["dist"]
    log_every, eval_every = max(int(cfg.log_every), 1), int(cfg.eval_every)
    last_save = time.monotonic()
    progress_bar = _progress(budget, step)
    while not budget.exhausted(step, train_seconds):
        result, wall = trainer.timed_step(loader, budget.progress(step, train_seconds), step)
        train_seconds += wall
        if budget.seconds is not None:  # every rank must stop at the same step
            train_seconds = broadcast_float(train_seconds, dist, trainer.device)
        step += 1
        if progress_bar is not None:
            progress_bar.update(1)
        if live is not None and (step % log_every == 0 or budget.exhausted(step, train_seconds)):
            _log_step(live, result, trainer.last_lr, train_seconds, step)
        if eval_every and step % eval_every == 0 and not budget.exhausted(step, train_seconds):
            if live is not None:
                metrics, _ = validate(trainer, cfg, val_loader)
                live.log_metric("val/miou", metrics.miou)
            barrier(dist)
        if any_rank(flag.signum is not None, dist, trainer.device):
            _save(context, step, train_seconds, True)
            raise Interrupted(flag.signum or signal.SIGTERM, step, context["path"])
        if time.monotonic() - last_save > float(cfg.checkpoint_every_seconds):
            _save(context, step, train_seconds, True)
            last_save = time.monotonic()
    if progress_bar is not None:
        progress_bar.close()
    return step, train_seconds


def _log_step(live, result, lr: float, train_seconds: float, step: int) -> None:
    live.step = step
    for name, value in result.losses.items():
        live.log_metric(f"train/{name}", float(value.detach()))
    live.log_metric("train/total", float(result.total.detach()))
    live.log_metric("train/lr", lr)
    live.log_metric("train/seconds", train_seconds)
    live.make_summary()


def _progress(budget: Budget, step: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=budget.iterations, initial=step, desc="train", unit="it", leave=False)


def _save(context, step: int, train_seconds: float, pretrained: bool, finished: bool = False, metrics=None) -> None:
    """Rank 0 writes the checkpoint atomically; every rank waits for it."""
    if not context["dist"].is_main:
        barrier(context["dist"])
        return
    trainer: Trainer = context["trainer"]
    cfg: DictConfig = context["cfg"]
    history = trainer.timer.history
    keys = list(history[0]) if history else [*PHASES, "total"]
    state = {
        "format": FORMAT_VERSION,
        **trainer.state_dict(),
        "step": step,
        "train_seconds": train_seconds,
        "pretrained": pretrained,
        "finished": finished,
        "metrics": metrics,
        "rng": rng_state(),
        "timing_keys": keys,
        "timing": torch.tensor([[record[k] for k in keys] for record in history], dtype=torch.float64).reshape(-1, len(keys)),
        "num_classes": trainer.num_classes,
        "model_cfg": OmegaConf.to_container(cfg.student, resolve=True),
        "config": OmegaConf.to_yaml(cfg, resolve=True),
    }
    save_atomic(state, context["path"])
    barrier(context["dist"])
