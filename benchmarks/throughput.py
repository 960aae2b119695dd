"""Training throughput: a reference-codebase-style fp32 eager loop vs kdrepro's optimised loop, side by side.

For each method, both loops train the same student/teacher architecture on the same in-memory batch, interleaved
(A B A B ...) so that drift hits both alike; medians over rounds. Printed per method: seconds/iteration and images/s
of (a) the reference style (fp32, NCHW, teacher under ``no_grad``, cudnn.benchmark off, per-parameter SGD) and (b)
kdrepro (bf16 autocast, channels_last, teacher under ``inference_mode``, cudnn.benchmark, fused SGD on CUDA), their
ratio, FLOPs per iteration (``torch.utils.flop_counter`` formulas, fp32 graph) and model FLOP utilisation against the
device's dense bf16 peak where it is known.

    python benchmarks/throughput.py                      # CPU-sized: synthetic profile, width 16, 64x128, batch 4
    python benchmarks/throughput.py --paper              # paper size: width 64, 512x1024, batch 8 (GPU)
    python benchmarks/throughput.py --methods kd,cwd,cirkd --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdrepro.config import load_config
from kdrepro.distributed import resolve_device
from kdrepro.models import build_segmentor
from kdrepro.train.calibrate import AtenFlopCounter
from kdrepro.train.timing import synchronize
from kdrepro.train.trainer import Trainer

#: dense bf16 tensor-core peaks (FLOP/s) by device-name fragment
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "4090": 165.2e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def build(method: str, paper: bool, optimised: bool, device: torch.device, teacher: torch.nn.Module) -> Trainer:
    overrides = [f"method={method}", "memory_bank_scale=0.05" if not paper else "memory_bank_scale=1.0"]
    if paper:
        overrides += ["profile=cityscapes", "loader.batch_size=8"]
    if optimised:
        overrides += ["precision=bf16", "channels_last=true"]
    trainer = Trainer(load_config(overrides), device, teacher=teacher)
    if not optimised:
        trainer.teacher_grad_context = torch.no_grad
        trainer.optimizer = torch.optim.SGD(trainer.optimizer.param_groups, lr=0.01, momentum=0.9, foreach=False)
    return trainer


def timed(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, benchmark_cudnn: bool) -> float:
    torch.backends.cudnn.benchmark = benchmark_cudnn
    images = images.contiguous(memory_format=trainer.memory_format)
    synchronize(trainer.device)
    start = time.perf_counter()
    trainer.step(images, labels, progress=0.0)
    synchronize(trainer.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="paper sizes: width 64, 512x1024, batch 8")
    parser.add_argument("--methods", default="kd,fitnet,cwd,cirkd", help="comma-separated method configs")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    base = load_config(["profile=cityscapes"] if args.paper else [])
    if not args.paper:
        torch.set_num_threads(int(base.threads or torch.get_num_threads()))
    height, width = (int(v) for v in base.dataset.crop_size)
    batch = 8 if args.paper else int(base.loader.batch_size)
    images = torch.randn(batch, 3, height, width, device=device)
    labels = torch.randint(0, 19, (batch, height, width), device=device)
    teacher = build_segmentor(base.teacher, 19).to(device).eval().requires_grad_(False)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; student {base.student.name} w{base.student.base_width}, teacher {base.teacher.name} "
          f"w{base.teacher.base_width}; batch {batch}, crop {height}x{width}; medians of {args.rounds} interleaved rounds")
    print(f"{'method':<10} {'ref s/it':>9} {'ref img/s':>10} {'kdrepro s/it':>13} {'img/s':>8} {'speed-up':>9} "
          f"{'GFLOP/it':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for method in args.methods.split(","):
        reference = build(method, args.paper, False, device, teacher)
        optimised = build(method, args.paper, True, device, teacher)
        counter = AtenFlopCounter()
        reference.teacher_grad_context = torch.no_grad
        with counter:
            reference.step(images, labels, progress=0.0)
        for _ in range(args.warmup):
            timed(reference, images, labels, False), timed(optimised, images, labels, True)
        ref_times, opt_times = [], []
        for _ in range(args.rounds):
            ref_times.append(timed(reference, images, labels, False))
            opt_times.append(timed(optimised, images, labels, True))
        ref, opt = statistics.median(ref_times), statistics.median(opt_times)
        achieved = counter.total / opt
        mfu = f"{100 * achieved / peak:5.1f}%" if peak else "   n/a"
        print(f"{method:<10} {ref:9.4f} {batch / ref:10.1f} {opt:13.4f} {batch / opt:8.1f} {ref / opt:8.2f}x "
              f"{counter.total / 1e9:9.1f} {achieved / 1e12:8.3f} {mfu}")
        del reference, optimised
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
