"""Does the embedded miniature preserve the paper's cost ratios between methods?

``python benchmarks/cost_fidelity.py [--profiles cityscapes synthetic smoke] [--methods ...] [--method-override
METHOD:KEY=VALUE ...] [Hydra overrides]`` (overrides change the miniatures only: a proposal, measured against the
paper's size as configured)

The paper's claim is about compute: a miniature can judge it only if every method's cost *relative to the reference
method* (canonical logit KD, ``conf/roles.yaml``) is about what it is at the paper's size. For every method of the
pipeline (the student alone and ``params.yaml``'s methods) this counts the FLOPs of one full training step (teacher
forward, student forward + backward, the distillation terms, the method's extra step such as SKD's critic update) with
the calibration's own counter (:func:`kdrepro.train.calibrate.step_flops`), at each profile's crop, widths, classes,
memory banks and batch *per process* (the paper's global batch 8 runs as 2 per GPU on 4 GPUs:
``kdrepro/conf/cluster/<profile>.yaml``). It prints each method's FLOP ratio to the reference at each size and the
quotient miniature / paper, flagging quotients outside [0.67, 1.5], and writes ``benchmarks/results/cost_fidelity.json``.

Nothing is computed: models, losses and optimisers run on the ``meta`` device (shapes only), so the paper's size
costs seconds and no memory. Only integer tensors -- the labels and what is derived from them alone, the methods'
integer state such as CIRKD's queue pointers -- are real CPU tensors, so data-dependent steps (BPKD's classes
present, CIRKD's queue slots) take the paths real data would; where such a tensor meets a ``meta`` one it becomes
``meta`` (:class:`MetaWithRealIntegers`). ``--check-real PROFILE`` counts that profile again on real CPU tensors and
fails unless every method's count is identical. Random initialisation, random labels: no dataset, no weights.

The counter sees matrix products and convolutions only (``torch.utils.flop_counter``'s registry); element-wise work
(softmaxes, KL terms, normalisations, pooling) counts zero, at every size alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.fx.experimental._config as fx_config
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from kdrepro.cluster.resources import cluster_config
from kdrepro.config import load_config, roles
from kdrepro.errors import ConfigError
from kdrepro.models import build_segmentor
from kdrepro.pipeline.params import read_params
from kdrepro.train.calibrate import AtenFlopCounter, step_flops
from kdrepro.train.trainer import Trainer, method_uses_teacher

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "cost_fidelity.json"
PAPER = "cityscapes"
MINIATURES = ("synthetic", "smoke")
#: a miniature is faithful for a method when its ratio to the reference is within this factor range of the paper's
FAITHFUL = (0.67, 1.5)
#: what every count fixes: fp32 on the CPU layout, no pretrained weights (FLOPs do not depend on the values)
FIXED = ("precision=fp32", "channels_last=false", "threads=null", "compile=false", "student.pretrained=null",
         "teacher.pretrained=null", "teacher_checkpoint=null")  # fmt: skip


def pipeline_methods(params: Path = ROOT / "params.yaml") -> list[str]:
    """The student alone (the control) and every method ``params.yaml`` lists, in its order."""
    return [roles().control, *read_params(params).get("methods", [])]


def process_batch(cfg: DictConfig, profile: str) -> int:
    """Images per process: the profile's global batch over the GPUs its cluster file gives a training job."""
    gpus = max(1, int(cluster_config(profile).gpus))
    batch = int(cfg.loader.batch_size)
    if batch % gpus:
        raise ConfigError(f"profile {profile}: batch {batch} does not split over {gpus} GPUs; fix loader.batch_size")
    return batch // gpus


class MetaWithRealIntegers(TorchDispatchMode):
    """Runs ops whose tensors are all real as they are, and ops that meet a ``meta`` tensor on ``meta``: any real
    tensor among their arguments is replaced by a ``meta`` one of its shape (values are then lost, shapes kept).
    A Python number read from a ``meta`` tensor (``float(loss)`` for a log line) is 0."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return False if args[0].dtype == torch.bool else 0
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors) and any(t.device.type != "meta" for t in tensors):
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        return func(*args, **kwargs)


def _to_meta(leaf: Any) -> Any:
    return leaf.to("meta") if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta" else leaf


def _autocast_allowing_meta(autocast: Any) -> Any:
    """``torch.autocast`` that is a no-op for ``device_type="meta"`` (torch refuses it; every count runs in fp32)."""

    def patched(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    return patched


@contextlib.contextmanager
def meta_counting() -> Iterator[None]:
    """What running a training step on ``meta`` needs: autocast accepting the device, ``nonzero`` of a ``meta``
    tensor assuming every element non-zero (the largest output; only reached when its input is not label-derived),
    real-integer propagation (:class:`MetaWithRealIntegers`)."""
    with mock.patch.object(torch, "autocast", _autocast_allowing_meta(torch.autocast)), \
            mock.patch.object(fx_config, "meta_nonzero_assume_all_nonzero", True), MetaWithRealIntegers():  # fmt: skip
        yield


def compose(profile: str, method: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The method's training config at ``profile``'s size (fp32, random init)."""
    return load_config([f"profile={profile}", f"method={method}", *FIXED, *overrides])


def build_trainer(cfg: DictConfig, device: torch.device) -> Trainer:
    """A trainer with a random-init frozen teacher on ``device``; on ``meta`` the method's integer state (e.g.
    queue pointers) is made real (zeros: every method starts its integer state at zero, see the tests)."""
    teacher = None
    if method_uses_teacher(cfg.method):
        with torch.device(device):
            teacher = build_segmentor({**OmegaConf.to_container(cfg.teacher, resolve=True), "pretrained": None},
                                      int(cfg.dataset.num_classes)).eval()  # fmt: skip
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    with torch.device(device) if device.type == "meta" else contextlib.nullcontext():  # no memory bank in memory
        trainer = Trainer(cfg, device, teacher)
    if device.type == "meta":
        for module in trainer.distiller.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and not buffer.dtype.is_floating_point:
                    setattr(module, name, torch.zeros(buffer.shape, dtype=buffer.dtype))
    return trainer


def random_batch(cfg: DictConfig, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images on ``device`` (values irrelevant), labels always real: random classes in 8×8-pixel blocks, with some
    unlabelled (255) blocks, as street scenes have regions and unlabelled pixels."""
    height, width = (int(size) for size in cfg.dataset.crop_size)
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, int(cfg.dataset.num_classes) + 1, (batch, math.ceil(height / 8), math.ceil(width / 8)),
                           generator=generator)  # fmt: skip
    blocks[blocks == int(cfg.dataset.num_classes)] = int(cfg.dataset.ignore_index)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :height, :width].contiguous()
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    return images, labels


def count(profile: str, method: str, overrides: Sequence[str] = (), device: str = "meta") -> dict[str, Any]:
    """FLOPs of one training step of ``method`` at ``profile``'s size on one process's batch, split by phase."""
    cfg = compose(profile, method, overrides)
    batch = process_batch(cfg, profile)
    torch.manual_seed(0)
    where = torch.device(device)
    with meta_counting() if where.type == "meta" else contextlib.nullcontext():
        trainer = build_trainer(cfg, where)
        images, labels = random_batch(cfg, batch, where)
        counter = step_flops(trainer, images, labels)
        pretrain = pretrain_flops(trainer, images, labels)
    iterations = trainer.distiller.pretrain_iterations
    return {"flops": counter.total, "by_phase": dict(sorted(counter.by_phase.items())), "batch": batch,
            "pretrain_flops_per_iteration": pretrain, "pretrain_iterations": iterations,
            "amortised_flops": counter.total + pretrain * iterations / int(cfg.reference_iterations)}  # fmt: skip


def pretrain_flops(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one step of the method's pre-training stage (e.g. MasKD's mask tokens), 0 without one."""
    if not trainer.distiller.pretrain_iterations:
        return 0
    counter = AtenFlopCounter()
    trainer.teacher_grad_context = torch.no_grad  # inference mode would bypass the counter
    try:
        with counter:
            trainer.pretrain_step(images, labels)
    finally:
        trainer.teacher_grad_context = torch.inference_mode
    return counter.total


def setting(profile: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What a profile's size is: crop, classes, widths, batch per process, memory bank scale."""
    cfg = compose(profile, roles().logit_kd, overrides)
    return {"crop": list(cfg.dataset.crop_size), "classes": int(cfg.dataset.num_classes),
            "student": f"{cfg.student.name} width {cfg.student.base_width}",
            "teacher": f"{cfg.teacher.name} width {cfg.teacher.base_width}",
            "batch_per_process": process_batch(cfg, profile), "memory_bank_scale": float(cfg.memory_bank_scale)}  # fmt: skip


def ratios(counts: dict[str, dict[str, Any]], reference: str, key: str = "flops") -> dict[str, float]:
    """Each method's FLOPs (``key``: per step, or ``amortised_flops`` with its pre-training) over the reference's."""
    if reference not in counts:
        raise ConfigError(f"the reference method {reference} was not counted; add it to --methods")
    return {name: entry[key] / counts[reference][key] for name, entry in counts.items()}


def fidelity(paper: dict[str, float], miniature: dict[str, float], band: tuple[float, float] = FAITHFUL) -> dict[str, dict[str, Any]]:
    """Per method: the quotient miniature ratio / paper ratio and whether it leaves ``band``."""
    out = {}
    for name, ratio in paper.items():
        quotient = miniature[name] / ratio
        out[name] = {"quotient": quotient, "flagged": not band[0] <= quotient <= band[1]}
    return out


def table(results: dict[str, Any]) -> str:
    """The markdown table: per method, the ratio to the reference at every size and each miniature's quotient."""
    paper, miniatures = results["paper"], results["miniatures"]
    head = f"| method | {paper} ratio to {results['reference']} |"
    rule = "|---|---:|"
    for name in miniatures:
        head += f" {name} ratio | {name} / {paper} |"
        rule += "---:|---:|"
    lines = [head, rule]
    for method in results["methods"]:
        row = f"| {method} | {results['ratios'][paper][method]:.3f} |"
        for name in miniatures:
            entry = results["fidelity"][name][method]
            flag = " **FLAGGED**" if entry["flagged"] else ""
            row += f" {results['ratios'][name][method]:.3f} | {entry['quotient']:.2f}{flag} |"
        lines.append(row)
    for method in results["methods"]:
        if any(results["counts"][profile][method]["pretrain_iterations"] for profile in results["counts"]):
            cells = ", ".join(f"{profile} {results['amortised_ratios'][profile][method]:.3f}" for profile in results["counts"])
            quotients = ", ".join(f"{name} / {paper} {results['amortised_fidelity'][name][method]['quotient']:.2f}"
                                  for name in miniatures)  # fmt: skip
            lines.append(f"\n{method} with its pre-training amortised over the reference schedule: {cells} ({quotients})")
    return "\n".join(lines)


def own_costs(counts: dict[str, dict[str, Any]], reference: str, control: str) -> dict[str, float]:
    """Each method's FLOPs beyond the reference's, in training steps of the student alone (``control``): what the
    method adds, free of the teacher's share (for the student alone: minus the teacher's forward)."""
    return {name: (entry["flops"] - counts[reference]["flops"]) / counts[control]["flops"] for name, entry in counts.items()}


def own_cost_table(results: dict[str, Any]) -> str:
    """Per method, its own cost (:func:`own_costs`) at every size and each miniature's quotient."""
    profiles = list(results["counts"])
    lines = ["| method | " + " | ".join(f"{profile} own cost" for profile in profiles) + " | "
             + " | ".join(f"{name} / {results['paper']}" for name in results["miniatures"]) + " |",
             "|---|" + "---:|" * (2 * len(profiles) - 1)]  # fmt: skip
    own = results["own_costs"]
    for method in results["methods"]:
        if method == results["reference"]:
            continue
        quotients = [own[name][method] / own[results["paper"]][method] if own[results["paper"]][method] else math.nan
                     for name in results["miniatures"]]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(f"{own[profile][method]:+.3g}" for profile in profiles) + " | "
                     + " | ".join(f"{q:.3g}" for q in quotients) + " |")  # fmt: skip
    return "\n".join(lines)


def phase_table(results: dict[str, Any]) -> str:
    """GFLOPs per phase of every count, so a distortion can be traced to its term."""
    lines = ["| profile | method | GFLOP | teacher | student | distill | backward | method_step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for profile, counts in results["counts"].items():
        for method, entry in counts.items():
            phases = entry["by_phase"]
            cells = " | ".join(f"{phases.get(p, 0) / 1e9:.3g}" for p in ("teacher", "student", "distill", "backward", "method_step"))
            lines.append(f"| {profile} | {method} | {entry['flops'] / 1e9:.4g} | {cells} |")
    return "\n".join(lines)


def measure(profiles: Sequence[str], methods: Sequence[str], reference: str, overrides: Sequence[str] = (),
            per_method: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Count every method at every profile; ``profiles[0]`` is the paper's size, the others miniatures of it, which
    ``overrides`` (every method) and ``per_method`` (``{method: overrides}``) change: a proposal."""
    counts: dict[str, dict[str, Any]] = {}
    for index, profile in enumerate(profiles):
        counts[profile] = {}
        for method in methods:
            start = time.perf_counter()
            changes = [*overrides, *(per_method or {}).get(method, [])] if index else []
            counts[profile][method] = count(profile, method, changes)
            print(f"  {profile} {method}: {counts[profile][method]['flops'] / 1e9:.4g} GFLOP "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    paper, miniatures = profiles[0], list(profiles[1:])
    by_profile = {profile: ratios(counts[profile], reference) for profile in profiles}
    amortised = {profile: ratios(counts[profile], reference, "amortised_flops") for profile in profiles}
    return {
        "reference": reference, "paper": paper, "miniatures": miniatures, "methods": list(methods),
        "band": list(FAITHFUL), "miniature_overrides": {"all": list(overrides), **(per_method or {})},
        "torch": torch.__version__,
        "settings": {profile: setting(profile, overrides if index else []) for index, profile in enumerate(profiles)},
        "counts": counts, "ratios": by_profile,
        "fidelity": {name: fidelity(by_profile[paper], by_profile[name]) for name in miniatures},
        "own_costs": {profile: own_costs(counts[profile], reference, roles().control) for profile in profiles}
        if roles().control in methods else {},
        "amortised_ratios": amortised,
        "amortised_fidelity": {name: fidelity(amortised[paper], amortised[name]) for name in miniatures},
    }  # fmt: skip


def check_real(profile: str, meta: dict[str, dict[str, Any]]) -> list[str]:
    """Methods whose ``meta`` count at ``profile`` differs from the count on real CPU tensors (empty: all agree)."""
    wrong = []
    for method, entry in meta.items():
        real = count(profile, method, device="cpu")
        if (real["flops"], real["pretrain_flops_per_iteration"]) != (entry["flops"], entry["pretrain_flops_per_iteration"]):
            wrong.append(f"{method} ({entry['flops']} on meta, {real['flops']} on real tensors)")
    return wrong


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=[PAPER, *MINIATURES], help="the paper's size first")
    parser.add_argument("--methods", nargs="+", default=None, help="default: the student alone + params.yaml's")
    parser.add_argument("--reference", default=roles().logit_kd)
    parser.add_argument("--output", type=Path, default=RESULT, help="'-' writes no file")
    parser.add_argument("--check-real", metavar="PROFILE", help="also count PROFILE on real CPU tensors; exit 1 on any difference")
    parser.add_argument("--method-override", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a Hydra override of one method's miniature configs (repeatable), e.g. "
                             "cirkd:method.terms.cirkd.pixel_contrast_size=512")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every miniature config (a proposal)")
    args = parser.parse_args(argv)
    methods = args.methods or pipeline_methods()
    if args.reference not in methods:
        methods = [args.reference, *methods]
    torch.set_num_threads(1)
    per_method: dict[str, list[str]] = {}
    for item in args.method_override:
        method, _, override = item.partition(":")
        if method not in methods or "=" not in override:
            raise ConfigError(f"--method-override {item!r} must be METHOD:KEY=VALUE with METHOD one of {', '.join(methods)}")
        per_method.setdefault(method, []).append(override)
    results = measure(args.profiles, methods, args.reference, args.overrides, per_method)
    print(table(results))
    print()
    if results["own_costs"]:
        print("own cost: FLOPs beyond kd's, in training steps of the student alone")
        print(own_cost_table(results))
        print()
    print(phase_table(results))
    flagged = sorted({m for entries in results["fidelity"].values() for m, e in entries.items() if e["flagged"]})
    print(f"\nflagged (quotient outside [{FAITHFUL[0]}, {FAITHFUL[1]}]): {', '.join(flagged) or 'none'}")
    if str(args.output) != "-":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.output}")
    if args.check_real:
        if args.overrides or per_method:
            raise ConfigError("--check-real counts the profiles as configured; drop the overrides")
        meta = results["counts"].get(args.check_real) or measure([args.check_real], methods, args.reference)["counts"][args.check_real]
        wrong = check_real(args.check_real, meta)
        print(f"meta against real tensors at {args.check_real}: {'identical' if not wrong else 'DIFFERENT: ' + ', '.join(wrong)}")
        return 1 if wrong else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
