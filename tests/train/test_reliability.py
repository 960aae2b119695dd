"""Nothing lost, ever: `kdrepro train` as a subprocess under signals, kills, a second writer, a full disk and bad
inputs; every failure is one `error:` line with its exit status, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdrepro.cli import main
from kdrepro.config import load_config
from kdrepro.errors import DatasetError
from kdrepro.io import load_checkpoint
from kdrepro.train.run import train

KDREPRO = Path(sys.executable).with_name("kdrepro")
FAULTS = Path(__file__).with_name("faults.py")
COMMON = ["method=none", "budget.iterations=6", "seed=3", "threads=1"]


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory) -> Path:
    """An uninterrupted run: the reference every resumed run must equal bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    train(load_config([*tiny_dataset, *COMMON, f"out_dir={out}"]))
    return out


def start(args: list[str], fault: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "KDREPRO_FAULT": fault or "", "KDREPRO_FAULT_MARKER": str(marker or "")}
    command = [sys.executable, str(FAULTS), *args] if fault else [str(KDREPRO), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the fault's pause never began"
        time.sleep(0.05)


def wait_for_handlers(process: subprocess.Popen, seconds: float = 60) -> None:
    """Until ``process`` catches SIGTERM (``SigCgt`` in /proc: kdrepro's own handlers are installed, as the first
    thing its entry point does; Python catches SIGINT from its start). A fixed sleep was too short on a loaded
    machine, where the signal then reached the interpreter while it still imported kdrepro."""
    status = Path(f"/proc/{process.pid}/status")
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.communicate()[1][-3000:]
        caught = next((line.split()[1] for line in status.read_text().splitlines() if line.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            return
        assert time.monotonic() < deadline, "kdrepro never installed its signal handlers"
        time.sleep(0.02)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def error_line(err: str) -> str:
    """The stderr lines that are not log lines must be exactly one `error:` line."""
    lines = [line for line in err.splitlines() if line and " kdrepro" not in line[:20]]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_logged(out: Path) -> list[int]:
    rows = (out / "dvclive" / "plots" / "metrics" / "train" / "ce.tsv").read_text().splitlines()[1:]
    return [int(row.split("\t")[0]) for row in rows]


@pytest.mark.slow
def test_kill_mid_checkpoint_write_then_sigint_in_evaluation_resume_bit_identical(tiny_dataset, straight, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = ["train", *tiny_dataset, *COMMON, f"out_dir={out}"]
    process = start(args, "pause_write:4", marker)  # checkpoints every step: the 4th write is step 4's
    wait_for(marker, process)
    process.kill()
    process.wait()
    assert (out / "checkpoint.pt.tmp").exists()  # a half-written file ...
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3  # ... never replaced the whole previous one
    assert steps_logged(out)[-1] == 4  # dvclive got ahead of the checkpoint

    marker.unlink()
    process = start(args, "pause_eval", marker)  # resumes, trains to the end, then stops in the final evaluation
    wait_for(marker, process)
    process.send_signal(signal.SIGINT)
    code, err = finish(process)
    assert code == 130 and "resuming" in err and "at step 3" in err
    assert "during the final evaluation" in error_line(err)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 6 and state["finished"] and not (out / "metrics.json").exists()
    assert not list(out.glob("*.tmp"))

    code, err = finish(start(args))  # only evaluates
    assert code == 0 and "at step 6" in err, err[-3000:]
    assert_same_weights(straight, out)
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # no duplicate rows from the replayed step 4
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())


@pytest.mark.slow
def test_sigterm_during_final_evaluation_is_one_line_and_keeps_the_weights(tiny_dataset, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    process = start(["train", *tiny_dataset, *COMMON, f"out_dir={out}"], "pause_eval", marker)
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == 143 and "during the final evaluation" in error_line(err)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 6 and state["finished"] and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_second_process_is_refused_and_a_stale_lock_is_taken_over(tiny_dataset, straight, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    args = ["train", *tiny_dataset, *COMMON, f"out_dir={out}"]
    first = start(args, "pause_step:2", marker)
    wait_for(marker, first)
    code, err = finish(start(args))
    assert code == 2 and f"in use by another kdrepro process (pid {first.pid})" in error_line(err)
    first.send_signal(signal.SIGTERM)
    marker.with_suffix(".go").touch()  # the pause ends; the loop stops after step 2 with a checkpoint
    code, err = finish(first)
    assert code == 143 and "at step 2; checkpoint saved" in error_line(err)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".kdrepro.lock").write_text(f"{dead.pid}\n")  # as a SIGKILLed writer leaves it
    code, err = finish(start(args))
    assert code == 0 and "stale lock" in err, err[-3000:]
    assert not (out / ".kdrepro.lock").exists()
    assert_same_weights(straight, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_starting_is_one_line(tiny_dataset, tmp_path, signum):
    out = tmp_path / "run"
    process = start(["train", *tiny_dataset, *COMMON, f"out_dir={out}"])
    wait_for_handlers(process)  # then it imports torch and composes the config
    process.send_signal(signum)
    code, err = finish(process)
    assert code == 128 + signum
    assert "interrupted by signal" in error_line(err)
    assert not out.exists() or not list(out.glob("*.tmp"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_that_a_library_turns_into_another_error_is_still_the_signals_one_line(tiny_dataset, tmp_path, signum):
    """numpy and omegaconf catch what a signal raises inside their start-up code and raise something else (an
    ImportError, a RecursionError, an AttributeError: seen 2 in 150 times with a signal 0.1-0.5 s into start-up);
    that is still the signal's one line and exit status, not a traceback with exit 1."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    process = start(["train", *tiny_dataset, *COMMON, f"out_dir={out}"], "garble_start", marker)
    wait_for(marker, process)
    process.send_signal(signum)
    code, err = finish(process)
    assert code == 128 + signum, err[-3000:]
    assert "interrupted by signal" in error_line(err) and "Traceback" not in err
    assert not out.exists() or not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    "errno_name, message",
    [("ENOSPC", r"no space left on the disk holding .* while writing checkpoint.pt \(needs [\d.]+ MB, [\d.]+ MB free\)"),
     ("EACCES", "permission denied writing .*checkpoint.pt; make .* writable"),
     ("EROFS", "checkpoint.pt: .* is on a read-only file system")],
)
def test_storage_failures_are_one_line_and_leave_no_tmp(tiny_dataset, tmp_path, capsys, monkeypatch, errno_name, message):
    """The checkpoint write after step 1 fails as a full disk (a write wrapper; no tmpfs needed), a denied
    permission or a read-only file system would make it fail."""
    from kdrepro import io

    out, write_chunk, calls = tmp_path / "run", io._write_chunk, []

    def failing(handle, data):
        if handle.name.endswith("checkpoint.pt.tmp"):
            calls.append(handle.name)
            if len(calls) == 2:
                code = getattr(errno, errno_name)
                raise OSError(code, os.strerror(code))
        write_chunk(handle, data)

    monkeypatch.setattr(io, "_write_chunk", failing)
    assert main(["train", *tiny_dataset, *COMMON, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and "\n" not in err, err
    assert not list(out.glob("*.tmp")) and not (out / ".kdrepro.lock").exists()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1  # the previous checkpoint is whole


def test_out_dir_under_a_file_is_one_line(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", *tiny_dataset, *COMMON, f"out_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {blocker / 'run'}: {blocker} is a file, not a folder; choose another location"


def test_teacher_that_contradicts_itself_is_one_line(tiny_teacher, tmp_path, capsys):
    path = Path([o for o in tiny_teacher if o.startswith("teacher_checkpoint=")][0].split("=", 1)[1])
    state = load_checkpoint(path)
    state["model"]["decode_head.conv_seg.weight"] = state["model"]["decode_head.conv_seg.weight"][:5]  # says 7 classes
    bad = tmp_path / "teacher.pt"
    torch.save(state, bad)
    code = main(["train", *tiny_teacher, "method=kd", f"teacher_checkpoint={bad}", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "contradicts itself" in err and "\n" not in err, err


def test_changed_teacher_is_refused_then_allowed_and_folder_kept(tiny_teacher, tmp_path, capsys):
    source = Path([o for o in tiny_teacher if o.startswith("teacher_checkpoint=")][0].split("=", 1)[1])
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(source.read_bytes())
    out = tmp_path / "run"
    args = ["train", *tiny_teacher, "method=kd", "budget.iterations=2", f"teacher_checkpoint={teacher}", f"out_dir={out}"]
    assert main(args) == 0
    before = snapshot(out)
    state = load_checkpoint(teacher)
    state["model"]["decode_head.conv_seg.bias"] += 1
    torch.save(state, teacher)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher_checkpoint" in err and "sha256" in err and "allow_changed_inputs=true" in err and "\n" not in err
    assert snapshot(out) == before
    assert main([*args, "allow_changed_inputs=true"]) == 0  # finished: a no-op on the new file, by request
    assert snapshot(out) == before


def test_config_change_archives_with_on_config_change_archive(tiny_dataset, straight, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_dataset, *COMMON, "budget.iterations=2", f"out_dir={out}"]) == 0
    before = snapshot(out)
    args = ["train", *tiny_dataset, *COMMON, f"out_dir={out}"]
    assert main(args) == 2 and "on_config_change=archive" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main([*args, "on_config_change=archive"]) == 0
    (archived,) = tmp_path.glob("run.superseded-*")
    assert snapshot(archived) == before
    assert_same_weights(straight, out)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (too small for the tiny model's 1.7 MB checkpoint), where the test may mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the write-wrapper test covers ENOSPC)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk_is_one_line_and_leaves_no_tmp(tiny_dataset, small_tmpfs, capsys):
    out = small_tmpfs / "run"
    assert main(["train", *tiny_dataset, *COMMON, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: no space left on the disk holding {out} while writing checkpoint.pt \(needs 1\.\d MB, "
                        r"0\.\d MB free\); free some space there or write to another disk, then rerun", err), err
    assert not list(out.glob("*.tmp")) and not (out / ".kdrepro.lock").exists()


def test_real_read_only_file_system_is_one_line(tiny_dataset, small_tmpfs, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    out = small_tmpfs / "run"
    assert main(["train", *tiny_dataset, *COMMON, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {out}: {small_tmpfs} is on a read-only file system; write elsewhere", err


def test_a_rejected_method_option_touches_nothing(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *tiny_teacher, "method=cwd", "budget.iterations=1", f"out_dir={out}", "on_config_change=archive"]
    assert main(args) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "method.terms.cwd.temperature=-4"]) == 2
    assert capsys.readouterr().err.strip() == "error: cwd option temperature must be positive, got -4; fix it in the method config"
    assert snapshot(out) == before and not list(tmp_path.glob("run.superseded-*"))


def test_folder_made_read_only_mid_run_is_one_permission_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    """As `chmod a-w <out_dir>` during training does for a non-root user: the checkpoint write and the lock file's
    removal both fail; the message is the write's, in one line (the lock file left behind is taken over later)."""
    from kdrepro import io

    out = tmp_path / "run"
    write_chunk, unlink = io._write_chunk, os.unlink

    def denied_chunk(handle, data):
        if handle.name.endswith("checkpoint.pt.tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return write_chunk(handle, data)

    def denied_unlink(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(io, "_write_chunk", denied_chunk)
    monkeypatch.setattr(os, "unlink", denied_unlink)
    assert main(["train", *tiny_dataset, *COMMON, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert error_line(err) == f"error: permission denied writing {out / 'checkpoint.pt'}; make {out} writable or write elsewhere"


BROKEN_FORWARD = '''import torch
from kdrepro.distill import Distiller, register


@register("broken")
class Broken(Distiller):
    def __init__(self, student_channels, teacher_channels, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, student, teacher, target):
        scale = student.logits.shape[1] / 0
        return {"broken": self.weight * scale * student.logits.mean()}
'''


def _plugin(folder: Path, source: str) -> list[str]:
    (folder / "method").mkdir(parents=True)
    (folder / "broken.py").write_text(source)
    (folder / "method" / "broken.yaml").write_text("family: canonical\nterms:\n  broken:\n    weight: 1.0\n")
    return [f"plugins=[{folder}]", "method=broken"]


def test_plugin_with_a_syntax_error_is_one_line_naming_file_line_and_method(tiny_teacher, tmp_path, capsys):
    plugin = _plugin(tmp_path / "mine", BROKEN_FORWARD.replace("def forward(self, student, teacher, target):", "def forward(self, student teacher):"))
    assert main(["train", *tiny_teacher, *plugin, f"out_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: method broken: importing plugin {tmp_path / 'mine' / 'broken.py'} raised SyntaxError: ")
    assert f"at {tmp_path / 'mine' / 'broken.py'}:11;" in line and "-v" in line
    assert main(["-v", "train", *tiny_teacher, *plugin, f"out_dir={tmp_path / 'run'}"]) == 2
    verbose = capsys.readouterr().err
    assert "Traceback (most recent call last)" in verbose and verbose.rstrip().splitlines()[-1] == line


def test_plugin_whose_forward_raises_is_one_line_with_the_traceback_in_the_run_folder(tiny_teacher, tmp_path):
    out = tmp_path / "run"
    plugin = _plugin(tmp_path / "mine", BROKEN_FORWARD)
    process = start(["train", *tiny_teacher, *plugin, "budget.iterations=2", f"out_dir={out}"])
    code, err = finish(process)
    line = error_line(err)  # no traceback, no shutdown noise after it
    source = tmp_path / "mine" / "broken.py"
    assert code == 2 and line == (
        f"error: method broken: its forward raised ZeroDivisionError: division by zero at {source}:12 (in forward); "
        f"fix that code, or rerun with -v for the traceback; the full traceback is in {out / 'error.log'}"
    ), line
    log = (out / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and f'File "{source}", line 12, in forward' in log


MINE = '''from kdrepro.distill import Distiller, register


@register("mine")
class Mine(Distiller):
    def __init__(self, student_channels, teacher_channels, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, student, teacher, target):
        return {"mine": self.weight * (student.logits - teacher.logits.detach()).pow(2).mean()}
'''


def test_editing_a_plugin_methods_code_retrains_its_runs_and_no_other(tiny_teacher, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "method").mkdir(parents=True)
    source = folder / "mine.py"
    source.write_text(MINE)
    (folder / "method" / "mine.yaml").write_text("family: canonical\nterms:\n  mine:\n    weight: 1.0\n")
    common = ["train", *tiny_teacher, f"plugins=[{folder}]", "budget.iterations=2"]
    mine, kd = [*common, "method=mine", f"out_dir={tmp_path / 'mine_run'}"], [*common, "method=kd", f"out_dir={tmp_path / 'kd_run'}"]
    assert main(mine) == 0 and main(kd) == 0
    before = {name: snapshot(tmp_path / name) for name in ("mine_run", "kd_run")}
    assert main(mine) == 0 and snapshot(tmp_path / "mine_run") == before["mine_run"]  # nothing edited: a no-op
    source.write_text(MINE.replace(".pow(2)", ".abs()"))  # the user edits the loss
    capsys.readouterr()
    assert main(mine) == 2
    line = error_line(capsys.readouterr().err)
    assert f"plugin mine.py {source} (sha256 " in line and "allow_changed_inputs=true" in line, line
    assert snapshot(tmp_path / "mine_run") == before["mine_run"]
    assert main([*mine, "on_config_change=archive"]) == 0  # the pipeline's mode: moved aside, trained again
    (archived,) = tmp_path.glob("mine_run.superseded-*")
    assert snapshot(archived) == before["mine_run"] and (tmp_path / "mine_run" / "metrics.json").is_file()
    assert main(kd) == 0 and snapshot(tmp_path / "kd_run") == before["kd_run"]  # a packaged method: not its code


def test_pretrain_dataset_advice_is_the_pretrain_datasets_own_prepare_command(tmp_path, capsys, monkeypatch):
    """A dataset error while pre-training quotes the command that prepares the pre-training set (not the main
    dataset's), and that command composes exactly the dataset the pre-training run reads."""
    from kdrepro.data.io import prepare_hint
    from kdrepro.pipeline.params import params_overrides
    from kdrepro.train import run
    from kdrepro.train.pretrain import pretraining_run

    def damaged(dataset_cfg, split, **kwargs):  # as a label damaged after `prepare` checked the set
        raise DatasetError(f"label {dataset_cfg.root}/x.png is damaged; {prepare_hint(str(dataset_cfg.name))}")

    monkeypatch.setattr(run, "build_dataset", damaged)
    params = tmp_path / "params.yaml"
    params.write_text("profile: smoke\nseeds: [0, 1]\n")
    root = tmp_path / "pretrain_data"
    overrides = [f"pretrain.dataset.root={root}", "dataset.generate.num_train=2", "dataset.generate.num_val=1"]
    assert main(["pretrain", "--params", str(params), *overrides, "which=student", "precision=fp32", "channels_last=false",
                 f"out_dir={tmp_path / 'pre'}"]) == 2  # fmt: skip
    line = error_line(capsys.readouterr().err)
    command = line.split("run `", 1)[1].split("`", 1)[0]
    assert command.startswith(f"kdrepro prepare --params {params} dataset.generate.num_train=2") and f"dataset.root={root}" in command
    composed = load_config([*params_overrides(params), *command.split()[4:]])
    cfg = load_config([*params_overrides(params), *overrides])
    assert composed.dataset == pretraining_run(cfg, "student", tmp_path / "pre").dataset


def test_dataset_advice_is_the_prepare_command_of_this_run(tmp_path, capsys):
    root = tmp_path / "my_smoke"
    args = ["train", "profile=smoke", f"dataset.root={root}", "method=none", f"out_dir={tmp_path / 'run'}"]
    assert main(args) == 2
    advice = f"run `kdrepro prepare profile=smoke dataset.root={root}`"
    assert advice in error_line(capsys.readouterr().err)
    params = tmp_path / "params.yaml"
    params.write_text("profile: smoke\nseeds: [0, 1]\n")
    explicit_speed = ["precision=fp32", "channels_last=false"]  # no hardware stage ran here
    assert main(["train", "--params", str(params), f"dataset.root={root}", "method=none", *explicit_speed,
                 f"out_dir={tmp_path / 'run'}"]) == 2  # fmt: skip
    assert f"run `kdrepro prepare --params {params} dataset.root={root}`" in error_line(capsys.readouterr().err)
    assert main(["prepare", "profile=smoke", f"dataset.root={root}"]) == 0  # the advice prepares exactly that folder
    from kdrepro.data import build_dataset

    assert len(build_dataset(load_config(["profile=smoke", f"dataset.root={root}"]).dataset, "train", True)) == 8
