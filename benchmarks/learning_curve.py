"""Where does a profile's reference schedule sit on the student alone's learning curve?

Trains the student alone (method ``none``, the profile's recipe, its pre-trained backbone) for 1/2, 1, 2 and 4 times
the reference schedule, each a full run with its own poly learning-rate schedule, over a few seeds, and prints the
mean validation mIoU of each with the ratio the evidence criterion uses: mIoU at the schedule / mIoU at 4x the
schedule (>= 0.8: past early training). Optionally also the teacher after its schedule, for the teacher gap.

    python benchmarks/learning_curve.py --profile synthetic --seeds 0 1 2 [--lr 0.05 0.1] [--teacher]
        [--work FOLDER] [--json PATH] [-- override ...]

Results go to ``benchmarks/results/learning_curve_<profile>.json`` (``--json``: that file instead). Run folders
under ``--work`` are kept, so an interrupted benchmark resumes. Hydra overrides after ``--`` (or before the options)
change the profile, e.g. ``-- reference_iterations=100 loader.batch_size=2``; they apply to every run, the teacher's
and the backbones' pre-training included. A ratio whose 4x run scored 0 mIoU is recorded as null. The learning rate sweep (``--lr``) is how the profile's lr was chosen: the one with the
best student-alone mIoU at the reference schedule, fixed before any KD run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from kdrepro.config import load_config, trained_alone
from kdrepro.data import prepare_dataset
from kdrepro.train.pretrain import pretrain
from kdrepro.train.seeds import train_seeds

FACTORS = (0.5, 1.0, 2.0, 4.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the rows, print the table and the ratios, write the JSON; the summary that was written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, nargs="*", default=[], help="learning rates to sweep (default: the profile's)")
    parser.add_argument("--teacher", action="store_true", help="also train the teacher for its schedule")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/learning_curve"))
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/learning_curve_<profile>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the profile (after --), e.g. loader.batch_size=2")
    args = parser.parse_args(argv)

    base = [f"profile={args.profile}", *args.overrides]
    cfg = load_config(base)
    prepare_dataset(cfg.dataset)
    pretrain_dir = Path(str(cfg.student.pretrained)).parent.parent if cfg.student.get("pretrained") else None
    if pretrain_dir is not None and not Path(str(cfg.student.pretrained)).is_file():
        pretrain(load_config([*base, f"out_dir={pretrain_dir}"]))
    reference = int(cfg.reference_iterations)
    rows = []
    for lr in args.lr or [float(cfg.optim.lr)]:
        for factor in FACTORS:
            iterations = max(1, round(reference * factor))
            folder = args.work / args.profile / f"lr{lr:g}" / f"it{iterations}"
            start = time.perf_counter()
            changes = {"optim.lr": lr, "seeds": list(args.seeds), "out_dir": str(folder), "eval_points": 0}
            results = train_seeds(trained_alone(cfg, cfg.student, iterations, int(cfg.seed), changes))
            mious = [100 * r["miou"] for r in results if r.get("miou") is not None]
            rows.append({"lr": lr, "factor": factor, "iterations": iterations, "miou_mean": statistics.mean(mious),
                         "miou_sd": statistics.stdev(mious) if len(mious) > 1 else None, "seeds": args.seeds,
                         "wall_seconds": time.perf_counter() - start})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    summary = {"profile": args.profile, "reference_iterations": reference, "rows": rows, "ratio_at_reference": {}}
    for lr in {row["lr"] for row in rows}:
        at = {row["factor"]: row["miou_mean"] for row in rows if row["lr"] == lr}
        summary["ratio_at_reference"][f"{lr:g}"] = at[1.0] / at[4.0] if at[4.0] > 0 else None
    if args.teacher:
        from kdrepro.train.teacher import teacher

        folder = args.work / args.profile / "teacher"
        summary["teacher"] = teacher([*base, f"out_dir={folder}"])
    out = args.json or Path("benchmarks/results") / f"learning_curve_{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nprofile {args.profile}: reference schedule {reference} iterations")
    print(f"{'lr':>6} {'x':>4} {'iterations':>10} {'mIoU':>6} {'sd':>5}")
    for row in rows:
        sd = f"{row['miou_sd']:.1f}" if row["miou_sd"] is not None else "-"
        print(f"{row['lr']:>6g} {row['factor']:>4g} {row['iterations']:>10} {row['miou_mean']:>6.1f} {sd:>5}")
    for lr, ratio in summary["ratio_at_reference"].items():
        if ratio is None:
            print(f"lr {lr}: mIoU at the schedule / at 4x undefined (0 mIoU at 4x)")
            continue
        verdict = "past early training" if ratio >= 0.8 else "early training"
        print(f"lr {lr}: mIoU at the schedule / at 4x = {ratio:.2f} ({verdict})")
    if args.teacher:
        print(f"teacher: {100 * summary['teacher']['miou']:.1f} mIoU after {summary['teacher']['iterations']} iterations")
    print(f"written {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
