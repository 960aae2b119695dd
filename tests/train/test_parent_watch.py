"""A kdrepro child of `dvc` (directly, or through a shell that did not exec it) stops when `dvc` is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import signal, sys, time
from pathlib import Path
from kdrepro.train.signals import watch_parent
signal.signal(signal.SIGTERM, lambda *a: (Path(sys.argv[1]).write_text("SIGTERM"), sys.exit(0)))
assert watch_parent() is not None
Path(sys.argv[1] + ".ready").touch()
time.sleep(30)
"""


def parent_script(shell: bool) -> str:
    """Stands in for `dvc`: runs the child through `sh -c` (dash does not exec) or directly, then waits."""
    child = f"{sys.executable} -c '{CHILD}' \"$0\"" if shell else None
    command = f"['/bin/sh', '-c', {child!r} + '; true', sys.argv[1]]" if shell else f"[sys.executable, '-c', {CHILD!r}, sys.argv[1]]"
    return f"import subprocess, sys\nsubprocess.Popen({command}).wait()\n"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the parent watch reads /proc (Linux)")
@pytest.mark.parametrize("shell", [False, True], ids=["direct", "through-sh"])
def test_killing_the_parent_sends_sigterm_to_the_run(tmp_path, shell):
    result = tmp_path / "result"
    env = {**os.environ, "DVC_STAGE": "train"}
    fake_dvc = subprocess.Popen([sys.executable, "-c", parent_script(shell), str(result)], env=env)
    deadline = time.monotonic() + 30
    while not Path(f"{result}.ready").exists():
        assert fake_dvc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(fake_dvc.pid, signal.SIGKILL)
    fake_dvc.wait()
    while not result.exists():
        assert time.monotonic() < deadline + 5, "the run outlived its parent"
        time.sleep(0.05)
    assert result.read_text() == "SIGTERM"


def test_no_watch_outside_dvc():
    from kdrepro.train.signals import watch_parent

    assert watch_parent({"PATH": "/usr/bin"}) is None
