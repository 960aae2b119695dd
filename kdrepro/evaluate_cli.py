"""``kdrepro evaluate``: score a checkpoint on a dataset's validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kdrepro.data import build_dataset, class_names
from kdrepro.distributed import resolve_device
from kdrepro.errors import ConfigError
from kdrepro.evaluate import evaluate
from kdrepro.io import write_json_atomic
from kdrepro.models.loading import load_model


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.evaluate.checkpoint`` on the validation split of ``cfg.dataset``; writes and returns JSON."""
    path = cfg.evaluate.get("checkpoint")
    if not path:
        raise ConfigError("set evaluate.checkpoint=<run folder>/checkpoint.pt")
    num_classes = int(cfg.dataset.num_classes)
    device = resolve_device(str(cfg.device))
    model = load_model(Path(path), num_classes, str(cfg.dataset.name), fix="pick the matching dataset", map_location=device)
    loader = torch.utils.data.DataLoader(build_dataset(cfg.dataset, "val", train_transforms=False), batch_size=1)
    metrics, _ = evaluate(
        model, loader, num_classes, int(cfg.dataset.ignore_index), mode=str(cfg.dataset.eval_mode),
        slide_crop=list(cfg.dataset.slide_crop), slide_stride=list(cfg.dataset.slide_stride), device=device,
    )
    result = {**metrics.to_json(class_names(cfg.dataset)), "checkpoint": str(path), "dataset": str(cfg.dataset.name), "eval_mode": str(cfg.dataset.eval_mode)}
    output = Path(cfg.evaluate.get("output") or Path(path).parent / f"eval_{cfg.dataset.name}.json")
    write_json_atomic(output, result)
    return result
