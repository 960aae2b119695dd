"""Progress of a long loop in every log: a tqdm bar on a terminal, a plain line at a steady interval elsewhere.

A SLURM job log, a CI log or ``dvc repro > log`` is not a terminal, and a tqdm bar written there is either hidden or
a wall of carriage returns. There, :class:`Progress` logs one line every ``progress.every_seconds`` (30 s by default)
in the convention of mmsegmentation's logger::

    pretrain student (none, seed 0) Iter [120/2000]  3.41 it/s  eta: 0:09:11  loss: 1.2345

stage, method and seed, step / total, iterations per second since the loop started, the estimated time left and
the current loss. A line is written at the first step boundary after the interval has passed, so two lines are never
more than one interval plus one step apart.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kdrepro.progress")


def on_terminal() -> bool:
    """Whether stderr is a terminal (then a tqdm bar shows progress, else periodic lines)."""
    return sys.stderr.isatty()


def format_eta(seconds: float | None) -> str:
    """``0:09:11``; ``1 day, 2:03:04`` past a day; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    return str(dt.timedelta(seconds=round(seconds)))


class Progress:
    """Progress of one loop of ``total`` steps (``None``: unknown; pass ``fraction`` to :meth:`update` for the ETA).

    ``terminal``: show a tqdm bar (default: when stderr is a terminal); ``False`` logs plain lines every
    ``every_seconds`` of ``clock`` time; ``enabled=False`` shows nothing.
    """

    def __init__(self, stage: str, total: int | None, label: str = "", initial: int = 0, every_seconds: float = 30.0,
                 terminal: bool | None = None, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.stage, self.total, self.label = stage, total, label
        self.every_seconds = float(every_seconds)
        self.clock = clock
        self.step = self.initial = int(initial)
        self.start = self.last_line = clock()
        self.lines = 0
        self.bar: Any = None
        self.enabled = enabled
        if enabled and (on_terminal() if terminal is None else terminal):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=stage, unit="it", leave=False)

    def update(self, step: int | None = None, loss: Any = None, fraction: float | None = None) -> None:
        """The loop reached ``step`` (default: one more); ``loss`` (a number or tensor) is read only when a line is
        written; ``fraction`` in [0, 1] is the part of the loop done when ``total`` does not say it."""
        previous, self.step = self.step, self.step + 1 if step is None else int(step)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.step - previous)
            return
        now = self.clock()
        if now - self.last_line >= self.every_seconds or (self.total is not None and self.step >= self.total):
            log.info(self.line(now, loss, fraction))
            self.last_line = now
            self.lines += 1

    def line(self, now: float, loss: Any = None, fraction: float | None = None) -> str:
        """``<stage> (<label>) Iter [step/total]  <it/s>  eta: <h:mm:ss>  loss: <loss>``."""
        elapsed = now - self.start
        done = self.step - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        eta = None
        if self.total is not None and rate:
            eta = (self.total - self.step) / rate
        elif fraction is not None and 0 < fraction and done > 0:
            eta = elapsed * (1 - fraction) / fraction  # (approximate for a resumed loop)
        head = f"{self.stage} ({self.label})" if self.label else self.stage
        total = "?" if self.total is None else str(self.total)
        text = f"{head} Iter [{self.step}/{total}]  {'?' if rate is None else f'{rate:.2f}'} it/s  eta: {format_eta(eta)}"
        if loss is not None:
            text += f"  loss: {float(loss.detach() if hasattr(loss, 'detach') else loss):.4f}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
