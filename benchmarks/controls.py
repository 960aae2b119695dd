"""The controls a profile's regime is chosen from: the student alone, the teacher, and the positive control.

A testbed must reproduce the field's known effect before it judges a claim. This benchmark measures, for a profile
and any overrides, exactly what the regime is fixed from, and nothing of the claims:

* the **teacher** after its schedule (``teacher_iterations``), trained once;
* the **student alone** at the reference schedule N and at ``--long`` times N (each a full run with its own poly
  schedule), over seeds: where N sits on its learning curve (mIoU at N / mIoU at 4N >= 0.8: past early training)
  and the **capacity gap**, the teacher minus the student alone at the longest control (>= 3 points wanted);
* the **positive control**: iteration-matched logit KD (``kd``) and CWD (``cwd``), one method of each family so the
  choice favours neither side of the paper's claim, each against the student alone with seed-paired differences and
  their 95 % t-intervals (significant: the interval excludes 0; wanted: mean gain >= +1 point).

Runs go to ``--work`` and are kept, so an interrupted benchmark resumes; the summary is printed and written to
``benchmarks/results/controls_<name>.json``::

    python benchmarks/controls.py --profile synthetic --seeds 0 1 2
    python benchmarks/controls.py --name w16 --profile synthetic student.base_width=16 ...   # a candidate regime

Pass ``--teacher-checkpoint`` to reuse a teacher trained by an earlier call with the same data and teacher.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from scipy import stats

from kdrepro.config import load_config
from kdrepro.data import prepare_dataset
from kdrepro.train.pretrain import pretrain
from kdrepro.train.seeds import train_seeds
from kdrepro.train.teacher import teacher as train_teacher

CONTROL_METHODS = ("kd", "cwd")


def mean_interval(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its 95 % t-interval (nan for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "half_width": math.nan}
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "half_width": float(half)}


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Seed-paired difference a - b: mean, 95 % interval, and whether it excludes 0."""
    result: dict[str, Any] = mean_interval([x - y for x, y in zip(a, b, strict=True)])
    half = result["half_width"]
    result["significant"] = bool(not math.isnan(half) and abs(result["mean"]) > half)
    return result


def summarize(rows: dict[str, list[float]], teacher_miou: float | None, long: float) -> dict[str, Any]:
    """The regime record of a set of control runs (mIoU in points)."""
    alone, longest = rows["none"], rows.get(f"none_x{long:g}")
    summary: dict[str, Any] = {"runs": {key: mean_interval(values) for key, values in rows.items()}}
    summary["positive_control"] = {}
    for method in CONTROL_METHODS:
        if method in rows:
            diff = paired(rows[method], alone)
            diff["passes"] = diff["significant"] and diff["mean"] >= 1.0
            summary["positive_control"][method] = diff
    summary["positive_control_passes"] = bool(summary["positive_control"]) and all(
        d["passes"] for d in summary["positive_control"].values())
    if "kd" in rows and "cwd" in rows:
        summary["kd_minus_cwd"] = paired(rows["kd"], rows["cwd"])
    if longest:
        summary["schedule_ratio"] = statistics.mean(alone) / statistics.mean(longest)
        if teacher_miou is not None:
            summary["capacity_gap"] = teacher_miou - statistics.mean(longest)
    summary["teacher"] = teacher_miou
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the candidate regime (e.g. student.base_width=8)")
    parser.add_argument("--profile", default="synthetic")
    parser.add_argument("--name", default=None, help="results name (default: the profile)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="the schedule N (default: the profile's)")
    parser.add_argument("--long", type=float, default=4.0, help="the longest student-alone control, x N")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/controls"))
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/controls_<name>.json")
    args = parser.parse_args(argv)

    name = args.name or args.profile
    base = [f"profile={args.profile}", *args.overrides]
    cfg = load_config(base)
    prepare_dataset(cfg.dataset)
    work = args.work / name
    for which in ("student", "teacher"):
        backbone = cfg[which].get("pretrained")
        if backbone and not Path(str(backbone)).is_file():
            out_dir = Path(str(backbone)).parent.parent
            pretrain(load_config([*base, f"out_dir={out_dir}", f"which={which}"]))
    start = time.perf_counter()
    teacher_miou = None
    checkpoint = args.teacher_checkpoint
    if checkpoint is None:
        metrics = train_teacher([*base, f"out_dir={work / 'teacher'}", "eval_points=0"])
        teacher_miou, checkpoint = 100 * metrics["miou"], work / "teacher" / "checkpoint.pt"
        print(f"teacher: {teacher_miou:.2f} mIoU after {metrics['iterations']} iterations", flush=True)
    iterations = args.iterations or int(cfg.reference_iterations)
    seeds = "[" + ",".join(map(str, args.seeds)) + "]"

    def run(method: str, steps: int, tag: str) -> list[float]:
        overrides = [*base, f"method={method}", "budget=iterations", f"budget.iterations={steps}", f"seeds={seeds}",
                     f"out_dir={work / tag}", "eval_points=0", f"teacher_checkpoint={checkpoint}"]  # fmt: skip
        values = [100 * r["miou"] if r.get("miou") is not None else math.nan for r in train_seeds(load_config(overrides))]
        print(f"{tag} ({steps} iterations): " + " ".join(f"{v:.2f}" for v in values), flush=True)
        return values

    rows = {"none": run("none", iterations, "none")}
    for method in CONTROL_METHODS:
        rows[method] = run(method, iterations, method)
    rows[f"none_x{args.long:g}"] = run("none", round(iterations * args.long), f"none_x{args.long:g}")
    summary = summarize(rows, teacher_miou, args.long)
    record = {"name": name, "overrides": base, "iterations": iterations, "seeds": args.seeds, "rows": rows,
              "summary": summary, "wall_seconds": time.perf_counter() - start}  # fmt: skip
    output = args.json or Path(__file__).parent / "results" / f"controls_{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return record


if __name__ == "__main__":
    main()
