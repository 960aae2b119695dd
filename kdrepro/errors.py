"""User-facing errors: one line that names the problem and the fix.

The CLI catches :class:`KdreproError`, prints ``error: <message>`` to stderr and exits with status 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""


class KdreproError(Exception):
    """An error caused by the user's input (files, configs, budgets); its message says what to do."""


class ConfigError(KdreproError):
    """A config value is unknown, missing or out of range."""


class DatasetError(KdreproError):
    """A dataset folder, image or label is missing or malformed."""


class WeightsError(KdreproError):
    """A weights or checkpoint file does not fit the model."""
