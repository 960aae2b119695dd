"""Checkpoint-level commands: ``kdrepro evaluate`` and ``kdrepro import-teacher``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kdrepro.data import build_dataset, class_names
from kdrepro.errors import ConfigError
from kdrepro.evaluate import evaluate
from kdrepro.models import build_segmentor
from kdrepro.train.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic
from kdrepro.train.trainer import resolve_device


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.evaluate.checkpoint`` on the validation split of ``cfg.dataset``; writes and returns JSON."""
    path = cfg.evaluate.get("checkpoint")
    if not path:
        raise ConfigError("set evaluate.checkpoint=<run folder>/checkpoint.pt")
    state = load_checkpoint(Path(path))
    num_classes = int(cfg.dataset.num_classes)
    if int(state.get("num_classes", -1)) != num_classes:
        raise ConfigError(
            f"{path} predicts {state.get('num_classes')} classes but dataset {cfg.dataset.name!r} has {num_classes}; pick the matching dataset"
        )
    model = build_segmentor(state["model_cfg"], num_classes)
    model.load_state_dict(state["model"])
    device = resolve_device(str(cfg.device))
    model.to(device)
    loader = torch.utils.data.DataLoader(build_dataset(cfg.dataset, "val", train_transforms=False), batch_size=1)
    metrics, _ = evaluate(
        model, loader, num_classes, int(cfg.dataset.ignore_index), mode=str(cfg.dataset.eval_mode),
        slide_crop=list(cfg.dataset.slide_crop), slide_stride=list(cfg.dataset.slide_stride), device=device,
    )
    result = {**metrics.to_json(class_names(cfg.dataset)), "checkpoint": str(path), "dataset": str(cfg.dataset.name), "eval_mode": str(cfg.dataset.eval_mode)}
    output = Path(cfg.evaluate.get("output") or Path(path).parent / f"eval_{cfg.dataset.name}.json")
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(output)
    return result


def import_teacher(cfg: DictConfig, mmseg_path: Path) -> Path:
    """Map an mmsegmentation PSPNet/DeepLabV3 checkpoint onto ``model@teacher`` and save a kdrepro checkpoint."""
    from kdrepro.models.weights import import_mmseg_checkpoint

    model_cfg = OmegaConf.to_container(cfg.teacher, resolve=True)
    model = build_segmentor(model_cfg, int(cfg.dataset.num_classes))
    import_mmseg_checkpoint(mmseg_path, model)
    output = Path(str(cfg.import_teacher.output))
    save_atomic(
        {"format": FORMAT_VERSION, "model": model.state_dict(), "num_classes": int(cfg.dataset.num_classes),
         "model_cfg": model_cfg, "finished": True, "source": str(mmseg_path)},
        output,
    )
    return output
