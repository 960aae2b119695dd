"""Knowledge-distillation methods, one module per method, built by name from Hydra configs.

Importing this package registers every method in it. ``build(method_cfg, student_channels, teacher_channels)``
returns the run's :class:`CompositeDistiller`: one term per key of the method config's ``terms:`` mapping, each
built by the factory registered under that key, with that key's options as keyword arguments.

**A method of your own** lives in any module, inside or outside this package; importing the module is all it takes
to make it buildable::

    import torch
    from kdrepro.distill import Distiller, register

    @register("mymethod")                   # the term name that method configs list under ``terms:``
    class MyMethod(Distiller):
        def __init__(self, student_channels, teacher_channels, weight=1.0):
            super().__init__()
            self.weight = weight
            self.projector = torch.nn.Conv2d(student_channels["decoder"], teacher_channels["decoder"], 1)

        def forward(self, student, teacher, target):  # SegOutput, SegOutput, (B, H, W) labels
            projected = self.projector(student.features["decoder"])
            loss = torch.nn.functional.mse_loss(projected, teacher.features["decoder"])
            return {"mymethod": self.weight * loss}

``register("mymethod")(MyMethod)`` is the same registration as a plain call. The contract:

* ``__init__`` takes ``student_channels`` and ``teacher_channels`` as keywords (feature name -> channels for
  ``c1``..``c4`` and ``decoder``, plus ``logits`` -> number of classes), then the method's options as keyword
  arguments: exactly the keys of ``terms.<name>`` in the method config (``weight`` among them). Options that do not
  fit the signature are a one-line :class:`~kdrepro.errors.ConfigError` listing the valid ones; so is a name that no
  imported module registered.
* ``forward(student, teacher, target)`` reads two :class:`~kdrepro.models.SegOutput` (``logits``, ``aux_logits``,
  ``features``) and the ``(B, H, W)`` labels (ignore index 255) and returns ``{loss name: weighted scalar}``.
  Trainable parts are submodules (trained with the student, checkpointed); state such as memory banks are buffers.
* Hidden costs are declared through the :class:`Distiller` hooks (``extra_step``, ``pretrain_iterations`` /
  ``pretrain_step``, ``before_optimizer_step``, ``needs_teacher_aux``), so calibration measures them.
* Names are Python identifiers, unique across everything imported. Registering the same class again (a module
  reloaded, or one file imported under two module names) replaces it; another class under a taken name is a
  :class:`~kdrepro.errors.ConfigError`.
* ``available()`` lists the registered names. The shared checks (``require_feature``, ``require_same_classes``,
  ``require_positive``) and loss helpers (``softmax_kl_terms``, ``zero_loss``) are exported here too.
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
    require_feature,
    require_positive,
    require_same_classes,
    softmax_kl_terms,
    zero_loss,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Channels", "CompositeDistiller", "Distiller", "available", "build", "build_term", "register", "require_feature",
    "require_positive", "require_same_classes", "softmax_kl_terms", "zero_loss",
]
