"""Run-folder integrity without training: the lock, the input files a run depends on, changed inputs, log trimming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdrepro.errors import ConfigError, RunLockedError
from kdrepro.train.run_folder import RunLock, claim, input_files, input_hashes, record_start, trim_live_logs


def config(tmp_path: Path, calibration: Path, method: str = "kd") -> OmegaConf:
    return OmegaConf.create({
        "out_dir": str(tmp_path / "run"), "seed": 0, "method": {"name": method, "terms": {method: {}}},
        "teacher_checkpoint": str(tmp_path / "teacher.pt"),
        "budget": {"kind": "calibrated", "calibration": str(calibration), "multiplier": 1.0},
    })


def test_lock_refuses_a_second_holder_and_cleans_up(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunLockedError, match=rf"{out} is in use by another kdrepro process \(pid {os.getpid()}\)"):
            RunLock(out).acquire()
    assert not out.exists()  # created by the lock and left empty: removed again


def test_inputs_are_the_teacher_and_the_calibration_files_the_run_reads(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    for name in ("budget.json", "kd.json", "cwd.json"):
        (folder / name).write_text(name)
    (tmp_path / "teacher.pt").write_bytes(b"teacher")
    files = input_files(config(tmp_path, folder), uses_teacher=True)
    assert sorted(files) == ["calibration budget", "calibration entry", "teacher_checkpoint"]
    assert files["calibration entry"] == folder / "kd.json"
    assert list(input_files(config(tmp_path, folder / "budget.json", "none"), uses_teacher=False)) == ["calibration"]


def test_changed_calibration_entry_is_refused_then_archived(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    (folder / "budget.json").write_text("{}")
    (folder / "kd.json").write_text('{"seconds_per_iteration": 1}')
    (tmp_path / "teacher.pt").write_bytes(b"teacher")
    cfg = config(tmp_path, folder)
    out = Path(cfg.out_dir)
    with RunLock(out) as lock:
        record_start(out, cfg, input_hashes(input_files(cfg, True)))
        (folder / "cwd.json").write_text("another method's file changes nothing")
        assert claim(out, cfg, input_hashes(input_files(cfg, True)), lock) is None
        (folder / "kd.json").write_text('{"seconds_per_iteration": 2}')
        changed = input_hashes(input_files(cfg, True))
        with pytest.raises(ConfigError, match=r"calibration entry .*kd.json \(sha256 \w+ when the run started, \w+ now\)"):
            claim(out, cfg, changed, lock)
        cfg.on_config_change = "archive"
        assert claim(out, cfg, changed, lock) is None
    (archived,) = tmp_path.glob("run.superseded-*")
    assert json.loads((archived / "inputs.json").read_text())["calibration entry"]["path"] == str(folder / "kd.json")
    assert not out.exists()  # the fresh folder stayed empty, so the lock removed it


def test_trim_live_logs_drops_rows_after_the_checkpoint(tmp_path):
    table = tmp_path / "plots" / "metrics" / "train" / "ce.tsv"
    table.parent.mkdir(parents=True)
    table.write_text("step\tce\n1\t0.5\n2\t0.4\n3\t0.3\n")
    pretrain = tmp_path / "plots" / "metrics" / "pretrain" / "loss.tsv"
    pretrain.parent.mkdir(parents=True)
    pretrain.write_text("step\tloss\n1\t1\n5\t1\n")
    trim_live_logs(tmp_path, 2)
    assert table.read_text() == "step\tce\n1\t0.5\n2\t0.4\n"
    assert pretrain.read_text() == "step\tloss\n1\t1\n5\t1\n"  # pre-training has its own step axis


def test_setting_a_parameter_back_restores_the_earlier_run(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"teacher")
    calibration = tmp_path / "calibration.json"
    calibration.write_text("{}")
    first, second = config(tmp_path, calibration), config(tmp_path, calibration)
    first.on_config_change = second.on_config_change = "archive"
    second.seed = 1
    out = Path(first.out_dir)
    inputs = input_hashes(input_files(first, True))
    with RunLock(out) as lock:
        record_start(out, first, inputs)
        (out / "metrics.json").write_text('{"miou": 0.5}')
        assert claim(out, second, inputs, lock) is None  # seed changed: moved aside, a fresh start
        record_start(out, second, inputs)
        assert claim(out, first, inputs, lock) == {"miou": 0.5}  # seed set back: the finished run returns
    assert OmegaConf.load(out / "config.yaml").seed == 0
    (superseded,) = tmp_path.glob("run.superseded-*")
    assert OmegaConf.load(superseded / "config.yaml").seed == 1


def test_an_empty_out_dir_takes_back_its_superseded_run(tmp_path):
    (tmp_path / "teacher.pt").write_bytes(b"teacher")
    calibration = tmp_path / "calibration.json"
    calibration.write_text("{}")
    cfg = config(tmp_path, calibration)
    out = Path(cfg.out_dir)
    inputs = input_hashes(input_files(cfg, True))
    with RunLock(out):
        record_start(out, cfg, inputs)
        (out / "metrics.json").write_text('{"miou": 0.5}')
    os.replace(out, tmp_path / "run.superseded-20260101T000000Z")  # archived by a stage that then failed
    for mode in ("error", "archive"):  # the move-back is no config change: either mode takes it
        cfg.on_config_change = mode
        with RunLock(out) as lock:
            assert claim(out, cfg, inputs, lock) == {"miou": 0.5}
            assert (out / ".kdrepro.lock").read_text().strip() == str(os.getpid())
        assert not list(tmp_path.glob("run.superseded-*")) and (out / "metrics.json").exists()
        os.replace(out, tmp_path / "run.superseded-20260101T000000Z")
    other = cfg.copy()
    other.seed = 7  # no superseded run of this config: a fresh start, the other run stays aside
    with RunLock(out) as lock:
        assert claim(out, other, inputs, lock) is None
    assert list(tmp_path.glob("run.superseded-*"))
