"""What a run's speed settings were and why, in words: recorded by training and calibration, read by the reports.

Kept free of torch so that the results and report stages read it cheaply (the choice itself:
:mod:`kdrepro.train.hardware`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def speed_sentence(choice: dict[str, Any] | None) -> str:
    """One sentence on the precision, memory layout and threads the runs trained with, each with its reason
    ('' when unknown), e.g. "Speed settings: fp32 (this machine has no native bf16 ...), NCHW (...), 2 threads (...)."."""
    if not choice or not choice.get("precision"):
        return ""
    if choice.get("mixed"):
        return (f"Speed settings differ between this pipeline's runs (precision {choice['precision']}): rerun them on "
                "one machine (dvc repro) to compare like with like.")
    reason = choice.get("reason") or {}
    precision = "bf16 autocast" if choice["precision"] == "bf16" else str(choice["precision"])
    parts = [_with_reason(precision, reason.get("precision"))]
    if "channels_last" in choice:
        parts.append(_with_reason("channels_last" if choice["channels_last"] else "NCHW", reason.get("channels_last")))
    if choice.get("threads"):
        threads = choice["threads"]
        parts.append(_with_reason(f"{threads} thread{'' if threads == 1 else 's'}", reason.get("threads")))
    return "Speed settings: " + ", ".join(parts) + "."


def _with_reason(setting: str, reason: str | None) -> str:
    """``fp32 (why)``: the reason without its leading ``<setting>:``."""
    return f"{setting} ({reason.split(': ', 1)[-1]})" if reason else setting


def runs_speed_choice(choices: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The one speed choice of a pipeline's method runs (``speed.choice`` of their metrics); a mix is reported as such.
    Runs of another role (the teacher, the backbones' pre-training: ``role`` in their choice) have their own choice
    and are left out."""
    distinct = {json.dumps(c, sort_keys=True) for c in choices if c and not c.get("role")}
    if not distinct:
        return None
    if len(distinct) > 1:
        precisions = sorted({json.loads(c)["precision"] for c in distinct})
        return {"precision": " and ".join(precisions), "mixed": True}
    return json.loads(distinct.pop())
