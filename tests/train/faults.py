"""Run ``kdrepro`` with one injected fault, for the reliability tests: ``python faults.py <kdrepro args>``.

Without ``KDREPRO_FAULT`` (or with it empty) this is plain ``kdrepro``.

``KDREPRO_FAULT`` picks the fault; ``KDREPRO_FAULT_MARKER`` is a file touched when a pause begins, so the test knows
when to send its signal, and waits for ``<marker>.go`` before going on:

* ``pause_write:<n>``: the n-th checkpoint write stops halfway through its bytes and waits;
* ``fail_write:<n>:<ERRNO>``: the n-th checkpoint write fails with that errno (``ENOSPC``, ``EACCES``, ``EROFS``);
* ``pause_step:<n>``: training waits after its n-th iteration;
* ``pause_eval``: the final evaluation waits;
* ``garble_start``: composing the config waits, and a signal during that wait comes out as an ``ImportError``, as
  a signal inside numpy's or omegaconf's own start-up code does (the interrupted import leaves a half-built module).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

PAUSE_SECONDS = 120


def _pause() -> None:
    """Touch the marker, then wait until ``<marker>.go`` appears (or a signal's exception ends the wait)."""
    marker = Path(os.environ["KDREPRO_FAULT_MARKER"])
    marker.touch()
    deadline = time.monotonic() + PAUSE_SECONDS
    while not marker.with_suffix(".go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def install(fault: str) -> None:
    from kdrepro import io
    from kdrepro.train import run, trainer

    kind, *args = fault.split(":")
    if kind in ("pause_write", "fail_write"):
        original, writes = io.write_bytes_atomic, {"count": 0}
        write_chunk = io._write_chunk

        def counted(path, data):
            if Path(path).name == "checkpoint.pt":
                writes["count"] += 1
            return original(path, data)

        def chunk(handle, data):
            if not handle.name.endswith("checkpoint.pt.tmp") or writes["count"] != int(args[0]):
                return write_chunk(handle, data)
            if kind == "fail_write":
                raise OSError(getattr(errno, args[1]), os.strerror(getattr(errno, args[1])))
            write_chunk(handle, data[: len(data) // 2])
            handle.flush()
            _pause()

        io.write_bytes_atomic, io._write_chunk = counted, chunk
    elif kind == "pause_step":
        timed_step = trainer.Trainer.timed_step

        def step(self, batches, progress, step_index=0):
            result = timed_step(self, batches, progress, step_index)
            if step_index + 1 == int(args[0]):
                _pause()
            return result

        trainer.Trainer.timed_step = step
    elif kind == "pause_eval":
        run.validate = lambda *a, **k: _pause()
    elif kind == "garble_start":
        from kdrepro import config

        load_config = config.load_config

        def garbled(*a, **k):
            try:
                _pause()
            except BaseException:
                raise ImportError("cannot load module more than once per process") from None
            return load_config(*a, **k)

        config.load_config = garbled
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    from kdrepro.errors import raise_on_signals

    raise_on_signals()
    if os.environ.get("KDREPRO_FAULT"):
        install(os.environ["KDREPRO_FAULT"])
    from kdrepro.cli import run as kdrepro

    kdrepro()  # the console entry point itself: its handling of what escapes main() is under test too
