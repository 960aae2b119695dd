"""DDP on CPU (gloo, 2 processes): the same global batch gives the same losses and gradients as one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdrepro.config import load_config
from kdrepro.distributed import DistributedContext, shard
from kdrepro.errors import ConfigError
from kdrepro.train.trainer import Trainer

pytestmark = pytest.mark.slow
WORLD = 2


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    images = torch.randn(4, 3, 32, 64, generator=generator)
    labels = torch.randint(0, 7, (4, 32, 64), generator=generator)  # the 7 categories; no ignore pixels: equal pixels per rank
    return images, labels


def _step(overrides: list[str], context: DistributedContext) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    trainer = Trainer(load_config(overrides), torch.device("cpu"), context=context)
    # eval-mode BN/dropout: SyncBatchNorm needs GPUs, and per-rank batch statistics differ by definition
    trainer.student.eval()
    trainer.student.aux_in_eval = True
    for module in trainer.distiller.modules():  # e.g. CIRKD's embedding head (SyncBatchNorm with sync_bn=true on GPUs)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    images, labels = _global_batch()
    torch.manual_seed(5)  # the methods' random draws are the same on every rank
    result = trainer.step(shard(images, context), shard(labels, context), progress=0.0)
    out = {f"loss/{k}": v.detach().reshape(1) for k, v in result.losses.items()}
    named = [*trainer.student.named_parameters(), *(("distiller." + n, p) for n, p in trainer.distiller.named_parameters())]
    out.update({f"grad/{name}": p.grad.clone() for name, p in named if p.grad is not None})
    return out


def _worker(rank: int, init_file: str, overrides: list[str], result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        out = _step(overrides, DistributedContext(rank=rank, world_size=WORLD))
        # per-rank losses are means over the local half: the global loss is their mean
        for key in [k for k in out if k.startswith("loss/")]:
            dist.all_reduce(out[key])
            out[key] /= WORLD
        if rank == 0:
            torch.save(out, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["kd", "cirkd"])
def test_two_process_gloo_matches_single_process(method, tiny_teacher, tmp_path):
    overrides = [*tiny_teacher, f"method={method}", "loader.batch_size=4"]
    single = _step(overrides, DistributedContext())
    result_file = str(tmp_path / "ddp.pt")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(str(tmp_path / "init"), overrides, result_file), nprocs=WORLD, join=True)
    ddp = torch.load(result_file)
    assert set(ddp) == set(single)
    assert any(k.startswith("grad/distiller.") for k in single) or method == "kd"
    for key, value in single.items():
        assert torch.allclose(ddp[key], value, rtol=1e-4, atol=1e-6), f"{method}: {key} differs under DDP"


def test_torchrun_trains_with_rank_zero_writing_the_run(tiny_teacher, tmp_path):
    """The whole `kdrepro train` under torchrun (2 gloo processes): one run folder, written by rank 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    command = [str(torchrun), "--nproc_per_node=2", "-m", "kdrepro", "train", *tiny_teacher, "method=kd",
               "loader.batch_size=4", "threads=1", f"out_dir={out}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 4
    # a global batch that leaves one image per process is refused with a one-line error before training
    bad = subprocess.run([*command[:-2], "loader.batch_size=2", f"out_dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "must split into at least 2 images" in bad.stderr
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_setup_device_is_the_one_place_a_command_learns_where_it_runs(monkeypatch):
    from kdrepro.distributed import setup_device

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context, device = setup_device("cpu")
    assert not context.enabled and device == torch.device("cpu")
    assert setup_device("auto")[1].type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; use device=cpu or device=auto"):
            setup_device("cuda")
