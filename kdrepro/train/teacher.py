"""``kdrepro teacher`` and ``kdrepro import-teacher``: the teacher trained alone, or mapped from an mmsegmentation
checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrepro.config import load_config, trained_alone
from kdrepro.io import checkpoint_dict, save_checkpoint
from kdrepro.models import build_segmentor
from kdrepro.models.weights import import_mmseg_checkpoint
from kdrepro.train.seeds import train_seeds


def teacher(overrides: list[str]) -> dict[str, Any]:
    """Import ``teacher_import`` if set, else train ``model@teacher`` alone for ``teacher_iterations``."""
    cfg = load_config(overrides)
    if cfg.get("teacher_import"):
        output = Path(str(cfg.out_dir)) / "checkpoint.pt"
        cfg.import_teacher.output = str(output)
        import_teacher(cfg, Path(str(cfg.teacher_import)))
        return {"imported": str(cfg.teacher_import), "checkpoint": str(output)}
    (metrics,) = train_seeds(teacher_run(cfg))
    return {key: metrics.get(key) for key in ("miou", "iterations", "train_seconds")}


def teacher_run(cfg: DictConfig) -> DictConfig:
    """The teacher's training run: ``model@teacher`` alone for ``teacher_iterations``, evaluated at its end only
    (``eval_points: 0``: no report draws a teacher's learning curve, and evaluations do not change the weights, so
    the profile's ``eval_points`` is no part of the teacher's identity and changing it does not retrain the teacher)."""
    return trained_alone(cfg, cfg.teacher, int(cfg.teacher_iterations), int(cfg.teacher_seed),
                         {"progress.stage": "teacher", "speed.role": "teacher", "eval_points": 0})


def import_teacher(cfg: Any, mmseg_path: Path) -> Path:
    """``kdrepro import-teacher``: map an mmsegmentation PSPNet/DeepLabV3 checkpoint onto ``model@teacher`` (strictly)
    and save it as a kdrepro checkpoint at ``cfg.import_teacher.output``."""
    model_cfg = {**OmegaConf.to_container(cfg.teacher, resolve=True), "pretrained": None}  # all weights from the file
    model = build_segmentor(model_cfg, int(cfg.dataset.num_classes))
    import_mmseg_checkpoint(mmseg_path, model)
    output = Path(str(cfg.import_teacher.output))
    state = checkpoint_dict(model.state_dict(), int(cfg.dataset.num_classes), model_cfg, finished=True, source=str(mmseg_path))
    save_checkpoint(state, output)
    return output
