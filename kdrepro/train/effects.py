"""What changing one config key must redo: retrain a run, re-calibrate a method's cost, both, or neither.

One table, :data:`EFFECTS`, classifies every key of a composed config (``kdrepro/conf``); a key is looked up by its
dotted path, then by its parents (``dataset.crop_size``, else ``dataset``). The two derived views are

* :func:`result_view` -- what defines a run's *result* (``config.yaml`` of a run folder is compared on it: a
  difference retrains, with ``on_config_change=archive`` in the pipeline);
* :func:`cost_view` -- what sets a method's *cost per iteration* (the calibration fingerprint hashes it: a difference
  re-measures that method, and a new measurement retrains its compute-matched runs through ``budget.json`` and its
  ``calibration/<method>.json``).

A key missing from the table counts as both (the safe side); ``tests/train/test_effects.py`` checks that every key
of every profile and method is classified. Methods that train the student alone (``method=none``) ignore the
teacher: its model and checkpoint are in neither view.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Changing the key changes what a run computes.
RETRAIN = "retrain"
#: Changing the key changes what an iteration costs.
RECALIBRATE = "recalibrate"
BOTH = frozenset({RETRAIN, RECALIBRATE})
ONLY_RETRAIN = frozenset({RETRAIN})
ONLY_RECALIBRATE = frozenset({RECALIBRATE})
NEITHER: frozenset[str] = frozenset()

EFFECTS: dict[str, frozenset[str]] = {
    # what is trained, on what, and how a step runs: both
    "dataset": BOTH,
    "dataset.root": ONLY_RETRAIN,          # where the images are; not what a step costs
    "dataset.generate": ONLY_RETRAIN,      # how many generated images (the crop and batch set the cost)
    "student": BOTH,
    "student.pretrained": ONLY_RETRAIN,    # the file the backbone starts from
    "teacher": BOTH,
    "teacher.pretrained": ONLY_RETRAIN,
    "method": BOTH,
    "method.family": NEITHER,              # report metadata
    "method.display_name": NEITHER,
    "method.reproduces": NEITHER,
    "precision": BOTH,
    "channels_last": BOTH,
    "sync_bn": BOTH,
    "compile": BOTH,
    "memory_bank_scale": BOTH,
    "aux_weight": BOTH,                    # 0 skips the auxiliary loss
    "loader": BOTH,
    "loader.num_workers": NEITHER,         # the batches are a pure function of (seed, epoch, index)
    # what is trained, not what a step costs: retrain only
    "seed": ONLY_RETRAIN,
    "seeds": NEITHER,                      # one run per seed: each seed's run has its own `seed`
    "optim": ONLY_RETRAIN,
    "budget": ONLY_RETRAIN,
    "budget.allow_world_size_mismatch": NEITHER,   # flags that accept a calibration; its content is hashed
    "budget.allow_calibration_mismatch": NEITHER,
    "budget.allow_device_type_mismatch": NEITHER,
    "reference_iterations": ONLY_RETRAIN,
    "teacher_checkpoint": ONLY_RETRAIN,    # its content is hashed too (inputs.json)
    "eval_points": ONLY_RETRAIN,           # validation during training: the learning curves' points (the teacher and
                                           # pre-training evaluate at their end only: not theirs)
    "eval_every": ONLY_RETRAIN,
    "eval_batch_size": ONLY_RETRAIN,
    "plugins": ONLY_RETRAIN,               # a plugin's code is hashed into the fingerprint on its own
    "profile_name": ONLY_RETRAIN,
    "on_nonfinite": NEITHER,
    # the machine: what a step costs, not what it computes
    "device": ONLY_RECALIBRATE,
    "threads": ONLY_RECALIBRATE,
    "calibrate": NEITHER,
    "calibrate.warmup": ONLY_RECALIBRATE,  # the timing protocol
    "calibrate.rounds": ONLY_RECALIBRATE,
    "calibrate.iterations_per_round": ONLY_RECALIBRATE,
    "calibrate.clock": ONLY_RECALIBRATE,   # CPU or wall time: what a measured second is
    # where things go, how often to log or save, other commands' settings: neither
    "out_dir": NEITHER,
    "log_every": NEITHER,
    "checkpoint_every_seconds": NEITHER,
    "on_config_change": NEITHER,
    "allow_changed_inputs": NEITHER,
    "teacher_seed": NEITHER,               # the teacher stage's
    "teacher_iterations": NEITHER,
    "teacher_import": NEITHER,
    "import_teacher": NEITHER,
    "pretrain": ONLY_RETRAIN,              # how the backbones a run starts from were made (their files' content
                                           # is not hashed: the settings stand for it)
    "which": NEITHER,
    "evaluate": NEITHER,
    "verdict": NEITHER,                    # read by `kdrepro results` only
    "speed": NEITHER,                      # how `auto` settings are decided; the decided precision, channels_last and
                                           # threads are the keys above
    "progress": NEITHER,                   # how often a log line is printed
    "runs_dir": NEITHER,
    "results_dir": NEITHER,
}

#: Config parts a method that trains the student alone never reads.
TEACHER_KEYS = ("teacher", "teacher_checkpoint")


def effect(path: str) -> frozenset[str]:
    """The classification of the dotted config key ``path`` (its nearest classified parent's; BOTH if none)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = EFFECTS.get(".".join(parts[:end]))
        if found is not None:
            return found
    return BOTH


def _view(node: Any, aspect: str, prefix: str) -> Any:
    if not isinstance(node, Mapping):
        return node
    kept = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in EFFECTS and aspect not in EFFECTS[path] and not _has_classified_child(path, aspect):
            continue
        if isinstance(value, Mapping):
            kept[key] = _view(value, aspect, f"{path}.")
        elif aspect in effect(path):
            kept[key] = value
    return kept


def _has_classified_child(path: str, aspect: str) -> bool:
    return any(key.startswith(f"{path}.") and aspect in value for key, value in EFFECTS.items())


def uses_teacher(config: Mapping[str, Any]) -> bool:
    """Whether the method of a config (a plain container) distils from a teacher (it lists loss terms)."""
    method = config.get("method") or {}
    return bool(method.get("terms")) if isinstance(method, Mapping) else True


def _without_teacher(config: dict[str, Any]) -> dict[str, Any]:
    if uses_teacher(config):
        return config
    return {key: value for key, value in config.items() if key not in TEACHER_KEYS}


def result_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config (a plain container) that defines a run's result."""
    return _without_teacher(_view(config, RETRAIN, ""))


def cost_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config (a plain container) that sets a method's cost per iteration."""
    return _without_teacher(_view(config, RECALIBRATE, ""))


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf of a nested mapping."""
    if not isinstance(node, Mapping) or not node:
        return [prefix.rstrip(".")] if prefix else []
    return [path for key, value in node.items() for path in leaf_keys(value, f"{prefix}{key}.")]
