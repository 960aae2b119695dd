"""Shared fixtures: a tiny synthetic dataset and a tiny teacher, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdrepro.config import load_config

torch.set_num_threads(2)


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
        "precision=fp32",  # the embedded profile trains in bf16; unit tests compare numbers (bf16 has its own test)
        "channels_last=false",
        "optim.lr=0.01",
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
    from kdrepro.pipeline import teacher

    out = tmp_path_factory.mktemp("teacher")
    teacher([*tiny_dataset, f"out_dir={out}", "teacher_iterations=3"])
    return [*tiny_dataset, f"teacher_checkpoint={out / 'checkpoint.pt'}"]
