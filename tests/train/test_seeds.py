"""Seeds as an axis: one run per seed in one process, and common random numbers across methods."""

from __future__ import annotations

import pytest
import torch

from kdrepro.config import load_config
from kdrepro.errors import ConfigError
from kdrepro.io import load_checkpoint
from kdrepro.train.run import evaluation_steps
from kdrepro.train.seeds import per_seed_configs, seed_list, train_seeds


def test_per_seed_configs_split_the_out_dir(tiny_dataset, tmp_path):
    cfg = load_config([*tiny_dataset, "seeds=[0,2]", f"out_dir={tmp_path}", "budget.iterations=8", "eval_points=3"])
    configs = per_seed_configs(cfg)
    assert [c.seed for c in configs] == [0, 2]
    assert [c.out_dir for c in configs] == [str(tmp_path / "seed0"), str(tmp_path / "seed2")]
    assert all(c.seeds is None and c.eval_points == 3 for c in configs)  # in the run's identity: a change retrains
    assert per_seed_configs(load_config([*tiny_dataset, f"out_dir={tmp_path}"]))[0].out_dir == str(tmp_path)


@pytest.mark.parametrize(
    "iterations, points, every, steps",
    [(8, 3, 0, [2, 4, 6]), (4, 1, 0, [2]), (4, 2, 0, [2, 3]), (4, 3, 0, [1, 2, 3]), (10, 2, 0, [4, 7]),
     (320, 2, 0, [107, 214]), (2, 3, 0, [1]), (1, 1, 0, []), (9, 0, 3, [3, 6]), (9, 0, 0, []), (9, 2, 1, [3, 6])],
)
def test_eval_points_are_that_many_distinct_steps_before_the_end(iterations, points, every, steps):
    """k/(points+1) of the run, rounded up: with 4 iterations, 1 and 2 points are different schedules (an every-k
    rule gave both one evaluation, at step 2), and a run shorter than the points asks gets every step it has."""
    assert evaluation_steps(iterations, points, every) == steps


def test_changing_eval_points_retrains_a_student_run_but_not_the_teacher():
    from kdrepro.train.run_folder import identity
    from kdrepro.train.teacher import teacher_run

    one, two = (load_config(["profile=smoke", "method=kd", f"eval_points={n}"]) for n in (1, 2))
    assert identity(one) != identity(two)
    assert identity(teacher_run(one)) == identity(teacher_run(two))  # its weights and final mIoU do not depend on it
    assert teacher_run(one).eval_points == 0


def test_changing_the_reference_schedule_retrains_a_student_run_but_not_the_teacher_or_the_backbones(tmp_path):
    from kdrepro.train.pretrain import pretraining_run
    from kdrepro.train.run_folder import identity
    from kdrepro.train.teacher import teacher_run

    short, long = (load_config(["profile=smoke", "method=kd", f"reference_iterations={n}"]) for n in (4, 8))
    assert identity(short) != identity(long)
    assert identity(teacher_run(short)) == identity(teacher_run(long))
    for which in ("student", "teacher"):
        assert identity(pretraining_run(short, which, tmp_path)) == identity(pretraining_run(long, which, tmp_path))
    # a teacher schedule that follows the reference one (train.yaml's default) is still the teacher's identity
    follows = [load_config(["method=kd", f"reference_iterations={n}", "teacher_iterations=${reference_iterations}"]) for n in (4, 8)]
    assert [teacher_run(cfg).budget.iterations for cfg in follows] == [4, 8]
    assert identity(teacher_run(follows[0])) != identity(teacher_run(follows[1]))


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


def test_each_seed_resolves_its_budget_on_its_device(monkeypatch, tmp_path):
    """train_seeds hands no budget down, also with eval_points (once resolved there without a device, which skipped
    the device-type check of a calibration): each run resolves it where it trains."""
    from kdrepro.train import run

    handed = []
    monkeypatch.setattr(run, "train", lambda cfg, budget=None: handed.append((cfg.eval_points, budget)) or {})
    train_seeds(load_config(["profile=smoke", "seeds=[0,1]", "eval_points=1", f"out_dir={tmp_path}"]))
    assert handed == [(1, None), (1, None)]
    with pytest.raises(ConfigError, match="eval_points needs an iteration budget"):
        train_seeds(load_config(["profile=smoke", "seeds=[0,1]", "eval_points=1", "budget=seconds", "budget.seconds=5",
                                 f"out_dir={tmp_path}"]))  # fmt: skip


def test_a_run_evaluates_at_its_eval_points(tiny_dataset, tmp_path):
    from kdrepro.cli import main

    out = tmp_path / "run"
    assert main(["train", *tiny_dataset, "method=none", "budget.iterations=4", "eval_points=2", f"out_dir={out}"]) == 0
    rows = (out / "dvclive" / "plots" / "metrics" / "val" / "miou.tsv").read_text().splitlines()[1:]
    assert [int(row.split("\t")[0]) for row in rows] == [2, 3]  # the final evaluation is metrics.json's
