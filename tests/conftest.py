"""Shared fixtures: a tiny synthetic dataset and a tiny teacher, built once per test session, and seeded model outputs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdrepro.config import load_config
from kdrepro.models.output import SegOutput

torch.set_num_threads(2)
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))  # tests/smoke_pipeline.py (appended: it shadows no installed module)

from smoke_pipeline import copy_finished, run_finished_smoke  # noqa: E402


def tiny_overrides(root: Path) -> list[str]:
    """A configuration small enough for unit tests: width-8 models, 32x64 crops, batch 2, 4 iterations."""
    return [
        f"dataset.root={root}",
        "dataset.generate.num_train=8",
        "dataset.generate.num_val=3",
        "dataset.generate.height=64",
        "dataset.generate.width=128",
        "dataset.image_scale=[128,64]",
        "dataset.test_scale=[128,64]",
        "dataset.crop_size=[32,64]",
        "student.base_width=8",
        "teacher.base_width=8",
        "model@teacher=pspnet_r50",
        "loader.batch_size=2",
        "reference_iterations=4",
        "memory_bank_scale=0.01",
        "checkpoint_every_seconds=0",
        "log_every=1",
        "precision=fp32",  # the embedded profile chooses per machine (auto); unit tests compare numbers in fp32
        "channels_last=false",
        "optim.lr=0.01",
        "student.pretrained=null",  # the profile's pre-trained backbones are a pipeline stage's output
        "teacher.pretrained=null",
        "eval_points=0",
    ]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> list[str]:
    """Overrides pointing at a generated 8-train / 3-val synthetic dataset of 64x128 images."""
    from kdrepro.data import prepare_dataset

    root = tmp_path_factory.mktemp("synthetic")
    overrides = tiny_overrides(root)
    prepare_dataset(load_config(overrides).dataset)
    return overrides


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset, tmp_path_factory) -> list[str]:
    """Overrides of ``tiny_dataset`` plus ``teacher_checkpoint`` of a teacher trained for 3 iterations."""
    from kdrepro.train.teacher import teacher

    out = tmp_path_factory.mktemp("teacher")
    teacher([*tiny_dataset, f"out_dir={out}", "teacher_iterations=3"])
    return [*tiny_dataset, f"teacher_checkpoint={out / 'checkpoint.pt'}"]


@pytest.fixture(scope="session")
def finished_smoke(tmp_path_factory) -> Path:
    """A repository copy with the smoke pipeline run to the end once per session (``smoke_pipeline.SMOKE_PARAMS``).
    Tests must not change it: take a copy with ``smoke_copy``."""
    return run_finished_smoke(tmp_path_factory.mktemp("finished_smoke"))


@pytest.fixture
def smoke_copy(finished_smoke, tmp_path) -> Path:
    """This test's own copy of the finished smoke pipeline (``finished_smoke``), up to date for DVC."""
    return copy_finished(finished_smoke, tmp_path / "repo")


SegOutputFactory = Callable[..., SegOutput]


def make_seg_output(
    channels: dict[str, int], batch: int = 2, size: int = 8, grad: bool = False, seed: int = 0, aux: bool = False
) -> SegOutput:
    """A random output of a model with ``channels`` (feature name -> channels, ``logits`` -> classes).

    Every map is ``(batch, channels, size, size)`` drawn from one generator seeded with ``seed``: the features in the
    order of ``channels``, then the logits, then (with ``aux``) the auxiliary logits. ``grad`` makes them leaves that
    collect gradients, as a student's outputs.
    """
    generator = torch.Generator().manual_seed(seed)

    def tensor(count: int) -> torch.Tensor:
        return torch.randn(batch, count, size, size, generator=generator).requires_grad_(grad)

    features = {name: tensor(count) for name, count in channels.items() if name != "logits"}
    logits = tensor(channels["logits"])
    return SegOutput(logits=logits, aux_logits=tensor(channels["logits"]) if aux else None, features=features)


@pytest.fixture
def seg_output() -> SegOutputFactory:
    """``seg_output(channels, batch=2, size=8, grad=False, seed=0, aux=False)``: see :func:`make_seg_output`."""
    return make_seg_output
