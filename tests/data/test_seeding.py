"""Per-sample seeding of the training stream: a pure function of (seed, epoch, index), whatever the global RNG,
the number of loader workers or the iteration a loader starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.data.io import SegmentationDataset, write_png
from kdrepro.data.labels import valid_train_ids
from kdrepro.data.loader import SeededAugmentation, training_loader
from kdrepro.data.transforms import train_transform

CFG = OmegaConf.create(
    {"image_scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": [24, 40], "cat_max_ratio": 0.75,
     "flip_prob": 0.5, "photometric": True, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
     "ignore_index": 255}
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SegmentationDataset:
    """Six random 32x64 images with blocky 19-class labels, with the training transforms."""
    root = tmp_path_factory.mktemp("seeding")
    rng = np.random.default_rng(0)
    files, label_files = [], []
    for index in range(6):
        files.append(root / f"{index}_image.png")
        label_files.append(root / f"{index}_label.png")
        write_png(files[-1], rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
        write_png(label_files[-1], rng.integers(0, 19, (4, 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1))
    return SegmentationDataset("seeding", files, label_files, valid_train_ids(19), joint_transform=train_transform(CFG))


def assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_depends_only_on_seed_epoch_and_index(dataset):
    augmented = SeededAugmentation(dataset, seed=3)
    torch.manual_seed(0)
    first = augmented[(2, 4)]
    torch.manual_seed(12345)
    torch.rand(1000)
    assert_same(SeededAugmentation(dataset, seed=3)[(2, 4)], first)
    image, label = first
    assert image.shape == (3, 24, 40) and image.dtype == torch.float32 and label.dtype == torch.int64
    others = [augmented[(3, 4)][0], SeededAugmentation(dataset, seed=4)[(2, 4)][0], augmented[(2, 3)][0]]
    assert not any(torch.equal(image, other) for other in others)


def test_sample_does_not_touch_the_global_rng(dataset):
    state = torch.get_rng_state()
    SeededAugmentation(dataset, seed=0)[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)


def test_getitem_draws_its_generator_from_the_global_rng(dataset):
    torch.manual_seed(7)
    first = dataset[2]
    torch.manual_seed(7)
    assert_same(dataset[2], first)


def _batches(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_loader_stream_ignores_workers_and_resumes_exactly(dataset):
    straight = _batches(training_loader(dataset, batch_size=2, seed=5), 5)  # crosses an epoch boundary (3 per epoch)
    for batch, expected in zip(_batches(training_loader(dataset, 2, 5, num_workers=2), 5), straight, strict=True):
        assert_same(batch, expected)
    for batch, expected in zip(
        _batches(training_loader(dataset, 2, 5, start_iteration=2), 3), straight[2:], strict=True
    ):
        assert_same(batch, expected)
