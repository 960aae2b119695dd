"""`kdrepro prepare` checks every label file it does not rewrite, and every suggested command fixes what it reports:
each test damages a file, reads the error, does exactly what it says, and checks the dataset loads again."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from kdrepro.config import load_config
from kdrepro.data import build_dataset, prepare_dataset
from kdrepro.errors import DatasetError

HEIGHT, WIDTH = 32, 64
CITYSCAPES_FILES = {"train": [("aachen", 0), ("bochum", 0)], "val": [("lindau", 0)]}
ADE_FILES = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}
COMMON = {"ignore_index": 255, "image_scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": [16, 32],
          "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True, "mean": [123.675, 116.28, 103.53],
          "std": [58.395, 57.12, 57.375], "test_scale": [64, 32], "eval_mode": "whole"}  # fmt: skip


def cityscapes_cfg(root: Path):
    return OmegaConf.create({**COMMON, "name": "cityscapes", "layout": "cityscapes", "root": str(root),
                             "num_classes": 19, "reduce_zero_label": False})


def ade_cfg(root: Path):
    return OmegaConf.create({**COMMON, "name": "ade20k", "layout": "ade20k", "root": str(root), "num_classes": 150,
                             "reduce_zero_label": True})


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def cityscapes_tree(root: Path) -> Path:
    for split, entries in CITYSCAPES_FILES.items():
        for index, (city, sequence) in enumerate(entries):
            stem = f"{city}_{sequence:06d}_000019"
            for top in ("leftImg8bit", "gtFine"):
                (root / top / split / city).mkdir(parents=True, exist_ok=True)
            picture(index).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            ids = np.random.default_rng(index).choice([0, 7, 8, 11, 26, 33], (HEIGHT, WIDTH)).astype(np.uint8)
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def ade_tree(root: Path) -> Path:
    for split, stems in ADE_FILES.items():
        for folder in ("images", "annotations"):
            (root / folder / split).mkdir(parents=True, exist_ok=True)
        for index, stem in enumerate(stems):
            picture(index).save(root / "images" / split / f"{stem}.jpg")
            values = np.random.default_rng(index).choice([0, 1, 75, 150], (HEIGHT, WIDTH)).astype(np.uint8)
            Image.fromarray(values).save(root / "annotations" / split / f"{stem}.png")
    return root


def zipped(source: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(source).as_posix())
    return buffer.getvalue()


def load_all(cfg) -> None:
    for split in ("train", "val"):
        dataset = build_dataset(cfg, split, train_transforms=False)
        for index in range(len(dataset)):
            dataset[index]


def no_download(*args):
    raise AssertionError("prepare must not download when the root exists")


@pytest.mark.parametrize("damage", ["value", "size", "truncated", "colour"])
def test_damaged_train_ids_error_says_prepare_and_prepare_rewrites_them(tmp_path, damage):
    root = cityscapes_tree(tmp_path / "cityscapes")
    cfg = cityscapes_cfg(root)
    prepare_dataset(cfg, download=no_download)
    bad = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    kept = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    original, stamp = bad.read_bytes(), kept.stat().st_mtime_ns
    if damage == "truncated":
        bad.write_bytes(original[:40])
    else:
        shape = {"value": (HEIGHT, WIDTH), "size": (HEIGHT, WIDTH // 2), "colour": (HEIGHT, WIDTH, 3)}[damage]
        Image.fromarray(np.full(shape, 19 if damage == "value" else 0, np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"run `kdrepro prepare dataset=cityscapes`") as error:
        load_all(cfg)
    assert "lindau_000000_000019_gtFine_labelTrainIds.png" in str(error.value)
    prepare_dataset(cfg, download=no_download)  # what the error says to run
    assert bad.read_bytes() == original and kept.stat().st_mtime_ns == stamp
    load_all(cfg)


def test_damaged_label_ids_are_named_and_the_suggested_unzip_fixes_them(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    package = tmp_path / "gtFine_trainvaltest.zip"
    package.write_bytes(zipped(root / "gtFine", "gtFine/"))
    cfg = cityscapes_cfg(root)
    prepare_dataset(cfg, download=no_download)
    bad = root / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png"
    Image.fromarray(np.full((HEIGHT, WIDTH), 40, np.uint8)).save(bad)
    with pytest.raises(DatasetError) as error:
        prepare_dataset(cfg, download=no_download)
    message = str(error.value)
    assert "1 labelIds file is damaged" in message and f"{bad} contains values [40]" in message
    assert re.search(r"unzip -o gtFine_trainvaltest.zip <file> -d \S+", message)
    with zipfile.ZipFile(package) as archive:  # unzip -o gtFine_trainvaltest.zip <file> -d <root>
        archive.extract(bad.relative_to(root).as_posix(), root)
    prepare_dataset(cfg, download=no_download)
    load_all(cfg)


def test_damaged_label_ids_fixed_by_moving_the_root_away_and_preparing_again(tmp_path):
    pristine = cityscapes_tree(tmp_path / "pristine")
    root = tmp_path / "data" / "cityscapes"
    shutil.copytree(pristine, root)
    cfg = OmegaConf.merge(cityscapes_cfg(root), {"download": {"packages": ["gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"]}})
    bad = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=rf"move {re.escape(str(root))} away and run `kdrepro prepare dataset=cityscapes`"):
        prepare_dataset(cfg, download=no_download)
    shutil.move(root, tmp_path / "moved-away")

    def download(package: str, folder: Path) -> None:
        top = package.split("_")[0]
        (folder / package).write_bytes(zipped(pristine / top, f"{top}/"))

    prepare_dataset(cfg, download=download)
    load_all(cfg)


def test_damaged_ade20k_annotation_is_named_and_the_suggested_unzip_fixes_it(tmp_path):
    root = ade_tree(tmp_path / "ade20k")
    package = tmp_path / "ADEChallengeData2016.zip"
    package.write_bytes(zipped(root, "ADEChallengeData2016/"))
    cfg = ade_cfg(root)
    prepare_dataset(cfg, download=no_download)
    bad = root / "annotations/training/ADE_train_00000002.png"
    Image.fromarray(np.full((HEIGHT, WIDTH), 151, np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"1 ADE20K annotation is damaged: .*ADE_train_00000002.png contains values \[151\]"):
        prepare_dataset(cfg, download=no_download)
    with zipfile.ZipFile(package) as archive:  # unzip -o ADEChallengeData2016.zip 'ADEChallengeData2016/annotations/*'
        for member in archive.namelist():
            if member.startswith("ADEChallengeData2016/annotations/"):
                (root / member.split("/", 1)[1]).write_bytes(archive.read(member))
    prepare_dataset(cfg, download=no_download)
    load_all(cfg)


def test_synthetic_label_ids_are_regenerated_and_root_is_not_private(tmp_path):
    overrides = [f"dataset.root={tmp_path / 'synthetic'}", "dataset.generate.num_train=2", "dataset.generate.num_val=1",
                 "dataset.generate.height=32", "dataset.generate.width=64"]
    cfg = load_config(overrides).dataset
    root = prepare_dataset(cfg)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask  # like any new folder, not mkdtemp's 0700
    bad = next(root.glob("gtFine/val/*/*_labelIds.png"))
    original = bad.read_bytes()
    bad.write_bytes(original[:50])
    prepare_dataset(cfg)  # generates the set again: the same bytes, deterministic
    assert bad.read_bytes() == original
    load_all(cfg)


def test_an_image_of_another_size_fails_training_then_prepare_regenerates_the_synthetic_set(tmp_path):
    overrides = [f"dataset.root={tmp_path / 'synthetic'}", "dataset.generate.num_train=2", "dataset.generate.num_val=1",
                 "dataset.generate.height=32", "dataset.generate.width=64"]
    cfg = load_config(overrides).dataset
    root = prepare_dataset(cfg)
    image = next(root.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    original = image.read_bytes()
    Image.new("RGB", (48, 24)).save(image)  # a user drops in a picture of another size
    with pytest.raises(DatasetError, match=r"but image .* is 48x24 \(width x height\); they must match"):
        load_all(cfg)
    prepare_dataset(cfg)  # what the error says to run: it must not call this ready
    assert image.read_bytes() == original
    load_all(cfg)


def test_an_image_of_another_size_in_a_real_tree_is_named_by_prepare(tmp_path):
    root = cityscapes_tree(tmp_path / "cityscapes")
    cfg = cityscapes_cfg(root)
    prepare_dataset(cfg, download=no_download)
    image = root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    Image.new("RGB", (48, 24)).save(image)
    with pytest.raises(DatasetError, match=rf"labelIds.png is 64x32 but image {re.escape(str(image))} is 48x24") as error:
        prepare_dataset(cfg, download=no_download)
    assert "\n" not in str(error.value)
