"""The ADE20K SceneParsing layout (ADEChallengeData2016, Zhou et al., CVPR 2017), 150 classes.

::

    <root>/images/{training,validation}/ADE_<split>_<n>.jpg
    <root>/annotations/{training,validation}/ADE_<split>_<n>.png   (0 = other, 1..150 = classes)

The loader applies ``reduce_zero_label`` (0 -> 255 ignore, v -> v - 1) once, when it reads a label, giving train
ids 0..149 (mmsegmentation's ``ADE20KDataset`` protocol, which the paper's 44.39-mIoU teacher follows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdrepro.data.io import prepare_hint, require_root
from kdrepro.errors import DatasetError

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
MD5 = "7328b3957e407ddae1d3cbf487f149ef"
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
RAW_VALID_VALUES = np.zeros(256, dtype=bool)
RAW_VALID_VALUES[:151] = True  # 0 = "other" plus the 150 classes, before reduce_zero_label

# The 150 SceneParsing categories in class-index order (objectInfo150.csv; first name of each entry).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip


def check_root(root: Path, dataset_name: str) -> Path:
    """Raise DatasetError unless ``root`` has ``images/`` and ``annotations/`` with training and validation."""
    folders = [f"{top}/{split}" for top in ("images", "annotations") for split in SPLIT_FOLDERS.values()]
    return require_root(root, dataset_name, folders)


def find_pairs(root: Path, split: str, dataset_name: str) -> tuple[list[Path], list[Path]]:
    """Sorted ``.jpg`` images of a split and their ``.png`` annotations (same stem).

    Raises:
        DatasetError: the root is missing or incomplete, the split is empty, or an image has no annotation.
    """
    check_root(root, dataset_name)
    folder = SPLIT_FOLDERS[split]
    images = sorted((root / "images" / folder).glob("*.jpg"))
    if not images:
        raise DatasetError(f"no .jpg images under {root / 'images' / folder}: {prepare_hint(dataset_name)}")
    labels = [root / "annotations" / folder / f"{image.stem}.png" for image in images]
    for image, label in zip(images, labels, strict=True):
        if not label.is_file():
            raise DatasetError(f"image {image} has no annotation {label}; restore it or {prepare_hint(dataset_name)}")
    return images, labels
