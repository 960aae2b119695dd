"""The ``Distiller`` interface and the method registry.

A distillation method is an ``nn.Module`` that reads a student and a teacher :class:`~kdrepro.models.SegOutput` and
returns a dict of named, *already weighted* loss terms. Its own learnable parts (projectors, discriminators, mask
tokens) and state (memory banks, as buffers) live inside it, so they are checkpointed with the student and are
inside the method's measured cost. The training loop knows nothing about any particular method.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

#: ``channels`` passed to methods: feature name -> number of channels, plus ``"logits"`` -> number of classes.
Channels = Mapping[str, int]


class Distiller(nn.Module):
    """Base class of every KD method.

    Subclasses implement :meth:`forward`. The optional hooks below let a method declare hidden costs honestly:

    * ``extra_step`` -- an update of modules with their *own* optimizer (e.g. SKD's WGAN-GP discriminator), run by
      the loop after the student's optimizer step and timed inside the method's distillation phase.
    * ``before_optimizer_step`` -- called after backward and before the student's optimizer step (e.g. Af-DCD's
      gradient clipping), timed in the optimizer phase.
    * ``pretrain_iterations`` / ``pretrain_step`` -- a stage run before distillation starts (e.g. MasKD's mask-token
      pre-training on the frozen teacher); the loop runs it inside the training clock, so budgets pay for it.

    Attributes:
        needs_teacher_aux: the method reads the teacher's auxiliary logits, so the loop keeps the teacher's FCN
            auxiliary head on in eval mode (e.g. MasKD's 0.4-weighted aux term).
    """

    needs_teacher_aux: bool = False
    pretrain_iterations: int = 0

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        """Return ``{term_name: weighted scalar loss}``.

        Args:
            student: the student's output (with gradients).
            teacher: the frozen teacher's output (no gradients).
            target: ``(B, H, W)`` int64 labels at input resolution, ignore index 255.
        """
        raise NotImplementedError

    def student_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters optimised together with the student (projectors, ...). Default: all but ``own_optimizer`` ones."""
        owned = {id(p) for p in self.separately_optimized_parameters()}
        return (p for p in self.parameters() if id(p) not in owned)

    def separately_optimized_parameters(self) -> list[nn.Parameter]:
        """Parameters that ``extra_step`` updates with the method's own optimizer (not the student's)."""
        return []

    def before_optimizer_step(self) -> None:
        """Hook between backward and the student's optimizer step (gradients are populated)."""

    def extra_step(self, student: SegOutput, teacher: SegOutput, progress: float | None = None) -> dict[str, Any]:
        """One update of separately optimised modules, given *detached* outputs and the training progress in [0, 1]
        (for the module's own LR schedule). Returns scalars to log (tensors are fine: no device sync is forced)."""
        return {}

    def pretrain_step(self, teacher: SegOutput, target: Tensor) -> dict[str, float]:
        """One pre-training iteration on the frozen teacher's output (only if ``pretrain_iterations > 0``)."""
        raise NotImplementedError(f"{type(self).__name__} declares no pre-training stage")

    def extra_state(self) -> dict[str, Any]:
        """State outside ``state_dict`` (e.g. the method's own optimizer), saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""


DistillerFactory = Callable[..., Distiller]
_REGISTRY: dict[str, DistillerFactory] = {}
_SOURCES: dict[str, Path | None] = {}  # name -> file that defined the registered factory, read when it registered
_FIXED_ARGUMENTS = ("student_channels", "teacher_channels")


def register(name: str) -> Callable[[DistillerFactory], DistillerFactory]:
    """Make a method buildable by ``name``: ``@register("name")`` on a :class:`Distiller` subclass, or
    ``register("name")(factory)`` for a class or a function returning a Distiller. Returns the factory unchanged.

    ``name`` is the term name that method configs list under ``terms:``; it must be a Python identifier and unique.
    Registering the same definition again (a module reloaded, or one file imported under two module names) replaces
    it; another definition under a taken name is a :class:`ConfigError`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"distillation method name {name!r} must be a Python identifier, e.g. 'my_method'")

    def decorator(factory: DistillerFactory) -> DistillerFactory:
        if not callable(factory) or (isinstance(factory, type) and not issubclass(factory, Distiller)):
            raise ConfigError(
                f"register({name!r}) needs a subclass of kdrepro.distill.Distiller (or a function returning one), "
                f"got {factory!r}"
            )
        previous, source = _REGISTRY.get(name), _source_file(factory)
        if previous is not None and not _same_definition(previous, _SOURCES.get(name), factory, source):
            raise ConfigError(
                f"distillation method {name!r} is already registered by {_origin(previous)}; register "
                f"{_origin(factory)} under another name and list that name under terms: in its method config"
            )
        _REGISTRY[name], _SOURCES[name] = factory, source
        return factory

    return decorator


def _origin(factory: DistillerFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def _source_file(factory: DistillerFactory) -> Path | None:
    module = sys.modules.get(getattr(factory, "__module__", ""))
    path = getattr(module, "__file__", None)
    return Path(path).resolve() if path else None


def _same_definition(first: DistillerFactory, first_source: Path | None, second: DistillerFactory, second_source: Path | None) -> bool:
    """Whether two factories are one definition: same qualified name, and same source file (same module name
    where a source file is unknown)."""
    if getattr(first, "__qualname__", None) != getattr(second, "__qualname__", None):
        return False
    if first_source is not None and second_source is not None:
        return first_source == second_source
    return getattr(first, "__module__", None) == getattr(second, "__module__", None)


def available() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)


def build_term(name: str, options: Mapping[str, Any], student_channels: Channels, teacher_channels: Channels) -> Distiller:
    """Build one registered method from its options (``weight`` and method-specific keys)."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(
            f"unknown distillation method {name!r}; known methods: {', '.join(available())}. A method of your own "
            f"registers itself with @kdrepro.distill.register({name!r}) when its module is imported: list the folder "
            "that holds it under plugins"
        )
    _check_options(name, factory, options)
    try:
        built = factory(student_channels=dict(student_channels), teacher_channels=dict(teacher_channels), **options)
    except TypeError as error:
        raise ConfigError(f"bad options for distillation method {name!r}: {error}") from error
    if not isinstance(built, Distiller):
        raise ConfigError(f"distillation method {name!r} ({_origin(factory)}) returned {type(built).__name__}, not a Distiller")
    return built


def _check_options(name: str, factory: DistillerFactory, options: Mapping[str, Any]) -> None:
    """A :class:`ConfigError` listing the valid options if ``options`` do not fit the factory's signature."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: the call itself will tell
        return
    try:
        signature.bind(**dict.fromkeys(_FIXED_ARGUMENTS), **options)
    except TypeError as error:
        valid = [
            parameter.name
            for parameter in signature.parameters.values()
            if parameter.name not in _FIXED_ARGUMENTS and parameter.kind is not parameter.VAR_KEYWORD
        ]
        raise ConfigError(
            f"bad options for distillation method {name!r}: {error}; valid options: {', '.join(valid) or 'none'}"
        ) from error


class CompositeDistiller(Distiller):
    """Several weighted methods trained together (e.g. the published ``cwd+kd`` rows).

    Loss names are prefixed with the term's name unless there is a single term, e.g. ``{"kd": ..., "cwd": ...}``.
    """

    def __init__(self, terms: Mapping[str, Distiller]):
        super().__init__()
        self.terms = nn.ModuleDict(dict(terms))
        self.needs_teacher_aux = any(term.needs_teacher_aux for term in self.terms.values())
        self.pretrain_iterations = max((term.pretrain_iterations for term in self.terms.values()), default=0)

    def forward(self, student: SegOutput, teacher: SegOutput, target: Tensor) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        for name, term in self.terms.items():
            for key, value in term(student, teacher, target).items():
                losses[key if key.startswith(name) else f"{name}.{key}"] = value
        return losses

    def separately_optimized_parameters(self) -> list[nn.Parameter]:
        return [p for term in self.terms.values() for p in term.separately_optimized_parameters()]

    def before_optimizer_step(self) -> None:
        for term in self.terms.values():
            term.before_optimizer_step()

    def extra_step(self, student: SegOutput, teacher: SegOutput, progress: float | None = None) -> dict[str, Any]:
        logs: dict[str, Any] = {}
        for name, term in self.terms.items():
            logs.update({f"{name}.{key}": value for key, value in term.extra_step(student, teacher, progress=progress).items()})
        return logs

    def pretrain_step(self, teacher: SegOutput, target: Tensor) -> dict[str, float]:
        logs: dict[str, float] = {}
        for name, term in self.terms.items():
            if term.pretrain_iterations > 0:
                logs.update({f"{name}.{key}": value for key, value in term.pretrain_step(teacher, target).items()})
        return logs

    def extra_state(self) -> dict[str, Any]:
        return {name: term.extra_state() for name, term in self.terms.items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, term in self.terms.items():
            term.load_extra_state(state.get(name, {}))


def build(method_cfg: Mapping[str, Any], student_channels: Channels, teacher_channels: Channels) -> CompositeDistiller:
    """Build the distiller of a run from its method config ``{name: ..., terms: {method: {weight: ..., ...}}}``.

    An empty ``terms`` mapping is the student-alone baseline (``none``).
    """
    terms = method_cfg.get("terms") or {}
    built = {name: build_term(name, dict(options or {}), student_channels, teacher_channels) for name, options in terms.items()}
    return CompositeDistiller(built)


def require_same_classes(
    method: str, student_channels: Channels, teacher_channels: Channels, fix: str = "use models built for one dataset"
) -> int:
    """The shared class count of student and teacher; a :class:`ConfigError` naming ``method`` and ``fix`` if not."""
    student, teacher = student_channels["logits"], teacher_channels["logits"]
    if student != teacher:
        raise ConfigError(f"{method} needs the same classes in student ({student}) and teacher ({teacher}); {fix}")
    return int(student)


def require_feature(method: str, feature: str, student_channels: Channels, teacher_channels: Channels) -> None:
    """A :class:`ConfigError` naming ``method`` if student or teacher does not produce the feature map ``feature``."""
    if feature == "logits" or feature not in student_channels or feature not in teacher_channels:
        known = ", ".join(sorted(name for name in student_channels if name in teacher_channels and name != "logits"))
        raise ConfigError(f"{method} feature {feature!r} is not produced by the models; use one of {known}")


def require_positive(method: str, **values: float | None) -> None:
    """A :class:`ConfigError` naming ``method`` and the option for any value that is not > 0 (``None``: unset, skipped)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{method} option {name} must be positive, got {value}; fix it in the method config")


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero on ``like``'s device that still joins the autograd graph."""
    return like.sum() * 0.0


def softmax_kl_terms(student_scores: Tensor, teacher_scores: Tensor, dim: int, temperature: float = 1.0) -> Tensor:
    """The elementwise terms ``p_t · (log p_t − log p_s)`` of ``KL(softmax(t/T) ‖ softmax(s/T))`` along ``dim``.

    Not reduced: summing them over ``dim`` gives the KL of every distribution, and each method reduces the rest its
    own way (pixel mean, per-image sum, total). ``T = 1`` divides by nothing.
    """
    if temperature != 1.0:
        student_scores, teacher_scores = student_scores / temperature, teacher_scores / temperature
    log_p_student = F.log_softmax(student_scores, dim=dim)
    log_p_teacher = F.log_softmax(teacher_scores, dim=dim)
    return log_p_teacher.exp() * (log_p_teacher - log_p_student)


__all__ = [
    "Channels", "CompositeDistiller", "Distiller", "available", "build", "build_term", "register", "require_feature",
    "require_positive", "require_same_classes", "softmax_kl_terms", "zero_loss",
]
