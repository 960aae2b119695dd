"""User-facing errors: one line that names the problem and the fix.

The CLI catches :class:`KdreproError`, prints ``error: <message>`` to stderr and exits with status 2 (or the error's
``exit_code``), without a traceback. A signal is :class:`SignalInterrupt` (exit 130/143, one line). Anything else is
a bug and keeps its traceback.
"""

import signal
import traceback
from collections.abc import Sequence
from contextvars import ContextVar
from pathlib import Path

#: The ``kdrepro prepare ...`` command that prepares the dataset of the command being run (set by the CLI from its
#: own arguments: ``--params`` and the profile / dataset overrides), quoted by dataset errors; empty outside the CLI.
PREPARE_COMMAND: ContextVar[str] = ContextVar("prepare_command", default="")


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


class MethodCodeError(KdreproError):
    """A method's own code (a plugin, or a registered Distiller) raised while being imported, built or run.

    The message is one line naming the method, the exception and the file and line it came from (the innermost
    frame in the method's folder); ``kdrepro -v`` prints the full traceback, and ``kdrepro train`` also writes it to
    ``<out_dir>/error.log``."""

    @classmethod
    def wrap(cls, error: BaseException, method: str, doing: str, folders: Sequence[Path] = ()) -> "MethodCodeError":
        """The one-line error for ``error`` raised while the method ``method`` was ``doing`` something."""
        where = code_location(error, folders)
        text = " ".join(str(error).split())
        text = text if len(text) <= 200 else text[:197] + "..."
        described = f"{type(error).__name__}: {text}" if text else type(error).__name__
        return cls(f"method {method}: {doing} raised {described} at {where}; fix that code, or rerun with -v for the traceback")


def code_location(error: BaseException, folders: Sequence[Path] = ()) -> str:
    """``file:line (in function)`` of the innermost traceback frame under one of ``folders`` (the innermost frame if
    none is); for a :class:`SyntaxError`, the file and line of the bad code itself."""
    if isinstance(error, SyntaxError) and error.filename:
        return f"{error.filename}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "an unknown place"
    roots = [str(Path(folder).resolve()) for folder in folders]
    inside = [frame for frame in frames if any(str(Path(frame.filename).resolve()).startswith(root) for root in roots)]
    frame = (inside or frames)[-1]
    return f"{frame.filename}:{frame.lineno} (in {frame.name})"


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
    ``BaseException``, so no ``except Exception`` swallows it. Exit status ``128 + signal number``.

    Creating one records it (:func:`signal_received`): raised inside a third-party import or constructor, it can come
    out as another exception (numpy's half-imported module as ``ImportError`` or ``RecursionError``, omegaconf's
    half-built node as ``AttributeError``, both seen when a signal came 0.1-0.5 s into start-up), and the CLI then
    reports the signal, not the consequence."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        if not _RECEIVED:
            _RECEIVED.append(self)


_RECEIVED: list[SignalInterrupt] = []


def signal_received() -> SignalInterrupt | None:
    """The first :class:`SignalInterrupt` this process raised, or None: whatever a library made of it, the command
    was stopping because of it."""
    return _RECEIVED[0] if _RECEIVED else None


def raise_on_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`SignalInterrupt` (one ``error:`` line, exit 130/143) instead of a
    traceback (SIGINT) or a silent death (SIGTERM); ``kdrepro train`` installs its own handlers on top."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        raise SignalInterrupt(signum, f"interrupted by signal {signum} ({name}) before the command finished; rerun it")

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
