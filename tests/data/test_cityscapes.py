"""Cityscapes layout: label table, labelIds -> labelTrainIds, file pairing, error messages, prepare (mocked download)."""

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdrepro.data import build_dataset, class_names, label_id_to_train_id, palette, prepare_dataset
from kdrepro.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_LABELS
from kdrepro.errors import DatasetError

HEIGHT, WIDTH = 32, 64
# one pixel row per id: void 0, road 7, sidewalk 8, building 11, sky 23, car 26, bicycle 33, license plate (255)
IDS = np.array([0, 7, 8, 11, 23, 26, 33, 255], dtype=np.uint8)
FILES = {"train": [("aachen", 0), ("aachen", 1), ("bochum", 0)], "val": [("frankfurt", 0), ("lindau", 0)]}


def cfg_for(root: Path, **overrides):
    base = {"name": "cityscapes", "layout": "cityscapes", "root": str(root), "num_classes": 19, "ignore_index": 255,
            "reduce_zero_label": False, "image_scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": [16, 32],
            "cat_max_ratio": 0.75, "flip_prob": 0.5, "photometric": True, "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375], "test_scale": [128, 64], "eval_mode": "whole",
            "download": {"packages": ["gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"]}}  # fmt: skip
    return OmegaConf.create({**base, **overrides})


def label_ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(IDS, size=(HEIGHT, WIDTH)).astype(np.uint8)


def write_tree(root: Path) -> Path:
    """A tiny tree in the real Cityscapes layout (with labelIds only, as in gtFine_trainvaltest.zip)."""
    for split, entries in FILES.items():
        for index, (city, sequence) in enumerate(entries):
            stem = f"{city}_{sequence:06d}_000019"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            image = np.random.default_rng(index).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(label_ids(index)).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def no_download(*args):
    raise AssertionError("prepare must not download when the root exists")


def test_label_table_is_the_cityscapes_table():
    assert len(CITYSCAPES_LABELS) == 35 and len({label.id for label in CITYSCAPES_LABELS}) == 35
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[10] == "sky" and CITYSCAPES_CLASSES[-1] == "bicycle"
    assert len(CITYSCAPES_CLASSES) == 19
    ids = np.array([0, 1, 6, 7, 8, 9, 11, 17, 21, 23, 24, 26, 31, 32, 33, 255])
    expected = [255, 255, 255, 0, 1, 255, 2, 5, 8, 10, 11, 13, 16, 17, 18, 255]
    assert label_id_to_train_id(ids).tolist() == expected
    assert label_id_to_train_id(torch.from_numpy(ids)).tolist() == expected
    assert sorted(set(CITYSCAPES_ID_TO_TRAIN_ID.tolist()) - {255}) == list(range(19))


def test_label_table_matches_cityscapesscripts():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    theirs = {label.id: label for label in labels.labels if -1 <= label.id <= 33}
    assert set(theirs) == {label.id for label in CITYSCAPES_LABELS}
    for ours in CITYSCAPES_LABELS:
        other = theirs[ours.id]
        assert (ours.name, tuple(ours.color)) == (other.name, tuple(other.color))
        assert ours.train_id == (255 if other.trainId in (-1, 255) else other.trainId)


def test_class_names_and_palette():
    cfg = cfg_for("unused")
    assert class_names(cfg) == list(CITYSCAPES_CLASSES)
    assert palette(cfg)[0] == (128, 64, 128) and palette(cfg)[13] == (0, 0, 142) and len(palette(cfg)) == 19


def test_prepare_existing_root_writes_train_ids_and_is_idempotent(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    assert prepare_dataset(cfg_for(root), download=no_download) == root
    source = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    target = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png"
    written = np.array(Image.open(target))
    np.testing.assert_array_equal(written, CITYSCAPES_ID_TO_TRAIN_ID[np.array(Image.open(source))])
    assert set(np.unique(written).tolist()) == {0, 1, 2, 10, 13, 18, 255}
    stamp = target.stat().st_mtime_ns
    prepare_dataset(cfg_for(root), download=no_download)
    assert target.stat().st_mtime_ns == stamp


def test_loader_pairs_files_and_returns_train_ids(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    dataset = build_dataset(cfg_for(root), "val", train_transforms=False)
    assert [path.name for path in dataset.files] == ["frankfurt_000000_000019_leftImg8bit.png", "lindau_000000_000019_leftImg8bit.png"]
    assert [path.parent.name for path in dataset.label_files] == ["frankfurt", "lindau"]
    image, label = dataset[1]
    assert image.shape == (3, 64, 128) and image.dtype == torch.float32  # resized to test_scale
    assert label.shape == (HEIGHT, WIDTH) and label.dtype == torch.int64  # original size
    np.testing.assert_array_equal(label.numpy(), CITYSCAPES_ID_TO_TRAIN_ID[label_ids(1)])
    train = build_dataset(cfg_for(root), "train", train_transforms=True)
    assert len(train) == 3 and train.files[2].name.startswith("bochum")
    torch.manual_seed(0)
    image, label = train[0]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    assert set(label.unique().tolist()) <= {0, 1, 2, 10, 13, 18, 255}


def test_missing_root_names_path_and_command(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere.*kdrepro prepare dataset=cityscapes"):
        build_dataset(cfg_for(tmp_path / "nowhere"), "train", train_transforms=True)


def test_incomplete_root_is_reported(tmp_path):
    (tmp_path / "cs" / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="lacks leftImg8bit/val"):
        build_dataset(cfg_for(tmp_path / "cs"), "train", train_transforms=True)


def test_train_ids_not_yet_written(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    with pytest.raises(DatasetError, match=r"labelTrainIds.png has not been written.*kdrepro prepare"):
        build_dataset(cfg_for(root), "train", train_transforms=True)


def test_image_without_label_names_the_image(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    for path in (root / "gtFine/val/lindau").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"image .*lindau_000000_000019_leftImg8bit.png has no label"):
        build_dataset(cfg_for(root), "val", train_transforms=False)


def test_corrupt_png_names_the_file(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    label = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    label.write_bytes(label.read_bytes()[:40])  # truncated
    dataset = build_dataset(cfg_for(root), "val", train_transforms=False)
    with pytest.raises(DatasetError, match=r"frankfurt_000000_000019_gtFine_labelTrainIds.png cannot be decoded"):
        dataset[0]
    image = root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"
    image.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"lindau_000000_000019_leftImg8bit.png cannot be decoded"):
        dataset[1]


def test_out_of_range_label_ids_name_the_file(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    bad = root / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png"
    values = label_ids(2)
    values[0, 0] = 40
    Image.fromarray(values).save(bad)
    with pytest.raises(DatasetError, match=r"bochum_000000_000019_gtFine_labelIds.png contains values \[40\]"):
        prepare_dataset(cfg_for(root), download=no_download)


def test_out_of_range_train_ids_name_the_file(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    bad = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.full((HEIGHT, WIDTH), 19, np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"frankfurt_000000_000019_gtFine_labelTrainIds.png contains values \[19\]"):
        build_dataset(cfg_for(root), "val", train_transforms=False)[0]


def test_colour_label_is_rejected(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    bad = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"frankfurt_000000_000019_gtFine_labelTrainIds.png has mode RGB"):
        build_dataset(cfg_for(root), "val", train_transforms=False)[0]


def test_size_mismatch_names_both_files(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    bad = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.zeros((HEIGHT, WIDTH // 2), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"lindau_000000_000019_gtFine_labelTrainIds.png is 32x32 but image .*lindau"):
        build_dataset(cfg_for(root), "val", train_transforms=False)[1]


def zipped_tree(source: Path, top: str) -> bytes:
    """A zip of ``source/top`` like the official packages (top-level gtFine/ or leftImg8bit/ plus a README)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((source / top).rglob("*.png")):
            archive.write(path, path.relative_to(source).as_posix())
        archive.writestr("README", "fake package")
    return buffer.getvalue()


def test_prepare_downloads_missing_root_with_the_injected_downloader(tmp_path):
    source = write_tree(tmp_path / "source")
    calls = []

    def fake_download(package: str, destination: Path) -> None:
        calls.append(package)
        top = package.split("_")[0]
        (destination / package).write_bytes(zipped_tree(source, top))

    root = tmp_path / "data" / "cityscapes"
    assert prepare_dataset(cfg_for(root), download=fake_download) == root
    assert calls == ["gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"]
    assert (root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cityscapes"]  # no staging or temp left
    assert len(build_dataset(cfg_for(root), "train", train_transforms=True)) == 3


def test_failed_download_leaves_no_root(tmp_path):
    def failing_download(package: str, destination: Path) -> None:
        if package.startswith("leftImg8bit"):
            raise DatasetError("network down")
        (destination / package).write_bytes(b"PK not really a zip")

    root = tmp_path / "data" / "cityscapes"
    with pytest.raises(DatasetError, match="network down"):
        prepare_dataset(cfg_for(root), download=failing_download)
    assert not root.exists()


def test_corrupt_package_leaves_no_root(tmp_path):
    def corrupt_download(package: str, destination: Path) -> None:
        (destination / package).write_bytes(b"definitely not a zip file")

    root = tmp_path / "data" / "cityscapes"
    with pytest.raises(DatasetError, match="cannot extract"):
        prepare_dataset(cfg_for(root), download=corrupt_download)
    assert not root.exists()
    assert not [p for p in (tmp_path / "data").iterdir() if ".tmp-" in p.name]


def test_default_downloader_needs_cityscapesscripts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts", None)
    monkeypatch.setitem(sys.modules, "cityscapesscripts.download", None)
    with pytest.raises(DatasetError, match=r"pip install kdrepro\[cityscapes\]"):
        prepare_dataset(cfg_for(tmp_path / "data" / "cityscapes"))


def test_prepare_rewrites_a_deleted_train_id_file(tmp_path):
    root = write_tree(tmp_path / "cityscapes")
    prepare_dataset(cfg_for(root), download=no_download)
    target = root / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
    kept = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    stamp = kept.stat().st_mtime_ns
    target.unlink()
    prepare_dataset(cfg_for(root), download=no_download)
    assert target.is_file() and kept.stat().st_mtime_ns == stamp
