"""Seeds as an axis: one run per seed in one process, and common random numbers across methods."""

from __future__ import annotations

import pytest
import torch

from kdrepro.config import load_config
from kdrepro.errors import ConfigError
from kdrepro.io import load_checkpoint
from kdrepro.train.seeds import per_seed_configs, seed_list, train_seeds


def test_per_seed_configs_split_the_out_dir(tiny_dataset, tmp_path):
    cfg = load_config([*tiny_dataset, "seeds=[0,2]", f"out_dir={tmp_path}", "budget.iterations=8", "eval_points=3"])
    configs = per_seed_configs(cfg)
    assert [c.seed for c in configs] == [0, 2]
    assert [c.out_dir for c in configs] == [str(tmp_path / "seed0"), str(tmp_path / "seed2")]
    assert all(c.seeds is None and c.eval_every == 2 and c.eval_points == 0 for c in configs)  # ceil(8 / 4)
    assert per_seed_configs(load_config([*tiny_dataset, f"out_dir={tmp_path}"]))[0].out_dir == str(tmp_path)


@pytest.mark.parametrize("seeds", ["[]", "[1,1]", "[-1]", "3"])
def test_bad_seed_lists_are_one_line_errors(tiny_dataset, seeds):
    with pytest.raises(ConfigError, match="seeds"):
        seed_list(load_config([*tiny_dataset, f"seeds={seeds}"]))


def _student_after_one_frozen_step(overrides, out_dir):
    """Train one step at zero learning rate: the weights stay at their initialisation and the BatchNorm running
    statistics record the first batch, so equal states mean equal initialisation and equal data."""
    cfg = load_config([*overrides, "seeds=[5]", f"out_dir={out_dir}", "budget.iterations=1", "optim.lr=0",
                       "optim.min_lr=0", "optim.weight_decay=0", "eval_points=0"])  # fmt: skip
    train_seeds(cfg)
    state = load_checkpoint(out_dir / "seed5" / "checkpoint.pt")
    return state["model"]


def test_same_seed_gives_every_method_the_same_student_and_batches(tiny_teacher, tmp_path):
    alone = _student_after_one_frozen_step([*tiny_teacher, "method=none", "teacher_checkpoint=null"], tmp_path / "none")
    distilled = _student_after_one_frozen_step([*tiny_teacher, "method=cwd"], tmp_path / "cwd")
    assert alone.keys() == distilled.keys()
    for key in alone:
        assert torch.equal(alone[key], distilled[key]), key


def test_a_run_repeated_is_bit_identical(tiny_teacher, tmp_path):
    """Iteration-matched runs do not depend on the machine's timing: the same config and seed twice give the same
    weights and the same scores (what lets the README compare two pipeline runs number for number)."""
    runs = []
    for name in ("first", "second"):
        cfg = load_config([*tiny_teacher, "method=kd", "seeds=[3]", f"out_dir={tmp_path / name}", "budget.iterations=3"])
        (metrics,) = train_seeds(cfg)
        runs.append((metrics, load_checkpoint(tmp_path / name / "seed3" / "checkpoint.pt")["model"]))
    (first, first_model), (second, second_model) = runs
    assert first["miou"] == second["miou"] and first["per_class_iou"] == second["per_class_iou"]
    assert all(torch.equal(first_model[key], second_model[key]) for key in first_model)


def test_budget_is_resolved_once_and_passed_down(monkeypatch, tmp_path):
    """train_seeds resolves the budget once (eval_points needs it) and hands the same one to every seed's run."""
    from kdrepro.train import run, seeds

    resolved, handed = [], []
    real = seeds.resolve_budget
    monkeypatch.setattr(seeds, "resolve_budget", lambda *args: resolved.append(args) or real(*args))
    monkeypatch.setattr(run, "train", lambda cfg, budget=None: handed.append((cfg.eval_every, budget)) or {})
    train_seeds(load_config(["profile=smoke", "seeds=[0,1]", "eval_points=1", f"out_dir={tmp_path}"]))
    assert len(resolved) == 1 and len(handed) == 2
    assert handed[0][1] is handed[1][1] and handed[0][1].iterations == 4 and handed[0][0] == 2
