"""ADE20K layout: reduce_zero_label applied exactly once, pairing, errors, prepare with a mocked download + MD5."""

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdrepro.data import build_dataset, class_names, palette, prepare_dataset, reduce_zero_label
from kdrepro.data.ade20k import ADE20K_CLASSES, MD5, URL
from kdrepro.errors import ConfigError, DatasetError

HEIGHT, WIDTH = 32, 64
STEMS = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}


def cfg_for(root: Path, **overrides):
    base = {"name": "ade20k", "layout": "ade20k", "root": str(root), "num_classes": 150, "ignore_index": 255,
            "reduce_zero_label": True, "image_scale": [128, 32], "ratio_range": [0.5, 2.0], "crop_size": [32, 32],
            "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True, "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375], "test_scale": [256, 16], "eval_mode": "whole",
            "download": {"url": URL, "md5": MD5}}  # fmt: skip
    return OmegaConf.create({**base, **overrides})


def annotation(seed: int) -> np.ndarray:
    """ADE20K annotation values: 0 (other) and classes 1..150, in vertical stripes (so crops keep several)."""
    values = np.random.default_rng(seed).choice([0, 1, 2, 75, 150], size=WIDTH // 4)
    return np.repeat(values, 4)[None].repeat(HEIGHT, 0).astype(np.uint8)


def write_tree(root: Path) -> Path:
    for split, stems in STEMS.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index, stem in enumerate(stems):
            image = np.random.default_rng(index).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray(annotation(index)).save(root / "annotations" / split / f"{stem}.png")
    return root


def no_download(*args):
    raise AssertionError("prepare must not download when the root exists")


def test_reduce_zero_label_values():
    raw = np.array([0, 1, 2, 75, 150, 255], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [255, 0, 1, 74, 149, 255]


def test_dataset_applies_reduce_zero_label_exactly_once(tmp_path):
    root = write_tree(tmp_path / "ade")
    dataset = build_dataset(cfg_for(root), "train", train_transforms=False)
    _, label = dataset[1]
    expected = reduce_zero_label(annotation(1)).astype(np.int64)
    np.testing.assert_array_equal(label.numpy(), expected)
    assert not np.array_equal(label.numpy(), reduce_zero_label(reduce_zero_label(annotation(1))))
    assert set(label.unique().tolist()) <= {0, 1, 74, 149, 255}


def test_training_pipeline_does_not_reduce_again(tmp_path):
    root = write_tree(tmp_path / "ade")
    # identity geometry: scale = image size, ratio 1, crop = image, no flip/photometric; then pad to 40 rows
    cfg = cfg_for(root, image_scale=[64, 32], ratio_range=[1.0, 1.0], crop_size=[40, 64], flip_prob=0.0, photometric=False)
    torch.manual_seed(0)
    _, label = build_dataset(cfg, "train", train_transforms=True)[0]
    assert label.shape == (40, 64)
    np.testing.assert_array_equal(label[:HEIGHT].numpy(), reduce_zero_label(annotation(0)))
    assert (label[HEIGHT:] == 255).all()


def test_without_reduce_zero_label_needs_151_classes(tmp_path):
    root = write_tree(tmp_path / "ade")
    with pytest.raises(ConfigError, match="expected 151"):
        build_dataset(cfg_for(root, reduce_zero_label=False), "val", train_transforms=False)
    dataset = build_dataset(cfg_for(root, reduce_zero_label=False, num_classes=151), "val", train_transforms=False)
    np.testing.assert_array_equal(dataset[0][1].numpy(), annotation(0))


def test_eval_resizes_image_only(tmp_path):
    root = write_tree(tmp_path / "ade")
    image, label = build_dataset(cfg_for(root), "val", train_transforms=False)[0]
    assert image.shape == (3, 16, 32) and label.shape == (HEIGHT, WIDTH)  # short side 16 (test_scale [256, 16])


def test_pairs_and_names(tmp_path):
    root = write_tree(tmp_path / "ade")
    dataset = build_dataset(cfg_for(root), "train", train_transforms=True)
    assert [path.stem for path in dataset.files] == STEMS["training"]
    assert [path.stem for path in dataset.label_files] == STEMS["training"]
    names = class_names(cfg_for(root))
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[-1] == "flag"
    assert names == list(ADE20K_CLASSES) and len(set(names)) == 150
    colors = palette(cfg_for(root))
    assert len(set(colors)) == 150 and colors == palette(cfg_for(root))


def test_image_without_annotation_names_the_image(tmp_path):
    root = write_tree(tmp_path / "ade")
    (root / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*ADE_val_00000001.jpg has no annotation"):
        build_dataset(cfg_for(root), "val", train_transforms=False)


def test_label_out_of_range_names_the_file(tmp_path):
    root = write_tree(tmp_path / "ade")
    Image.fromarray(np.full((HEIGHT, WIDTH), 151, np.uint8)).save(root / "annotations/validation/ADE_val_00000001.png")
    with pytest.raises(DatasetError, match=r"ADE_val_00000001.png contains values \[151\] outside the ade20k set \(0..150\)"):
        build_dataset(cfg_for(root), "val", train_transforms=False)[0]


def test_corrupt_jpeg_and_size_mismatch_name_the_file(tmp_path):
    root = write_tree(tmp_path / "ade")
    dataset = build_dataset(cfg_for(root), "train", train_transforms=False)
    (root / "images/training/ADE_train_00000001.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"ADE_train_00000001.jpg cannot be decoded"):
        dataset[0]
    Image.fromarray(np.zeros((HEIGHT + 1, WIDTH), np.uint8)).save(root / "annotations/training/ADE_train_00000002.png")
    with pytest.raises(DatasetError, match=r"ADE_train_00000002.png is 64x33 but image"):
        dataset[1]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"ade20k_missing does not exist.*kdrepro prepare dataset=ade20k"):
        build_dataset(cfg_for(tmp_path / "ade20k_missing"), "val", train_transforms=False)


def fake_archive(tmp_path: Path) -> bytes:
    """An archive shaped like ADEChallengeData2016.zip: one top folder holding images/ and annotations/."""
    source = write_tree(tmp_path / "source" / "ADEChallengeData2016")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(source.parent).as_posix())
    return buffer.getvalue()


def test_prepare_downloads_verifies_and_extracts(tmp_path):
    payload = fake_archive(tmp_path)
    calls = []

    def fake_download(url: str, destination: Path) -> None:
        calls.append(url)
        destination.write_bytes(payload)

    root = tmp_path / "data" / "ade20k"
    cfg = cfg_for(root, download={"url": URL, "md5": hashlib.md5(payload).hexdigest()})
    assert prepare_dataset(cfg, download=fake_download) == root
    assert calls == [URL]
    assert (root / "images/training/ADE_train_00000002.jpg").is_file()
    assert (root / "annotations/validation/ADE_val_00000001.png").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ade20k"]  # archive and temp folders removed
    prepare_dataset(cfg, download=no_download)  # a second prepare only checks the folder
    assert len(build_dataset(cfg, "val", train_transforms=False)) == 1


def test_checksum_mismatch_leaves_nothing_behind(tmp_path):
    payload = fake_archive(tmp_path)

    def fake_download(url: str, destination: Path) -> None:
        destination.write_bytes(payload)

    root = tmp_path / "data" / "ade20k"
    with pytest.raises(DatasetError, match=rf"MD5 {hashlib.md5(payload).hexdigest()}, expected {MD5}"):
        prepare_dataset(cfg_for(root), download=fake_download)
    assert not root.exists()
    assert list((tmp_path / "data").iterdir()) == []  # no partial download, no half-extracted folder


def test_bad_archive_leaves_no_half_extracted_root(tmp_path):
    payload = fake_archive(tmp_path)[:-200]  # truncated: the central directory is damaged

    def fake_download(url: str, destination: Path) -> None:
        destination.write_bytes(payload)

    root = tmp_path / "data" / "ade20k"
    cfg = cfg_for(root, download={"url": URL, "md5": hashlib.md5(payload).hexdigest()})
    with pytest.raises(DatasetError, match="cannot extract"):
        prepare_dataset(cfg, download=fake_download)
    assert not root.exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["ADEChallengeData2016.zip"]  # verified, kept for a retry


def test_interrupted_download_leaves_no_partial_file(tmp_path):
    def broken_download(url: str, destination: Path) -> None:
        destination.write_bytes(b"half a file")
        raise DatasetError("connection reset")

    root = tmp_path / "data" / "ade20k"
    with pytest.raises(DatasetError, match="connection reset"):
        prepare_dataset(cfg_for(root), download=broken_download)
    assert list((tmp_path / "data").iterdir()) == []
