"""Statistics over seeds: means, 95 % t-intervals and paired differences, for the tidy results tables.

Every method is trained once per seed with common random numbers (seed ``s`` gives every method the same initial
student and the same batches), so a method's advantage over a baseline is measured *per seed* and the interval is
taken over those paired differences: Student's t-interval, ``mean ± t_{0.975, n-1} · sd / sqrt(n)``
(``scipy.stats.t``). With one seed there is no interval (NaN) and nothing is called significant. A difference is
*significant* when its interval excludes 0; a ranking or "better than" claim is only made where it is.
mIoU in these tables is in percent points. Diverged runs (mIoU NaN) are left out of the statistics and counted in
``n_diverged``. Runs that collapsed to one class (``collapsed`` in ``runs.csv``, :func:`kdrepro.analysis.regime.collapsed`)
are counted in ``n_collapsed`` and *stay in* the mean, the interval and the paired differences: their mIoU is a real
outcome of the method under this recipe, and dropping them would flatter the method.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from kdrepro.analysis.methods import LOGIT_KD, STUDENT_ALONE

CONFIDENCE = 0.95
GROUP = ["protocol", "method", "multiplier"]


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, float, int]:
    """``(mean, sd, low, high, n)`` of the finite values: Student's t-interval for the mean (NaN below 2 values)."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(data)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(data.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan, n
    sd = float(data.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half, n


def significant(low: float, high: float) -> bool:
    """The interval excludes 0 (False when there is no interval)."""
    return bool(math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0))


def paired_difference(a: pd.Series, b: pd.Series) -> dict[str, float | bool | int]:
    """Interval of ``a - b`` over the seeds both have (Series indexed by seed)."""
    joined = pd.concat({"a": a, "b": b}, axis=1).dropna()
    mean, sd, low, high, n = t_interval(joined["a"] - joined["b"])
    return {"mean": mean, "sd": sd, "ci_low": low, "ci_high": high, "n": n, "significant": significant(low, high)}


def n_collapsed(group: pd.DataFrame) -> int:
    """How many runs of ``group`` collapsed to one class (0 when the table has no ``collapsed`` column)."""
    if "collapsed" not in group:
        return 0
    return int(group["collapsed"].map(lambda value: str(value).strip().lower() == "true").sum())  # bool, or text from a CSV


def _by_seed(runs: pd.DataFrame, protocol: str, method: str, multiplier: float) -> pd.Series:
    rows = runs[(runs.protocol == protocol) & (runs.method == method) & (runs.multiplier == multiplier)]
    return rows.set_index("seed")["miou_pct"]


def summarize(runs: pd.DataFrame, teacher_miou_pct: float | None = None) -> pd.DataFrame:
    """One row per (protocol, method, multiplier) of the student runs in ``runs`` (columns protocol, method,
    multiplier, seed, miou as a fraction, iterations, train_seconds; optional family, display_name): mean, sd and
    95 % interval of mIoU (percent), and paired differences vs the student alone and vs logit KD of the same
    protocol and budget (``delta_student_*``, ``delta_kd_*``)."""
    students = runs[runs.protocol != "teacher"].copy()
    students["miou_pct"] = 100.0 * pd.to_numeric(students["miou"])
    rows = []
    for (protocol, method, multiplier), group in students.groupby(GROUP, sort=False):
        mean, sd, low, high, n = t_interval(group["miou_pct"])
        row = {
            "protocol": protocol,
            "method": method,
            "multiplier": multiplier,
            "family": group["family"].iloc[0] if "family" in group else None,
            "display_name": group["display_name"].iloc[0] if "display_name" in group else method,
            "n_seeds": n,
            "n_diverged": int(group["miou_pct"].isna().sum()),
            "n_collapsed": n_collapsed(group),
            "miou_mean": mean,
            "miou_std": sd,
            "miou_ci_low": low,
            "miou_ci_high": high,
            "iterations_mean": float(pd.to_numeric(group["iterations"]).mean()),
            "train_seconds_mean": float(pd.to_numeric(group["train_seconds"]).mean()),
            "percent_of_teacher_mean": 100.0 * mean / teacher_miou_pct if teacher_miou_pct else math.nan,
        }
        this = group.set_index("seed")["miou_pct"]
        for prefix, baseline in (("delta_student", STUDENT_ALONE), ("delta_kd", LOGIT_KD)):
            base = _by_seed(students, protocol, baseline, multiplier)
            if method == baseline or base.empty:
                row.update({f"{prefix}_mean": math.nan, f"{prefix}_ci_low": math.nan, f"{prefix}_ci_high": math.nan,
                            f"{prefix}_significant": False})  # fmt: skip
                continue
            diff = paired_difference(this, base)
            row.update({f"{prefix}_mean": diff["mean"], f"{prefix}_ci_low": diff["ci_low"],
                        f"{prefix}_ci_high": diff["ci_high"], f"{prefix}_significant": diff["significant"]})  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def pairwise(runs: pd.DataFrame, protocol: str, multiplier: float = 1.0) -> pd.DataFrame:
    """Paired differences ``a - b`` for every ordered pair of methods of one protocol (rows a, b, mean, ci_low,
    ci_high, n, significant); mIoU in percent."""
    part = runs[(runs.protocol == protocol) & (runs.multiplier == multiplier)].copy()
    part["miou_pct"] = 100.0 * pd.to_numeric(part["miou"])
    methods = sorted(part.method.unique())
    rows = []
    for a in methods:
        for b in methods:
            if a != b:
                diff = paired_difference(_by_seed(part, protocol, a, multiplier), _by_seed(part, protocol, b, multiplier))
                rows.append({"a": a, "b": b, **diff})
    return pd.DataFrame(rows, columns=["a", "b", "mean", "sd", "ci_low", "ci_high", "n", "significant"])
