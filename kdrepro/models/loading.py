"""Checkpoint -> model: rebuild the segmentor a kdrepro checkpoint describes, with its weights (strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdrepro.errors import WeightsError
from kdrepro.io import load_checkpoint
from kdrepro.models.segmentor import build_segmentor
from kdrepro.models.weights import load_strict


def check_classes(state: dict[str, Any], path: Path, num_classes: int, dataset: str, fix: str) -> None:
    """Refuse a checkpoint for another class count, and one whose classifier contradicts its own ``num_classes``."""
    declared = int(state.get("num_classes", -1))
    classifier = state["model"].get("decode_head.conv_seg.weight")
    if classifier is not None and int(classifier.shape[0]) != declared:
        raise WeightsError(
            f"{path} contradicts itself: it says num_classes={declared} but its classifier "
            f"(decode_head.conv_seg.weight) has {int(classifier.shape[0])} outputs; re-create it"
        )
    if declared != num_classes:
        raise WeightsError(f"{path} predicts {declared} classes but dataset {dataset!r} has {num_classes}; {fix}")


def load_model(
    source: Path | dict[str, Any], num_classes: int, dataset: str, model_cfg: dict[str, Any] | None = None,
    map_location: str | torch.device = "cpu", fix: str = "use a checkpoint trained on this dataset",
) -> torch.nn.Module:
    """The segmentor a kdrepro checkpoint describes, with its weights (strict), on ``map_location``.

    ``model_cfg`` is used when the checkpoint does not record its own (``model_cfg``).
    """
    state = load_checkpoint(Path(source), map_location) if not isinstance(source, dict) else source
    path = Path(source) if not isinstance(source, dict) else Path(str(state.get("source", "checkpoint")))
    check_classes(state, path, num_classes, dataset, fix)
    config = state.get("model_cfg") or model_cfg
    if not config:
        raise WeightsError(f"{path} does not record its model (model_cfg); re-create it with kdrepro")
    model = build_segmentor({**dict(config), "pretrained": None}, num_classes)  # every weight comes from the file
    load_strict(model, state["model"], str(path), f"model {config.get('name')!r}")
    return model.to(map_location)
