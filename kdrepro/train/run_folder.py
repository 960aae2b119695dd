"""A run folder's integrity: one writer at a time, the same config and the same input files for its whole life.

* :class:`RunLock`: an exclusive ``fcntl`` lock on ``<out_dir>/.kdrepro.lock`` (holding the writer's pid). A second
  process is refused with the holder's pid; the kernel drops the lock of a dead process, so a stale lock file is
  simply taken over.
* :func:`claim`: a folder holding a run of a *different* config, or one trained on a teacher checkpoint or
  calibration file whose content has changed since, is refused (``on_config_change=error``, the default) or moved
  aside to ``<out_dir>.superseded-<UTC time>`` (``on_config_change=archive``, what the DVC pipeline passes) before a
  fresh start, or before an earlier run of the same config and inputs is moved back (a parameter set back to a
  previous value costs nothing). ``allow_changed_inputs=true`` continues on changed input files.
* :func:`trim_live_logs`: after a hard kill, dvclive rows logged after the last checkpoint are dropped on resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kdrepro.config import plugin_sources
from kdrepro.errors import ConfigError, RunLockedError
from kdrepro.io import ensure_dir, sha256_file, storage_errors, write_json_atomic, write_text_atomic
from kdrepro.train.effects import result_view

log = logging.getLogger("kdrepro.train")

LOCK_NAME = ".kdrepro.lock"
INPUTS_NAME = "inputs.json"
#: ``<out_dir>`` + this + a UTC time: where ``on_config_change=archive`` moves a superseded run.
SUPERSEDED_INFIX = ".superseded-"
ON_CONFIG_CHANGE = ("error", "archive")


class RunLock:
    """Exclusive lock of a run folder for the lifetime of a ``with`` block (rank 0 only under torchrun)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> RunLock:
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = not self.path.parent.exists()
        ensure_dir(self.path.parent)
        while True:
            with storage_errors(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"{self.path.parent} is in use by another kdrepro process (pid {self._holder()}); wait for it "
                    "to finish or stop it, or use another out_dir"
                ) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break  # not unlinked by the previous holder between our open and our lock
            os.close(fd)
        previous = os.read(fd, 32).decode(errors="replace").strip()
        if previous:
            log.info("taking over the stale lock of %s (pid %s is gone)", self.path.parent, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError as error:  # e.g. the folder was made read-only: the error that ended the run is the news
            log.warning("could not remove the lock file %s (%s); harmless: the next run takes it over", self.path,
                        error.strerror or error)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created:  # a folder this process made and left empty (e.g. a refused config) goes again
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def relock(self) -> None:
        """Another folder was moved to this lock's place: lock it afresh (a new lock file in it)."""
        self._created = False
        self.release()
        self.acquire()

    def move(self, out_dir: Path) -> None:
        """The locked folder was renamed to ``out_dir``: drop its lock file there and lock nothing."""
        self.path = Path(out_dir) / LOCK_NAME
        self.release()


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of a config that defines a run's result (:func:`kdrepro.train.effects.result_view`)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return result_view(container)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: set[str] = set()
        for key in set(a) | set(b):
            keys |= _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return set() if a == b else {prefix.rstrip(".")}


def input_files(cfg: DictConfig, uses_teacher: bool) -> dict[str, Path]:
    """The files besides the dataset whose content a run's result depends on: the teacher checkpoint, the
    calibration a compute-matched budget comes from, and the code of a plugin method (``plugin <file name>``)."""
    files: dict[str, Path] = {f"plugin {source.name}": source
                              for source in plugin_sources(str(cfg.method.name), list(cfg.get("plugins") or ()))}
    if uses_teacher and cfg.get("teacher_checkpoint"):
        files["teacher_checkpoint"] = Path(str(cfg.teacher_checkpoint))
    if str(cfg.budget.get("kind")) == "calibrated" and cfg.budget.get("calibration"):
        calibration = Path(str(cfg.budget.calibration))
        if calibration.is_dir():
            files["calibration budget"] = calibration / "budget.json"
            files["calibration entry"] = calibration / f"{cfg.method.name}.json"
        else:
            files["calibration"] = calibration
    return files


def input_hashes(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {name: {"path": str(path), "sha256": sha256_file(path)} for name, path in files.items() if path.is_file()}


def _changed_inputs(out_dir: Path, current: dict[str, dict[str, str]]) -> list[str]:
    saved = out_dir / INPUTS_NAME
    if not saved.is_file():
        return []
    recorded = json.loads(saved.read_text())
    return [
        f"{name} {current[name]['path']} (sha256 {recorded[name]['sha256'][:12]} when the run started, "
        f"{current[name]['sha256'][:12]} now)"
        for name in sorted(set(recorded) & set(current))
        if recorded[name]["sha256"] != current[name]["sha256"]
    ]


def claim(out_dir: Path, cfg: DictConfig, inputs: dict[str, dict[str, str]], lock: RunLock) -> dict[str, Any] | None:
    """Check ``out_dir`` against ``cfg`` (see the module docstring); return the finished metrics of the same run, if any.

    The caller holds ``lock``; after an archive it locks the fresh folder.
    """
    mode = str(cfg.get("on_config_change", "error"))
    if mode not in ON_CONFIG_CHANGE:
        raise ConfigError(f"on_config_change={mode!r}: use on_config_change=error or on_config_change=archive")
    problem = _mismatch(out_dir, cfg, inputs)
    if problem is None:
        if _holds_nothing(out_dir):
            _restore_superseded(out_dir, cfg, inputs, lock)
        metrics = out_dir / "metrics.json"
        return json.loads(metrics.read_text()) if metrics.exists() else None
    if mode == "error":
        raise ConfigError(f"{out_dir} holds {problem}; use another out_dir, delete the folder to start over, or pass "
                          "on_config_change=archive to move it aside")
    earlier = _matching_superseded(out_dir, cfg, inputs)
    archived = _superseded_name(out_dir)
    with storage_errors(archived):
        os.replace(out_dir, archived)
    lock.move(archived)
    if earlier is not None:  # e.g. a parameter set back to an earlier value: that run comes back, not a new one
        with storage_errors(out_dir):
            os.replace(earlier, out_dir)
        log.warning("%s held %s: moved to %s; restored the earlier run of this config from %s", out_dir, problem,
                    archived, earlier)
    else:
        log.warning("%s held %s: moved to %s, starting fresh", out_dir, problem, archived)
    lock.path = out_dir / LOCK_NAME
    lock.acquire()
    metrics = out_dir / "metrics.json"
    return json.loads(metrics.read_text()) if earlier is not None and metrics.exists() else None


def _holds_nothing(out_dir: Path) -> bool:
    """``out_dir`` holds no file but this process's lock file."""
    return all(entry.name == LOCK_NAME for entry in out_dir.iterdir()) if out_dir.is_dir() else True


def _restore_superseded(out_dir: Path, cfg: DictConfig, inputs: dict[str, dict[str, str]], lock: RunLock) -> None:
    """An empty ``out_dir`` whose config matches a run moved aside earlier (e.g. a parameter set back, after a
    stage that archived it failed): that run comes back instead of a new one starting."""
    earlier = _matching_superseded(out_dir, cfg, inputs)
    if earlier is None:
        return
    lock.path.unlink(missing_ok=True)  # the lock is held on the open file; the folder must be empty to be replaced
    with storage_errors(out_dir):
        os.replace(earlier, out_dir)
    log.warning("%s was empty: restored the earlier run of this config from %s", out_dir, earlier)
    lock.relock()


def _superseded_name(out_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate, count = out_dir.with_name(f"{out_dir.name}{SUPERSEDED_INFIX}{stamp}"), 1
    while candidate.exists():
        count += 1
        candidate = out_dir.with_name(f"{out_dir.name}{SUPERSEDED_INFIX}{stamp}-{count}")
    return candidate


def _matching_superseded(out_dir: Path, cfg: DictConfig, inputs: dict[str, dict[str, str]]) -> Path | None:
    """The newest folder this run folder was moved to that holds a run of ``cfg`` on the same input files."""
    for candidate in sorted(out_dir.parent.glob(f"{out_dir.name}{SUPERSEDED_INFIX}*"), reverse=True):
        if candidate.is_dir() and (candidate / "config.yaml").is_file() and _mismatch(candidate, cfg, inputs) is None:
            return candidate
    return None


def _mismatch(out_dir: Path, cfg: DictConfig, inputs: dict[str, dict[str, str]]) -> str | None:
    saved = out_dir / "config.yaml"
    if not saved.exists():
        if (out_dir / "checkpoint.pt").exists() or (out_dir / "metrics.json").exists():
            return "a run without config.yaml"
        return None
    previous, current = identity(OmegaConf.load(saved)), identity(cfg)
    if previous != current:
        differing = sorted(_diff_keys(previous, current))
        return f"a run of a different config (differs in {', '.join(differing[:5])})"
    changed = _changed_inputs(out_dir, inputs)
    if changed and not cfg.get("allow_changed_inputs", False):
        return (f"a run of other input files: {'; '.join(changed)}; restore the file, or pass "
                "allow_changed_inputs=true to keep this run on the new file")
    return None


def record_start(out_dir: Path, cfg: DictConfig, inputs: dict[str, dict[str, str]]) -> None:
    """``config.yaml`` and ``inputs.json`` (content hashes of the teacher and calibration files) of a new run."""
    write_text_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(out_dir / INPUTS_NAME, inputs)


def trim_live_logs(live_dir: Path, step: int) -> None:
    """Drop dvclive ``train/`` and ``val/`` rows logged after ``step`` (a hard kill after the last checkpoint)."""
    for table in live_dir.glob("plots/metrics/*/**/*.tsv"):
        if table.relative_to(live_dir / "plots" / "metrics").parts[0] not in ("train", "val"):
            continue
        lines = table.read_text().splitlines(keepends=True)
        if not lines:
            continue
        column = lines[0].rstrip("\n").split("\t").index("step") if "step" in lines[0] else None
        if column is None:
            continue
        kept = [lines[0], *(line for line in lines[1:] if int(line.split("\t")[column]) <= step)]
        if len(kept) != len(lines):
            write_text_atomic(table, "".join(kept))
