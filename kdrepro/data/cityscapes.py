"""The Cityscapes folder layout (also used by the synthetic dataset).

::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       (label ids 0..33)
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (written by prepare)

As in mmsegmentation, the loader reads ``*_gtFine_labelTrainIds.png`` (train ids 0..18, 255 ignore), which
``kdrepro prepare`` writes from the label ids with the table of :mod:`kdrepro.data.labels` (what
``cityscapesscripts/preparation/createTrainIdLabelImgs.py`` does, without needing the polygon JSON files).
"""

from __future__ import annotations

from pathlib import Path

from kdrepro.data.io import prepare_hint, read_label, require_root, write_png
from kdrepro.data.labels import CITYSCAPES_VALID_IDS, label_id_to_train_id
from kdrepro.errors import DatasetError

IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
SPLITS = ("train", "val")


def check_root(root: Path, dataset_name: str) -> Path:
    """Raise DatasetError unless ``root`` has ``leftImg8bit/{train,val}`` and ``gtFine/{train,val}``."""
    return require_root(root, dataset_name, [f"{top}/{split}" for top in (IMAGE_DIR, LABEL_DIR) for split in SPLITS])


def find_pairs(root: Path, split: str, dataset_name: str) -> tuple[list[Path], list[Path]]:
    """Sorted image paths of a split and their ``labelTrainIds`` label paths.

    Raises:
        DatasetError: the root is missing or incomplete, the split holds no images, an image has no label, or the
            train-id labels have not been written yet.
    """
    check_root(root, dataset_name)
    images = sorted((root / IMAGE_DIR / split).glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetError(f"no *{IMAGE_SUFFIX} images under {root / IMAGE_DIR / split}: {prepare_hint(dataset_name)}")
    labels = []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        folder = root / LABEL_DIR / split / image.parent.name
        label = folder / f"{stem}{TRAIN_ID_SUFFIX}"
        if not label.is_file():
            if (folder / f"{stem}{LABEL_ID_SUFFIX}").is_file():
                raise DatasetError(f"{label} has not been written from its labelIds: {prepare_hint(dataset_name)}")
            raise DatasetError(
                f"image {image} has no label {folder / (stem + LABEL_ID_SUFFIX)}; restore the gtFine folder or "
                f"{prepare_hint(dataset_name)}"
            )
        labels.append(label)
    return images, labels


def label_id_files(root: Path, dataset_name: str) -> list[Path]:
    """Every ``*_gtFine_labelIds.png`` under ``root`` (the source of the train-id labels)."""
    sources = sorted((root / LABEL_DIR).glob(f"*/*/*{LABEL_ID_SUFFIX}"))
    if not sources:
        raise DatasetError(f"no *{LABEL_ID_SUFFIX} files under {root / LABEL_DIR}: {prepare_hint(dataset_name)}")
    return sources


def train_id_path(source: Path) -> Path:
    """The ``*_gtFine_labelTrainIds.png`` written from a ``*_gtFine_labelIds.png``."""
    return source.with_name(source.name[: -len(LABEL_ID_SUFFIX)] + TRAIN_ID_SUFFIX)


def image_of(root: Path, label: Path) -> Path:
    """The ``leftImg8bit`` image a ``gtFine`` label file belongs to."""
    suffix = LABEL_ID_SUFFIX if label.name.endswith(LABEL_ID_SUFFIX) else TRAIN_ID_SUFFIX
    split, city = label.parent.parent.name, label.parent.name
    return root / IMAGE_DIR / split / city / (label.name[: -len(suffix)] + IMAGE_SUFFIX)


def write_train_id_label(source: Path, target: Path, dataset_name: str) -> None:
    """Write one ``*_gtFine_labelTrainIds.png`` from its label ids, atomically (an interrupted run is simply redone)."""
    write_png(target, label_id_to_train_id(read_label(source, CITYSCAPES_VALID_IDS, dataset_name)))
