"""Calibration under torchrun (2 gloo processes on CPU) and the world-size guard of compute-matched runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from smoke_pipeline import UNGUARDED

from kdrepro.cli import main
from kdrepro.distributed import DistributedContext
from kdrepro.errors import ConfigError
from kdrepro.train.budget import resolve_budget
from kdrepro.train.calibrate_ranks import reduce_over_ranks, slowest_rank_history

WORLD = 2


def _reduce_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        context = DistributedContext(rank=rank, world_size=WORLD)
        # rank 0 is slower in iteration 0, rank 1 in iteration 1
        history = [{"data": 0.1, "total": 1.0 + (rank == 0)}, {"data": 0.2 * (1 + rank), "total": 1.0 + 3 * (rank == 1)}]
        slowest = slowest_rank_history(history, context, torch.device("cpu"))
        summed = reduce_over_ranks(10 + rank, context, torch.device("cpu"), "sum")
        if rank == 1:
            torch.save({"history": slowest, "sum": summed}, result_file)
    finally:
        dist.destroy_process_group()


def test_timings_are_reduced_to_the_slowest_rank_per_iteration(tmp_path):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "out.pt")
    assert out["history"] == [{"data": 0.1, "total": 2.0}, {"data": pytest.approx(0.4), "total": 4.0}]
    assert out["sum"] == 21.0


def _calibration(tmp_path: Path, world_size: int | None) -> Path:
    folder = tmp_path / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    budget = {"reference_method": "kd", "reference_iterations": 10, "budget_seconds": 5.0}
    if world_size is not None:
        budget["world_size"] = world_size
    (folder / "budget.json").write_text(json.dumps(budget))
    (folder / "kd.json").write_text(json.dumps({"seconds_per_iteration": 0.5}))
    return folder


def test_a_calibration_of_another_world_size_is_refused_unless_allowed(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(_calibration(tmp_path, 2)), "multiplier": 1.0,
                            "allow_world_size_mismatch": False})  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"measured with 2 process\(es\) but this run has 1; .*kdrepro calibrate"):
        resolve_budget(cfg, "kd")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_budget(cfg, "kd").iterations == 10
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=4 -m kdrepro calibrate"):
        resolve_budget(cfg, "kd")
    cfg.allow_world_size_mismatch = True
    assert resolve_budget(cfg, "kd").iterations == 10


def test_a_calibration_without_world_size_counts_as_one_process(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"kind": "calibrated", "calibration": str(_calibration(tmp_path, None))})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_budget(cfg, "kd").iterations == 10
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="measured with 1 process"):
        resolve_budget(cfg, "kd")


@pytest.mark.slow
def test_torchrun_calibration_records_world_size_and_guards_training(tiny_teacher, tmp_path, capsys):
    """`torchrun -m kdrepro calibrate` with 2 gloo processes: lockstep rounds, rank 0 writes the medians and the
    world size; a one-process compute-matched run then refuses it (exit 2, one line) unless told to accept it."""
    output = tmp_path / "calibration.json"
    calibrate = [*tiny_teacher, "loader.batch_size=4", "threads=1", "calibrate.methods=[none,kd]", "calibrate.warmup=1",
                 "calibrate.rounds=2", "calibrate.iterations_per_round=2", f"calibrate.output={output}", *UNGUARDED]  # fmt: skip
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc_per_node=2", "-m", "kdrepro", "calibrate", *calibrate]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(output.read_text())
    assert table["world_size"] == 2 and table["hardware"]["world_size"] == 2
    assert json.loads((tmp_path / "calibration" / "budget.json").read_text())["world_size"] == 2
    for entry in table["methods"].values():
        assert entry["samples"] == 4 and entry["seconds_per_iteration"] > 0 and entry["flops_per_iteration"] > 0
    assert table["methods"]["kd"]["flops_per_iteration"] > table["methods"]["none"]["flops_per_iteration"]

    train = [*tiny_teacher, "loader.batch_size=4", "method=kd", "budget=calibrated",
             f"budget.calibration={tmp_path / 'calibration'}"]  # the calibration's setting, another world size
    capsys.readouterr()
    assert main(["train", *train, f"out_dir={tmp_path / 'refused'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: calibration") and "measured with 2 process(es) but this run has 1" in error
    assert "\n" not in error and not (tmp_path / "refused" / "checkpoint.pt").exists()
    assert main(["train", *train, "budget.allow_world_size_mismatch=true", f"out_dir={tmp_path / 'allowed'}"]) == 0
    metrics = json.loads((tmp_path / "allowed" / "metrics.json").read_text())
    assert metrics["iterations"] == table["matched"]["iterations"]["kd"]
