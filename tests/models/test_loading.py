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
