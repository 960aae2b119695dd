"""SIGINT/SIGTERM during a training run, and a run that must not outlive the ``dvc`` process that started it.

:class:`Signals` replaces both handlers for the whole run. It has two modes:

* *deferred* (training loop, checkpoint writes): the signal is remembered; the loop stops after the current
  iteration, saves a checkpoint and raises :class:`~kdrepro.errors.Interrupted` (exit 130/143);
* *immediate* (start-up, final evaluation): :class:`~kdrepro.errors.SignalInterrupt` is raised at once with the
  message of the current phase (what is saved, what a rerun does).

:func:`watch_parent`: under ``dvc repro`` (``DVC_STAGE`` is set) a daemon thread sends SIGTERM to this process once
the ``dvc`` process is gone (our parent changes, or the shell's parent dies), so killing ``dvc`` stops the run
the same graceful way Ctrl-C does: checkpoint, exit 143, and the next ``dvc repro`` resumes it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdrepro.errors import SignalInterrupt

SHELLS = ("sh", "bash", "dash", "zsh", "fish", "ksh")
POLL_SECONDS = 0.5
_WATCHER: threading.Thread | None = None


class Signals:
    """The run's SIGINT/SIGTERM handler (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.message = "while starting, before the first training step; rerun the same command to start"
        self.immediate = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if self.immediate:
            self.raise_now()

    def raise_now(self) -> None:
        signum = self.signum or signal.SIGTERM
        raise SignalInterrupt(signum, f"interrupted by signal {signum} ({signal.Signals(signum).name}) {self.message}")

    @contextmanager
    def immediate_phase(self, message: str) -> Iterator[None]:
        """Inside the block a signal raises at once with ``message``; a signal that came before raises on entry."""
        self.message, self.immediate = message, True
        if self.signum is not None:
            self.raise_now()
        try:
            yield
        finally:
            self.immediate = False

    def deferred(self) -> None:
        self.immediate = False

    @property
    def pending(self) -> bool:
        return self.signum is not None


def _parent_of(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _name_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(environ: dict[str, str] | None = None) -> threading.Thread | None:
    """Under ``dvc repro`` only: SIGTERM ourselves when the ``dvc`` process goes away (see the module docstring)."""
    global _WATCHER
    environ = dict(os.environ if environ is None else environ)
    if "DVC_STAGE" not in environ or not Path("/proc").is_dir():
        return None
    if _WATCHER is not None and _WATCHER.is_alive():  # one per process (a stage may train several seeds)
        return _WATCHER
    parent = os.getppid()
    watched = [parent]
    if _name_of(parent) in SHELLS:  # dvc runs `$SHELL -c cmd`; a shell that did not exec us sits in between
        grandparent = _parent_of(parent)
        if grandparent and grandparent > 1:
            watched.append(grandparent)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            if os.getppid() != parent or not all(_alive(pid) for pid in watched):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    _WATCHER = threading.Thread(target=poll, name="kdrepro-parent-watch", daemon=True)
    _WATCHER.start()
    return _WATCHER
