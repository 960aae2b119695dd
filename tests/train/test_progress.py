"""Progress in every log: plain lines at a steady interval when stderr is not a terminal, a tqdm bar when it is."""

from __future__ import annotations

import logging
import re

import pytest
from smoke_pipeline import UNGUARDED

from kdrepro.config import load_config
from kdrepro.train import progress as progress_module
from kdrepro.train.progress import Progress, format_eta

LINE = re.compile(r"^(?P<head>.+) Iter \[(?P<step>\d+)/(?P<total>\d+|\?)\]  (?P<rate>[\d.]+|\?) it/s  eta: (?P<eta>\S+)")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)


def test_a_line_at_least_every_interval_with_step_total_eta_and_loss(caplog, not_a_terminal):
    clock = FakeClock()
    shown = Progress("pretrain student", 20, "none, seed 0", every_seconds=30, clock=clock)
    stamps = []
    with caplog.at_level(logging.INFO, logger="kdrepro.progress"):
        for step in range(1, 21):
            clock.now += 7.0  # one step: 7 s
            before = len(caplog.records)
            shown.update(step, loss=1.5)
            if len(caplog.records) > before:
                stamps.append(clock.now)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(stamps) >= 140 // 30
    gaps = [b - a for a, b in zip([0.0, *stamps], stamps, strict=False)]
    assert max(gaps) <= 30 + 7  # never more than one interval plus one step without a line
    first = LINE.match(lines[0])
    assert first and first["head"] == "pretrain student (none, seed 0)" and first["total"] == "20"
    assert first["rate"] == f"{1 / 7:.2f}" and first["eta"] == format_eta((20 - int(first["step"])) * 7)
    assert lines[0].endswith("loss: 1.5000")
    assert LINE.match(lines[-1])["step"] == "20"  # the last step always gets its line


def test_eta_from_the_fraction_when_the_total_is_unknown(caplog, not_a_terminal):
    clock = FakeClock()
    shown = Progress("train", None, "kd, seed 1", every_seconds=0, clock=clock)
    clock.now = 10.0
    with caplog.at_level(logging.INFO, logger="kdrepro.progress"):
        shown.update(5, fraction=0.25)  # a quarter of a seconds budget in 10 s: 30 s left
    assert "Iter [5/?]" in caplog.text and "eta: 0:00:30" in caplog.text


def test_a_terminal_gets_a_bar_and_no_lines(caplog):
    shown = Progress("train", 3, "none, seed 0", every_seconds=0, terminal=True)
    with caplog.at_level(logging.INFO, logger="kdrepro.progress"):
        for step in range(1, 4):
            shown.update(step)
    assert shown.bar is not None and shown.bar.n == 3
    shown.close()
    assert not caplog.records


def test_a_training_run_in_a_log_prints_progress_lines(tiny_dataset, tmp_path, caplog, not_a_terminal):
    from kdrepro.train.run import train

    cfg = load_config([*tiny_dataset, "method=none", "budget.iterations=3", "progress.every_seconds=0",
                       "progress.stage=teacher", f"out_dir={tmp_path}"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kdrepro.progress"):
        train(cfg)
    lines = [record.getMessage() for record in caplog.records if record.name == "kdrepro.progress"]
    training = [line for line in lines if line.startswith("teacher (none, seed 0) Iter [")]
    assert [LINE.match(line)["step"] for line in training] == ["1", "2", "3"]
    assert all(LINE.match(line)["total"] == "3" and "loss: " in line for line in training)
    assert any(line.startswith("evaluate (none, seed 0) Iter [") for line in lines)  # the evaluation too


def test_calibration_in_a_log_prints_progress_lines_and_records_the_speed_choice(tiny_teacher, tmp_path, caplog,
                                                                                not_a_terminal):  # fmt: skip
    from kdrepro.cli import main

    output = tmp_path / "calibration.json"
    overrides = [*tiny_teacher, "calibrate.methods=[none,kd]", "calibrate.warmup=0", "calibrate.rounds=1",
                 "calibrate.iterations_per_round=2", f"calibrate.output={output}", "progress.every_seconds=0",
                 *UNGUARDED,
                 "threads=1"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kdrepro.progress"):
        assert main(["calibrate", *overrides]) == 0
    lines = [record.getMessage() for record in caplog.records if record.name == "kdrepro.progress"]
    assert [LINE.match(line)["step"] for line in lines] == ["1", "2", "3", "4"]
    assert lines[0].startswith("calibrate (") and "round 1/1" in lines[0] and LINE.match(lines[0])["total"] == "4"
    import json

    speed = json.loads(output.read_text())["speed"]
    assert speed["precision"] == "fp32" and speed["reason"]["precision"] == "fp32: set in the config"
