"""The method-agnostic training step, shared by ``kdrepro train`` and ``kdrepro calibrate``.

One :class:`Trainer` holds a student, an optional frozen teacher, the run's :class:`~kdrepro.distill.Distiller`
and the student's SGD optimiser. :meth:`Trainer.step` is one iteration: teacher forward (``inference_mode``), student
forward with CE + 0.4·aux CE (ignore 255, logits upsampled to the label size as in mmsegmentation), the KD terms,
backward, SGD step at the poly LR for the given progress, then the method's own extra update. Each phase is timed.
Calibration times exactly this code, so the measured cost is the cost of the real training step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdrepro import distill
from kdrepro.config import import_plugins
from kdrepro.distributed import DistributedContext, average_gradients, shard, wrap_student
from kdrepro.errors import ConfigError, KdreproError, MethodCodeError
from kdrepro.models import SegOutput, build_segmentor, resize_logits
from kdrepro.models.loading import load_model
from kdrepro.train.budget import poly_lr
from kdrepro.train.timing import PhaseTimer, process_seconds, synchronize


class NonFiniteLossError(KdreproError):
    """A loss became NaN or infinite at ``step`` in ``terms``."""

    def __init__(self, message: str, step: int = 0, terms: list[str] | None = None):
        super().__init__(message)
        self.step = step
        self.terms = list(terms or [])


def check_decided(cfg: DictConfig) -> None:
    """Refuse a config whose speed settings are still ``auto``: `kdrepro train` and `kdrepro calibrate` decide them
    (:func:`kdrepro.train.hardware.apply_speed`) before building a trainer; code building one directly must too."""
    undecided = [key for key in ("precision", "channels_last", "threads") if cfg.get(key) == "auto"]
    if undecided:
        raise ConfigError(
            f"{', '.join(undecided)}=auto is not decided yet; call kdrepro.train.hardware.apply_speed(cfg) before "
            "building a Trainer (kdrepro train and calibrate do), or set the value explicitly"
        )


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"unknown precision {precision!r}; use precision=fp32 or precision=bf16")


def clone_output(output: SegOutput) -> SegOutput:
    """Copy inference-mode tensors into ordinary ones (losses may save them for backward)."""
    return SegOutput(
        logits=output.logits.clone(),
        aux_logits=None if output.aux_logits is None else output.aux_logits.clone(),
        features={name: value.clone() for name, value in output.features.items()},
    )


def method_uses_teacher(method_cfg: Any) -> bool:
    return bool(method_cfg.get("terms"))


def check_method(cfg: DictConfig) -> None:
    """Build the method's distiller on the ``meta`` device (no memory, no weights read): a bad option is its
    one-line :class:`ConfigError` before anything in a run folder is touched."""
    import_plugins([Path(str(folder)) for folder in cfg.get("plugins") or ()])
    num_classes = int(cfg.dataset.num_classes)
    with torch.device("meta"):
        student = build_segmentor({**_model_cfg(cfg.student), "pretrained": None}, num_classes)
        teacher = build_segmentor({**_model_cfg(cfg.teacher), "pretrained": None}, num_classes) if method_uses_teacher(cfg.method) else student
        with method_code(str(cfg.method.name), "building it", cfg):
            distill.build(OmegaConf.to_container(cfg.method, resolve=True), student.channels, teacher.channels)


@contextlib.contextmanager
def method_code(method: str, doing: str, cfg: DictConfig) -> Iterator[None]:
    """Turn an exception of a method's own code (not a :class:`KdreproError`) into a one-line
    :class:`MethodCodeError` naming the method and the file and line in its folder (a plugin folder, or
    ``kdrepro/distill``); the original stays its cause (``kdrepro -v``, ``<out_dir>/error.log``)."""
    try:
        yield
    except KdreproError:
        raise
    except Exception as error:
        folders = [Path(distill.__file__).parent, *(Path(str(f)) for f in cfg.get("plugins") or ())]
        raise MethodCodeError.wrap(error, method, doing, folders) from error


def _model_cfg(model: Any) -> dict[str, Any]:
    container = OmegaConf.to_container(model, resolve=True)
    assert isinstance(container, dict)
    return container


def load_teacher(cfg: DictConfig, num_classes: int, device: torch.device, untrained: bool = False) -> nn.Module:
    """Build the teacher ``cfg.teacher_checkpoint`` describes (strictly, safely read); frozen and in eval mode.
    Without a checkpoint, ``untrained=True`` builds the teacher's architecture with its initial weights (what timing
    needs: a dense network's cost per iteration does not depend on its weights); otherwise a one-line error."""
    if not cfg.get("teacher_checkpoint"):
        if not untrained:
            raise ConfigError(
                f"method {cfg.method.name!r} needs a teacher: set teacher_checkpoint=<path to checkpoint.pt> "
                "(train one with `kdrepro train method=none model@student=<teacher model>` or `kdrepro import-teacher`)"
            )
        teacher = build_segmentor({**_model_cfg(cfg.teacher), "pretrained": None}, num_classes)
    else:
        teacher = load_model(
            Path(str(cfg.teacher_checkpoint)), num_classes, str(cfg.dataset.name),
            model_cfg=OmegaConf.to_container(cfg.teacher, resolve=True), fix="use a teacher trained on this dataset",
        )
    teacher.to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@dataclass
class StepResult:
    """One iteration's loss terms, their sum, and what the method's extra step returned (e.g. SKD's critic loss)."""

    losses: dict[str, Tensor]
    total: Tensor
    logs: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Student + teacher + distiller + optimiser for one run (or one calibrated method)."""

    def __init__(
        self,
        cfg: DictConfig,
        device: torch.device,
        teacher: nn.Module | None = None,
        context: DistributedContext | None = None,
    ):
        check_decided(cfg)
        self.cfg = cfg
        self.device = device
        self.context = context or DistributedContext()
        self.num_classes = int(cfg.dataset.num_classes)
        self.ignore_index = int(cfg.dataset.ignore_index)
        self.aux_weight = float(cfg.aux_weight)
        self.memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
        self.student = build_segmentor(OmegaConf.to_container(cfg.student, resolve=True), self.num_classes)
        self.student.to(device, memory_format=self.memory_format).train()
        if self.context.enabled and cfg.get("sync_bn"):
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        #: what the step calls: the student, or its DistributedDataParallel wrapper under torchrun
        self.model = wrap_student(self.student, self.context, device)
        self.teacher: nn.Module | None = None
        if method_uses_teacher(cfg.method):
            self.teacher = teacher if teacher is not None else load_teacher(cfg, self.num_classes, device)
            self.teacher.to(memory_format=self.memory_format)
        teacher_channels = self.teacher.channels if self.teacher is not None else self.student.channels
        import_plugins([Path(str(folder)) for folder in cfg.get("plugins") or ()])  # your own methods register
        with method_code(str(cfg.method.name), "building it", cfg):
            self.distiller = distill.build(
                OmegaConf.to_container(cfg.method, resolve=True), self.student.channels, teacher_channels
            ).to(device)
        self.distiller.train()
        if self.context.enabled and cfg.get("sync_bn"):
            self.distiller = nn.SyncBatchNorm.convert_sync_batchnorm(self.distiller)
        parameters = [p for p in self.student.parameters() if p.requires_grad]
        parameters += [p for p in self.distiller.student_parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            parameters,
            lr=float(cfg.optim.lr),
            momentum=float(cfg.optim.momentum),
            weight_decay=float(cfg.optim.weight_decay),
            # one fused kernel for the whole update on GPUs; torch's default (foreach where available) elsewhere
            **({"fused": True} if device.type == "cuda" else {}),
        )
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest conv algorithms once
        if cfg.get("compile"):
            self.model = torch.compile(self.model)
        self.precision = str(cfg.get("precision", "fp32"))
        autocast_context(device, self.precision)  # validates the name early
        self.timer = PhaseTimer(device)
        #: ``torch.inference_mode`` for speed; FLOP counting swaps in ``torch.no_grad`` (inference mode bypasses
        #: Python dispatch modes, so the teacher's FLOPs would go uncounted).
        self.teacher_grad_context = torch.inference_mode
        self.last_lr = float(cfg.optim.lr)

    # -- pieces -------------------------------------------------------------------------------------------------
    def set_progress(self, progress: float) -> float:
        lr = poly_lr(float(self.cfg.optim.lr), progress, float(self.cfg.optim.power), float(self.cfg.optim.min_lr))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr = lr
        return lr

    def teacher_forward(self, images: Tensor) -> SegOutput | None:
        if self.teacher is None:
            return None
        # the teacher may be shared (calibration): its auxiliary head runs only for methods that read it
        self.teacher.aux_in_eval = self.distiller.needs_teacher_aux
        with self.teacher_grad_context(), autocast_context(self.device, self.precision):
            output = self.teacher(images)
        return clone_output(output).float()

    def task_losses(self, output: SegOutput, labels: Tensor) -> dict[str, Tensor]:
        size = tuple(labels.shape[-2:])
        losses = {"ce": F.cross_entropy(resize_logits(output.logits.float(), size), labels, ignore_index=self.ignore_index)}
        if output.aux_logits is not None and self.aux_weight > 0:
            aux = F.cross_entropy(resize_logits(output.aux_logits.float(), size), labels, ignore_index=self.ignore_index)
            losses["aux_ce"] = self.aux_weight * aux
        return losses

    def to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=non_blocking)

    # -- one iteration --------------------------------------------------------------------------------------------
    def step(self, images: Tensor, labels: Tensor, progress: float) -> StepResult:
        """One training iteration on a batch already on the device; timed phase by phase by ``self.timer``."""
        timer = self.timer
        self.set_progress(progress)
        teacher_output = None
        if self.teacher is not None:
            with timer.phase("teacher"):
                teacher_output = self.teacher_forward(images)
        with timer.phase("student"), autocast_context(self.device, self.precision):
            student_output = self.model(images)
            losses = self.task_losses(student_output, labels)
        with timer.phase("distill"):
            if teacher_output is not None:
                with autocast_context(self.device, self.precision), self.method_code("its forward"):
                    kd_terms = self.distiller(student_output.float(), teacher_output, labels)
                losses.update({name: value.float() for name, value in kd_terms.items()})
            total = torch.stack(list(losses.values())).sum()
        with timer.phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            average_gradients(self.distiller.student_parameters(), self.context)
        with timer.phase("optimizer"):
            with self.method_code("its before_optimizer_step"):
                self.distiller.before_optimizer_step()
            self.optimizer.step()
        logs: dict[str, Any] = {}
        if teacher_output is not None:
            with timer.phase("method_step"):
                with self.method_code("its extra_step"):
                    logs = self.distiller.extra_step(student_output.detach().float(), teacher_output, progress=progress)
        return StepResult(losses, total, logs)

    def timed_step(self, batches, progress: float, step_index: int = 0) -> tuple[StepResult, float]:
        """Fetch the next batch and train on it; returns the result and the iteration's synchronised wall time.

        This is the unit both the training loop and calibration measure: data wait + every phase of :meth:`step`.
        """
        synchronize(self.device)
        start, cpu_start = time.perf_counter(), process_seconds()
        with self.timer.phase("data"):
            images, labels = next(batches)
            images, labels = self.to_device(shard(images, self.context), shard(labels, self.context))
        result = self.step(images, labels, progress)
        self.check_finite(result, step_index)
        synchronize(self.device)
        wall = time.perf_counter() - start
        self.timer.end_iteration(wall, process_seconds() - cpu_start)
        return result, wall

    def check_finite(self, result: StepResult, step_index: int) -> None:
        if math.isfinite(float(result.total.detach())):
            return
        bad = [name for name, value in result.losses.items() if not math.isfinite(float(value.detach()))]
        raise NonFiniteLossError(
            f"loss became non-finite at step {step_index} in term(s) {', '.join(bad) or 'total'}; "
            "lower optim.lr or the term's weight and train into a new out_dir",
            step=step_index,
            terms=bad,
        )

    def pretrain_step(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        teacher_output = self.teacher_forward(images)
        assert teacher_output is not None
        with self.method_code("its pretrain_step"):
            return self.distiller.pretrain_step(teacher_output, labels)

    def method_code(self, doing: str) -> contextlib.AbstractContextManager[None]:
        """Exceptions of the method's own code become one :class:`MethodCodeError` line (file, line, method)."""
        return method_code(str(self.cfg.method.name), doing, self.cfg)

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.student.state_dict(),
            "distiller": self.distiller.state_dict(),
            "distiller_extra": self.distiller.extra_state(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        self.distiller.load_state_dict(state["distiller"])
        self.distiller.load_extra_state(state.get("distiller_extra", {}))
        self.optimizer.load_state_dict(state["optimizer"])


