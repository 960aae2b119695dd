"""Knowledge-distillation methods, one module per method, built by name from Hydra configs.

Importing this package registers every method. ``build(method_cfg, student_channels, teacher_channels)`` returns
the run's :class:`CompositeDistiller`.
"""

import importlib
import pkgutil

from kdrepro.distill.base import (
    Channels,
    CompositeDistiller,
    Distiller,
    available,
    build,
    build_term,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Channels", "CompositeDistiller", "Distiller", "available", "build", "build_term", "register"]
