"""``kdrepro <command> [Hydra overrides]`` — every pipeline stage is one of these commands.

Overrides use Hydra syntax (``method=cwd``, ``budget.iterations=1000``, ``model@student=pspnet_r50``); configs are
composed from the packaged ``kdrepro/conf`` with Hydra's compose API (no working-directory change, no ``outputs/``).
User errors print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path

from kdrepro.errors import PREPARE_COMMAND, Interrupted, KdreproError, raise_on_signals, signal_received

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("print a model's parameter count and FLOPs", "kdrepro info model=pspnet_r101 input_size=[512,1024]"),
    "prepare": ("download / generate / validate a dataset", "kdrepro prepare dataset=synthetic"),
    "hardware": ("choose precision / channels_last / threads `auto` on this machine", "kdrepro hardware --params params.yaml"),
    "train": ("train one run under a budget (resumable)", "kdrepro train method=kd teacher_checkpoint=runs/teacher/checkpoint.pt"),
    "calibrate": ("measure each method's cost per iteration and match budgets", "kdrepro calibrate calibrate.methods=[none,kd,cwd]"),
    "evaluate": ("evaluate a checkpoint on the validation set", "kdrepro evaluate evaluate.checkpoint=runs/kd/checkpoint.pt"),
    "import-teacher": ("convert an mmsegmentation checkpoint into a kdrepro teacher", "kdrepro import-teacher pspnet_r101.pth profile=cityscapes"),
    "methods": ("list the registered distillation methods and their configs", "kdrepro methods"),
    "pretrain": ("pre-train (or import ImageNet) backbone weights", "kdrepro pretrain which=student out_dir=runs/synthetic/pretrain/student"),
    "teacher": ("train the teacher (or import teacher_import=<mmseg.pth>)", "kdrepro teacher profile=synthetic out_dir=runs/synthetic/teacher"),
    "results": ("tidy tables, statistics over seeds and the verdict", "kdrepro results runs_dir=runs/synthetic results_dir=results/synthetic"),
    "select": ("pick the segmentation-specific method to extend", "kdrepro select runs_dir=runs/synthetic results_dir=results/synthetic"),
    "validate": ("check a pipeline params file before any stage runs", "kdrepro validate --params params.yaml"),
    "plan": ("the whole pipeline's cost (hours, GPU-hours, memory) from a calibration", "kdrepro plan --params params.yaml"),
    "report-index": ("write reports/index.html linking the rendered reports", "kdrepro report-index runs_dir=runs/synthetic results_dir=results/synthetic"),
    "launch": ("run the out-of-date stages of dvc.yaml (or of [stage ...]) as jobs: SLURM or N local workers", "kdrepro launch --executor slurm gpu_type=a100"),
    "status": ("the last launch's jobs: queued, running, done, failed, with their logs", "kdrepro status"),
}
#: commands that train or time models: with KDREPRO_NPROC_PER_NODE > 1 (set by a launch job) they run under torchrun
TORCHRUN_COMMANDS = ("train", "teacher", "calibrate")


def _parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<15} {summary}\n  {'':<15}   e.g. {example}" for name, (summary, example) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="kdrepro",
        description="Compute-matched knowledge distillation for semantic segmentation.",
        epilog="commands:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs="*", help="Hydra overrides (key=value); import-teacher also takes a file path")
    parser.add_argument(
        "--params",
        metavar="FILE",
        help="a DVC params.yaml whose profile, seed, methods and calibrate settings become overrides (before yours)",
    )
    parser.add_argument("--executor", default="slurm", help="launch: slurm (one job per stage) or local (N workers here)")
    parser.add_argument("--workers", type=int, help="launch --executor local: how many stages run at once")
    parser.add_argument("--force", action="store_true", help="launch: every stage, changed or not (dvc repro -f)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback behind an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    overrides = [arg for arg in arguments.args if "=" in arg]
    positional = [arg for arg in arguments.args if "=" not in arg]
    advice = PREPARE_COMMAND.set(prepare_command(arguments.params, overrides))
    earlier = signal_received()  # only a signal during this command counts (tests call main() many times)
    try:
        if arguments.command in ("launch", "status"):
            return _launch_or_status(arguments, overrides, positional)
        handler = HANDLERS[arguments.command]
        if arguments.params:
            from kdrepro.pipeline.params import params_overrides

            overrides = [*params_overrides(Path(arguments.params)), *overrides]
        if positional and arguments.command != "import-teacher":
            raise KdreproError(f"unexpected argument(s) {positional}; overrides look like key=value")
        handler(overrides, positional)
    except KdreproError as error:
        received = signal_received()
        if received is not None and received is not earlier and not isinstance(error, Interrupted):
            return _interrupted(received)  # a library's reaction to a signal that came during this command
        if arguments.verbose and error.__cause__ is not None:  # -v: the traceback behind the one line
            traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", 2))
    except KeyboardInterrupt as error:  # a signal (kdrepro.errors.SignalInterrupt) or a bare Ctrl-C
        return _interrupted(error)
    finally:
        PREPARE_COMMAND.reset(advice)
    return 0


#: Override keys that choose the dataset (what `kdrepro prepare` must be given to prepare the same folder).
DATASET_KEYS = ("profile", "dataset")


def prepare_command(params: str | None, overrides: Sequence[str]) -> str:
    """The ``kdrepro prepare`` command for the dataset this command line composes (its params file, profile and
    dataset overrides), for the advice of dataset errors."""
    parts = ["kdrepro prepare", *([f"--params {params}"] if params else [])]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key.split(".", 1)[0] in DATASET_KEYS:
            parts.append(override)
    return " ".join(parts)


def _interrupted(error: KeyboardInterrupt) -> int:
    """The one ``error:`` line of a signal (:class:`kdrepro.errors.SignalInterrupt`) or a bare Ctrl-C; its exit code."""
    print(f"error: {error or 'interrupted by signal 2 (SIGINT); rerun the command'}", file=sys.stderr)
    return int(getattr(error, "exit_code", 130))


def run() -> None:
    """Console entry point (``kdrepro``, ``python -m kdrepro``): :func:`main`, then a fast process exit.

    Every output a command writes is complete (atomic renames, closed files) when :func:`main` returns, so the
    interpreter's teardown (unloading torch, dvclive's and DVC's exit hooks: ~0.3-0.8 s measured per process, paid
    by each of the ~40 processes of ``dvc repro``) buys nothing. Streams and log handlers are flushed and a
    torch.distributed process group is destroyed first.
    """
    raise_on_signals()
    try:
        _relaunch_under_torchrun(sys.argv[1:], os.environ)
        code = main()
    except KeyboardInterrupt as error:  # a signal before main() took over (the torchrun check): the same one line
        code = _interrupted(error)
    except Exception:  # a bug: its traceback, then the same fast exit (no exit hooks' noise after it)
        received = signal_received()
        if received is None:
            traceback.print_exc()
            code = 1
        else:  # a signal raised inside a library came out as another exception (kdrepro.errors.SignalInterrupt)
            code = _interrupted(received)
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def torchrun_argv(argv: Sequence[str], environ: Mapping[str, str]) -> list[str] | None:
    """``torchrun --standalone --nproc_per_node=N -m kdrepro <argv>`` when a launch job asks for N > 1 processes
    (``KDREPRO_NPROC_PER_NODE``) and this is a training command not yet under torchrun; else None."""
    from kdrepro.cluster.job import NPROC_ENV

    nproc = int(environ.get(NPROC_ENV, "1") or 1)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if nproc <= 1 or "WORLD_SIZE" in environ or command not in TORCHRUN_COMMANDS:
        return None
    torchrun = Path(sys.executable).parent / "torchrun"
    return [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "kdrepro", *argv]


def _relaunch_under_torchrun(argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Replace this process by torchrun running the same command (the stage's command stays what dvc.yaml says)."""
    command = torchrun_argv(argv, environ)
    if command is not None:
        sys.stdout.flush()
        os.execv(command[0], command)


def _launch_or_status(arguments: argparse.Namespace, overrides: list[str], targets: list[str]) -> int:
    """``kdrepro launch [stage ...]`` / ``kdrepro status`` in the repository root (the current directory)."""
    root = Path.cwd()
    if arguments.command == "status":
        if targets or overrides:
            raise KdreproError(f"kdrepro status takes no arguments, got {[*targets, *overrides]}")
        from kdrepro.cluster.status import format_rows, rows

        print(format_rows(rows(root)))
        return 0
    from kdrepro.cluster.launch import launch

    return launch(root, arguments.executor, arguments.workers, overrides, force=arguments.force, targets=targets)


def _info(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.models import build_segmentor, count_flops, count_parameters

    cfg = load_config(overrides, config_name="info")
    model = build_segmentor(cfg.model, int(cfg.dataset.num_classes))
    height, width = (int(v) for v in cfg.input_size)
    flops = count_flops(model, (1, 3, height, width))
    print(f"model            {cfg.model.name} (base width {cfg.model.base_width}, {cfg.dataset.num_classes} classes)")
    print(f"parameters       {count_parameters(model):,} ({count_parameters(model) / 1e6:.2f} M, auxiliary head included)")
    print(f"FLOPs            {flops / 1e9:.1f} GFLOPs at 1x3x{height}x{width} (torch.utils.flop_counter, inference)")
    print("channels         " + ", ".join(f"{k}={v}" for k, v in model.channels.items()))


def _prepare(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.data import prepare_dataset

    cfg = load_config(overrides)
    root = prepare_dataset(cfg.dataset)
    print(f"dataset {cfg.dataset.name} ready at {root}")


def _hardware(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.train.hardware import write_decision
    from kdrepro.train.speed_choice import speed_sentence

    decision, path = write_decision(load_config(overrides))
    print(f"{speed_sentence(decision)}\nwritten to {path}")


def _train(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.pipeline.params import method_from
    from kdrepro.train.seeds import train_seeds

    for metrics in train_seeds(load_config(method_from(overrides))):
        print(json.dumps({k: metrics.get(k) for k in ("method", "seed", "miou", "iterations", "train_seconds")}))


def passive_openmp(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask OpenMP threads to sleep, not spin, while they wait (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose
    a policy: calibration on CPUs then counts only the work in its CPU time. It takes effect only before torch (and
    its OpenMP runtime) loads, so ``kdrepro calibrate`` calls it first; returns whether the policy is passive."""
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:  # too late to change the runtime's policy
        return False
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def _calibrate(overrides: list[str], positional: list[str]) -> None:
    passive_openmp()  # before torch loads (kdrepro.train.calibrate's clock)
    from kdrepro.config import load_config
    from kdrepro.train.calibrate import calibrate
    from kdrepro.train.hardware import apply_speed
    from kdrepro.train.signals import watch_parent

    watch_parent()  # under dvc repro: a killed dvc ends the calibration too
    base = apply_speed(load_config(overrides))  # `auto` speed settings: the pipeline's decision, for every method
    table = calibrate(base, lambda name: apply_speed(load_config([*overrides, f"method={name}"])))
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports; every rank holds the same table
        return
    matched = table["matched"]
    print(f"matched budget {matched['budget_seconds']:.1f} s (reference {matched['reference_method']} x {matched['reference_iterations']} it)")
    for name, entry in table["methods"].items():
        spread = f"IQR {100 * entry['relative_spread']:3.0f} % of median" if "relative_spread" in entry else ""
        flag = "  DISTURBED: calibrate again on an idle machine" if name in table.get("disturbed", {}) else ""
        print(f"  {name:<16} {entry['seconds_per_iteration'] * 1000:8.1f} ms/it  {spread}  -> {matched['iterations'][name]} iterations{flag}")
    print(f"written to {base.calibrate.output}")


def _evaluate(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.evaluate_cli import evaluate_checkpoint

    result = evaluate_checkpoint(load_config(overrides))
    print(json.dumps({k: result[k] for k in ("miou", "pixel_accuracy")}))


def _import_teacher(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.train.teacher import import_teacher

    if len(positional) != 1:
        raise KdreproError("import-teacher takes exactly one mmsegmentation checkpoint path, e.g. kdrepro import-teacher pspnet.pth")
    output = import_teacher(load_config(overrides), Path(positional[0]))
    print(f"teacher written to {output}")


def _methods(overrides: list[str], positional: list[str]) -> None:
    from kdrepro import distill
    from kdrepro.config import options

    print("registered terms: " + ", ".join(distill.available()))
    print("method configs:   " + ", ".join(options("method")))


def _pretrain(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.train.pretrain import pretrain

    print(json.dumps(pretrain(load_config(overrides))))


def _teacher(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.train.teacher import teacher

    print(json.dumps(teacher(overrides)))


def _results(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.analysis.commands import results

    for path in results(overrides):
        print(f"written {path}")


def _select(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.analysis.commands import select

    print(json.dumps(select(overrides)))


def _validate(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import check_calibrate, load_config

    cfg = load_config(overrides)  # --params has been read and checked by now
    check_calibrate(cfg.calibrate)
    methods = [name for name in cfg.calibrate.methods if name != "none"]
    print(f"ok: profile {cfg.profile_name}, student alone + {len(methods)} methods: {', '.join(methods)}")


def _report_index(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.report.index import write_index
    from kdrepro.report.readers import locate

    cfg = load_config(overrides)  # reports/ by default; `+reports_dir=<folder>` writes elsewhere
    path = write_index(locate(str(cfg.profile_name), str(cfg.runs_dir), str(cfg.results_dir), str(cfg.get("reports_dir", "reports"))))
    print(f"written {path}")


def _plan(overrides: list[str], positional: list[str]) -> None:
    from kdrepro.config import load_config
    from kdrepro.plan import write_plan

    _, text, output = write_plan(load_config(overrides, config_name="plan"))
    print(text + f"\nwritten {output} and {output.with_suffix('.md')}")


HANDLERS: dict[str, Callable[[list[str], list[str]], None]] = {
    "plan": _plan,
    "info": _info,
    "prepare": _prepare,
    "hardware": _hardware,
    "train": _train,
    "calibrate": _calibrate,
    "evaluate": _evaluate,
    "import-teacher": _import_teacher,
    "methods": _methods,
    "pretrain": _pretrain,
    "teacher": _teacher,
    "results": _results,
    "select": _select,
    "report-index": _report_index,
    "validate": _validate,
}

if __name__ == "__main__":
    raise SystemExit(main())
