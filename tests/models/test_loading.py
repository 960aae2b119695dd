"""Checkpoint -> model: `kdrepro evaluate` rebuilds the model a checkpoint describes; mismatches are one line."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdrepro.cli import main
from kdrepro.io import load_checkpoint
from kdrepro.models.loading import load_model


def teacher_path(overrides: list[str]) -> Path:
    return Path(next(o for o in overrides if o.startswith("teacher_checkpoint=")).split("=", 1)[1])


def test_evaluate_rebuilds_the_checkpoint_model(tiny_teacher, tmp_path, capsys):
    checkpoint = teacher_path(tiny_teacher)
    output = tmp_path / "eval.json"
    assert main(["evaluate", *tiny_teacher, f"evaluate.checkpoint={checkpoint}", f"evaluate.output={output}"]) == 0
    result = json.loads(output.read_text())
    assert 0 <= result["miou"] <= 1 and result["checkpoint"] == str(checkpoint)
    model = load_model(checkpoint, 7, "synthetic")  # the synthetic profile scores the 7 categories
    weights = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())


def test_wrong_class_count_is_one_line(tiny_teacher, tmp_path, capsys):
    checkpoint = teacher_path(tiny_teacher)
    code = main(["evaluate", *tiny_teacher, "dataset.label_set=classes", "dataset.num_classes=19", f"evaluate.checkpoint={checkpoint}",
                 f"evaluate.output={tmp_path / 'eval.json'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "predicts 7 classes but dataset 'synthetic' has 19; pick the matching dataset" in err
    assert "\n" not in err and not (tmp_path / "eval.json").exists()


def test_checkpoint_dict_is_what_load_model_rebuilds(tmp_path):
    """Every writer (training, teacher import) builds its checkpoint with io.checkpoint_dict; load_model reads it."""
    from kdrepro.io import FORMAT_VERSION, checkpoint_dict, save_checkpoint
    from kdrepro.models import build_segmentor

    model_cfg = {"name": "pspnet_r18", "arch": "pspnet", "depth": 18, "base_width": 8, "pretrained": None}
    model = build_segmentor(model_cfg, 7)
    state = checkpoint_dict(model.state_dict(), 7, model_cfg, finished=True, source="here")
    assert (state["format"], state["num_classes"], state["finished"], state["source"]) == (FORMAT_VERSION, 7, True, "here")
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    rebuilt = load_model(tmp_path / "checkpoint.pt", 7, "synthetic")
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in rebuilt.state_dict().items())
