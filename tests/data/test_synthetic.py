"""Synthetic street scenes: determinism, Cityscapes layout, class coverage, context-only class pairs, atomic prepare."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.config import load_config
from kdrepro.data import build_dataset, prepare_dataset, synthetic
from kdrepro.data.labels import CITYSCAPES_ID as ID
from kdrepro.data.labels import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_VALID_IDS
from kdrepro.errors import DatasetError

SMALL = {"num_train": 4, "num_val": 3, "height": 48, "width": 96}


def digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.png"))
    }


def synthetic_cfg(root: Path, seed: int = 0):
    cfg = load_config([f"dataset.root={root}", f"dataset.generate.seed={seed}"]).dataset
    for key, value in {**SMALL, "small_object_scale": 1.0, "small_object_rate": 1.0, "horizon": [0.36, 0.48]}.items():
        cfg.generate[key] = value  # a street's proportions, seen from a car
    return cfg


@pytest.fixture(scope="module")
def scenes():
    """40 default-size scenes (rendered in memory): images and Cityscapes label ids."""
    return [synthetic.render_scene(np.random.default_rng([7, 0, index])) for index in range(40)]


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    first = digests(synthetic.generate(tmp_path / "a", seed=3, **SMALL))
    second = digests(synthetic.generate(tmp_path / "b", seed=3, **SMALL))
    other = digests(synthetic.generate(tmp_path / "c", seed=4, **SMALL))
    assert first == second and len(first) == 2 * (4 + 3)
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_cityscapes_layout_and_label_ids(tmp_path):
    root = synthetic.generate(tmp_path / "synthetic", seed=0, **SMALL)
    images = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit").rglob("*.png"))
    assert images[:2] == ["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
                          "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png"]  # fmt: skip
    assert {Path(p).parts[2] for p in images if "/val/" in p} == {"frankfurt", "lindau", "munster"}
    for image in images:
        label = root / image.replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        assert label.is_file()
        values = np.array(synthetic.Image.open(label))
        assert values.shape == (48, 96) and CITYSCAPES_VALID_IDS[values].all()
    manifest = json.loads((root / synthetic.MANIFEST).read_text())
    assert manifest["params"] == {"seed": 0, **SMALL} and manifest["version"] == synthetic.VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary folder left


def test_every_class_appears_and_void_is_ignored(scenes):
    counts = np.zeros(256, np.int64)
    for _, label_ids in scenes:
        counts += np.bincount(CITYSCAPES_ID_TO_TRAIN_ID[label_ids].ravel(), minlength=256)
    assert (counts[:19] > 0).all(), f"missing train ids {np.flatnonzero(counts[:19] == 0)}"
    fractions = counts / counts.sum()
    assert fractions[0] > 0.15 and fractions[2] > 0.1 and fractions[10] > 0.01 and fractions[13] > 0.02  # road building sky car
    assert 0.0 < fractions[255] < 0.15


def test_images_are_not_noise_classes_have_distinct_looks(scenes):
    """Learnable: class means differ (sky vs road vs vegetation), while each class is spatially coherent."""
    means = {}
    for name in ("sky", "road", "vegetation"):
        pixels = np.concatenate([image[label == ID[name]] for image, label in scenes]).astype(np.float64)
        means[name] = pixels.mean(0)
    assert means["sky"][2] > means["road"][2] + 20  # blue sky
    assert means["vegetation"][1] > means["vegetation"][2] + 20  # green foliage
    image, label = scenes[0]
    same = label[:, 1:] == label[:, :-1]
    difference = np.abs(image[:, 1:].astype(int) - image[:, :-1].astype(int)).sum(-1)
    assert difference[same].mean() < difference[~same].mean()


@pytest.mark.parametrize(("first", "second"), [("road", "sidewalk"), ("vegetation", "terrain"), ("car", "truck")])
def test_context_pairs_share_their_colours(scenes, first, second):
    """These pairs are told apart by geometry and surroundings, not by colour (see kdrepro/data/synthetic.py)."""
    pixels = {name: np.concatenate([image[label == ID[name]] for image, label in scenes]).astype(np.float64)
              for name in (first, second)}  # fmt: skip
    gap = np.abs(pixels[first].mean(0) - pixels[second].mean(0)).max()
    spread = max(pixels[first].std(0).max(), pixels[second].std(0).max())
    assert gap < 0.6 * spread


def test_prepare_generates_once_then_is_a_no_op(tmp_path):
    root = tmp_path / "synthetic"
    assert prepare_dataset(synthetic_cfg(root)) == root
    train_ids = sorted(root.rglob("*_gtFine_labelTrainIds.png"))
    assert len(train_ids) == 7
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*.png")}
    prepare_dataset(synthetic_cfg(root))
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.png")} == before
    dataset = build_dataset(synthetic_cfg(root), "train", train_transforms=True)
    torch.manual_seed(0)
    image, label = dataset[0]
    assert image.shape == (3, 64, 128) and label.shape == (64, 128)  # the profile's crop (48x96 image padded)
    assert set(label.unique().tolist()) <= set(range(19)) | {255}
    cfg = synthetic_cfg(root)
    image, label = build_dataset(cfg, "val", train_transforms=False)[2]
    test_width, test_height = cfg.test_scale
    assert image.shape == (3, test_height, test_width) and label.shape == (48, 96)  # at test_scale; label as written


def test_prepare_regenerates_when_the_seed_changes(tmp_path):
    root = tmp_path / "synthetic"
    prepare_dataset(synthetic_cfg(root, seed=0))
    before = digests(root)
    prepare_dataset(synthetic_cfg(root, seed=1))
    after = digests(root)
    assert before.keys() == after.keys() and before != after


def test_prepare_refuses_a_foreign_folder(tmp_path):
    root = tmp_path / "synthetic"
    root.mkdir()
    (root / "my_notes.txt").write_text("not a dataset")
    with pytest.raises(DatasetError, match="was not written by the synthetic generator"):
        prepare_dataset(synthetic_cfg(root))
    assert (root / "my_notes.txt").is_file()


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []
    render = synthetic.render_scene

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", failing_render)
    root = tmp_path / "synthetic"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(synthetic_cfg(root))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_scene", render)
    prepare_dataset(synthetic_cfg(root))
    assert synthetic.is_generated(root, {"seed": 0, **SMALL})


def test_dataset_config_keys():
    cfg = OmegaConf.to_container(load_config([]).dataset)
    assert cfg["layout"] == "cityscapes" and cfg["generate"] == {"seed": 0, "num_train": 300, "num_val": 100,
                                                                 "height": 128, "width": 256, "small_object_scale": 2.0,
                                                                 "small_object_rate": 2.0, "horizon": [0.5, 0.6]}  # fmt: skip
    assert cfg["label_set"] == "categories" and cfg["num_classes"] == 7  # the synthetic profile scores the categories
    assert OmegaConf.to_container(load_config(["profile=cityscapes"]).dataset).get("label_set", "classes") == "classes"


def test_small_object_settings_enlarge_the_thin_classes_and_keep_old_manifests():
    rng = lambda: np.random.default_rng([3, 0, 5])  # noqa: E731
    _, plain = synthetic.render_scene(rng(), 64, 128)
    _, large = synthetic.render_scene(rng(), 64, 128, small_object_scale=3.0, small_object_rate=2.0)
    small_ids = [ID[name] for name in ("pole", "person", "traffic sign")]
    assert np.isin(large, small_ids).sum() > np.isin(plain, small_ids).sum()
    assert synthetic.normalize_params({"seed": 0, "height": 64, "small_object_scale": 1.0}) == {"seed": 0, "height": 64}
    assert synthetic.normalize_params({"seed": 0, "small_object_rate": 2}) == {"seed": 0, "small_object_rate": 2.0}
    with pytest.raises(ValueError):
        synthetic.normalize_params({"small_object_scale": 0})


def test_a_lower_horizon_shows_more_sky_and_the_default_keeps_old_manifests():
    def sky(horizon):
        labels = [synthetic.render_scene(np.random.default_rng([3, 0, index]), 64, 128, horizon=horizon)[1] for index in range(12)]
        return np.mean([(label == ID["sky"]).mean() for label in labels])

    assert sky((0.55, 0.65)) > 1.5 * sky(synthetic.HORIZON)
    assert synthetic.normalize_params({"seed": 0, "horizon": [0.36, 0.48]}) == {"seed": 0}  # the default: not recorded
    assert synthetic.normalize_params({"seed": 0, "horizon": (0.5, 0.6)}) == {"seed": 0, "horizon": [0.5, 0.6]}
    for bad in ([0.6, 0.5], [0.5], [0.0, 0.5], [0.5, 1.0]):
        with pytest.raises(ValueError, match="horizon must be"):
            synthetic.normalize_params({"horizon": bad})


def test_bad_generator_setting_is_a_one_line_config_error(tmp_path):
    from kdrepro.errors import ConfigError

    cfg = synthetic_cfg(tmp_path / "data")
    cfg.generate.horizon = [0.6, 0.5]
    with pytest.raises(ConfigError, match=r"dataset.generate: horizon must be \[low, high\]"):
        prepare_dataset(cfg)
    assert not (tmp_path / "data").exists()  # nothing written


def test_category_labels_for_pretraining(tmp_path):
    from kdrepro.data import build_dataset, class_names, palette
    from kdrepro.errors import ConfigError

    root = tmp_path / "synthetic"
    prepare_dataset(synthetic_cfg(root))
    cfg = synthetic_cfg(root)
    fine = build_dataset(cfg, "val", train_transforms=False)[0][1]
    cfg.label_set, cfg.num_classes = "categories", 7
    coarse = build_dataset(cfg, "val", train_transforms=False)[0][1]
    assert class_names(cfg)[0] == "flat" and len(class_names(cfg)) == 7
    assert set(coarse.unique().tolist()) <= set(range(7)) | {255}
    assert ((fine == 0) <= (coarse == 0)).all() and ((fine == 13) <= (coarse == 6)).all()  # road: flat, car: vehicle
    colours = palette(cfg)
    assert len(set(colours)) == 7 and colours[0] == (128, 64, 128) and colours[6] == (0, 0, 142)  # road's, car's
    cfg.num_classes = 19
    with pytest.raises(ConfigError, match="num_classes=7"):
        class_names(cfg)


def test_prepare_repairs_deleted_files(tmp_path):
    root = tmp_path / "synthetic"
    prepare_dataset(synthetic_cfg(root))
    image = root / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"
    original = image.read_bytes()
    image.unlink()
    train_ids = root / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelTrainIds.png"
    train_ids.unlink()
    prepare_dataset(synthetic_cfg(root))
    assert image.read_bytes() == original and train_ids.is_file()
