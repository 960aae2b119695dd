"""User-facing errors: one line that names the problem and the fix.

The CLI catches :class:`KdreproError`, prints ``error: <message>`` to stderr and exits with status 2 (or the error's
``exit_code``), without a traceback. A signal is :class:`SignalInterrupt` (exit 130/143, one line). Anything else is
a bug and keeps its traceback.
"""

import signal


class KdreproError(Exception):
    """An error caused by the user's input (files, configs, budgets); its message says what to do."""


class ConfigError(KdreproError):
    """A config value is unknown, missing or out of range."""


class DatasetError(KdreproError):
    """A dataset folder, image or label is missing or malformed."""


class WeightsError(KdreproError):
    """A weights or checkpoint file does not fit the model."""


class StorageError(KdreproError):
    """A file cannot be written: disk full, permission denied, a parent that is a file, a read-only file system."""


class RunLockedError(KdreproError):
    """Another process is writing the same run folder."""


class Interrupted(KdreproError):
    """SIGINT / SIGTERM stopped the command; the message says what was saved and how to continue.

    The exit status is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a killed process.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class SignalInterrupt(KeyboardInterrupt):
    """SIGINT / SIGTERM raised from a signal handler at an arbitrary point: like ``KeyboardInterrupt`` a
    ``BaseException``, so no ``except Exception`` swallows it. Exit status ``128 + signal number``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def raise_on_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`SignalInterrupt` (one ``error:`` line, exit 130/143) instead of a
    traceback (SIGINT) or a silent death (SIGTERM); ``kdrepro train`` installs its own handlers on top."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        raise SignalInterrupt(signum, f"interrupted by signal {signum} ({name}) before the command finished; rerun it")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
