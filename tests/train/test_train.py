"""End-to-end tests of `kdrepro train` on a tiny synthetic set (seconds each)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from kdrepro.config import load_config
from kdrepro.errors import ConfigError, WeightsError
from kdrepro.io import load_checkpoint
from kdrepro.train.run import train

pytestmark = pytest.mark.slow


def test_train_writes_metrics_timing_and_dvclive(tiny_teacher, tmp_path):
    metrics = train(load_config([*tiny_teacher, "method=kd", f"out_dir={tmp_path}"]))
    assert metrics["iterations"] == 4
    assert 0.0 <= metrics["miou"] <= 1.0
    assert metrics["train_seconds"] > 0
    assert 0 < metrics["train_cpu_seconds"] < 10 * metrics["train_seconds"]  # the compute check's clock on CPUs
    phases = metrics["phase_median_seconds"]
    assert phases["teacher"] > 0 and phases["distill"] > 0 and phases["backward"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["miou"] == metrics["miou"] and len(saved["per_class_iou"]) == 7
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "kd.tsv").exists()
    assert (tmp_path / "config.yaml").exists()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["finished"] and state["step"] == 4


def test_rerun_of_finished_run_is_a_no_op(tiny_teacher, tmp_path):
    cfg = load_config([*tiny_teacher, "method=none", f"out_dir={tmp_path}"])
    first = train(cfg)
    stamp = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    assert train(cfg)["miou"] == first["miou"]
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_different_config_in_out_dir_is_refused_and_kept(tiny_teacher, tmp_path):
    train(load_config([*tiny_teacher, "method=none", f"out_dir={tmp_path}"]))
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="different config .*method"):
        train(load_config([*tiny_teacher, "method=kd", f"out_dir={tmp_path}"]))
    assert (tmp_path / "metrics.json").read_bytes() == before


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_teacher, tmp_path):
    """Stop after 3 of 6 iterations (as a crash would: checkpoint only), resume, compare with a straight run."""
    common = [*tiny_teacher, "method=kd_fitnet", "budget.iterations=6", "seed=3"]
    straight = train(load_config([*common, f"out_dir={tmp_path / 'straight'}"]))
    # first half: a 3-iteration budget would change the LR schedule, so interrupt through the signal path instead
    resumed_dir = tmp_path / "resumed"
    script = (
        "import os, signal, sys\n"
        "from kdrepro.train import trainer as t\n"
        "original = t.Trainer.timed_step\n"
        "def stepped(self, *a, **k):\n"
        "    out = original(self, *a, **k)\n"
        "    if a[2] == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return out\n"
        "t.Trainer.timed_step = stepped\n"
        "from kdrepro.cli import main\n"
        f"sys.exit(main(['train', *{[*common, f'out_dir={resumed_dir}']!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "interrupted by signal" in result.stderr
    assert load_checkpoint(resumed_dir / "checkpoint.pt")["step"] == 3
    assert not (resumed_dir / "metrics.json").exists()
    resumed = train(load_config([*common, f"out_dir={resumed_dir}"]))
    assert resumed["iterations"] == 6
    assert resumed["miou"] == straight["miou"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(resumed_dir / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_seconds_budget_stops_on_training_time(tiny_teacher, tmp_path):
    metrics = train(load_config([*tiny_teacher, "method=none", "budget=seconds", "budget.seconds=0.5", f"out_dir={tmp_path}"]))
    assert metrics["train_seconds"] >= 0.5
    assert metrics["train_seconds"] - 0.5 < 5 * metrics["seconds_per_iteration"] + 0.5


def test_non_finite_loss_names_step_and_term(tiny_teacher, tmp_path):
    from kdrepro.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 0 in term\(s\) kd;"):
        # logits / 1e-40 overflow to inf, so the KD term (and only it) is NaN
        train(load_config([*tiny_teacher, "method=kd", "method.terms.kd.temperature=1e-40", "budget.iterations=3", f"out_dir={tmp_path}"]))


def test_on_nonfinite_record_writes_a_diverged_result_instead_of_failing(tiny_teacher, tmp_path):
    from kdrepro.analysis.results import collect_runs

    out = tmp_path / "runs" / "iter_matched" / "kd"
    overrides = [*tiny_teacher, "method=kd", "method.terms.kd.temperature=1e-40", "on_nonfinite=record", f"out_dir={out}"]
    metrics = train(load_config(overrides))
    assert metrics["miou"] is None and metrics["diverged"]["step"] == 0 and metrics["diverged"]["terms"] == ["kd"]
    assert json.loads((out / "metrics.json").read_text())["diverged"]["step"] == 0
    assert not (out / "checkpoint.pt").exists()  # non-finite weights are not kept
    assert train(load_config(overrides))["diverged"]["step"] == 0  # a rerun is a no-op, not a retry
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row.diverged_at == 0 and row.miou != row.miou  # NaN
    with pytest.raises(ConfigError, match="on_nonfinite=error or on_nonfinite=record"):
        train(load_config([*overrides[:-2], "on_nonfinite=ignore", f"out_dir={tmp_path / 'x'}"]))


def test_corrupt_teacher_checkpoint_is_weights_error(tiny_dataset, tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    from kdrepro.train.trainer import load_teacher

    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint"):
        load_teacher(load_config([*tiny_dataset, "method=kd", f"teacher_checkpoint={bad}"]), 19, torch.device("cpu"))


def test_a_teacher_without_a_checkpoint_is_its_architecture_for_timing_and_an_error_for_training(tiny_dataset):
    from kdrepro.train.trainer import load_teacher

    cfg = load_config([*tiny_dataset, "method=kd", "teacher_checkpoint=null"])
    with pytest.raises(ConfigError, match="needs a teacher: set teacher_checkpoint"):
        load_teacher(cfg, 19, torch.device("cpu"))
    teacher = load_teacher(cfg, 19, torch.device("cpu"), untrained=True)  # what calibration times
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters()) > 0


def test_bf16_autocast_trains_with_finite_losses(tiny_teacher, tmp_path):
    metrics = train(load_config([*tiny_teacher, "method=kd", "precision=bf16", "channels_last=true", f"out_dir={tmp_path}"]))
    assert metrics["precision"] == "bf16" and metrics["iterations"] == 4
    assert metrics["miou"] == metrics["miou"]  # not NaN
