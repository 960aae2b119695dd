"""Datasets: synthetic street scenes, Cityscapes and ADE20K, with mmsegmentation's training/evaluation pipelines.

Public API:

* :func:`build_dataset` ``(dataset_cfg, split, train_transforms)`` -> a torch Dataset of
  ``(image float32 (3, H, W) normalised, label int64 (H, W) train ids or 255)``; ``.files`` lists the image paths.
  Training items are cropped/padded to ``crop_size``. Evaluation items follow mmsegmentation's protocol: the image
  is resized to ``test_scale`` (keep ratio) while the label keeps its original size; upsample the logits to the
  label's size before scoring (use batch size 1: sizes may differ between images).
* :func:`prepare_dataset` ``(dataset_cfg)`` -> root folder (generate / download / check, see
  :mod:`kdrepro.data.prepare`).
* :func:`class_names`, :func:`palette` ``(dataset_cfg)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from kdrepro.data import ade20k, cityscapes
from kdrepro.data.io import SegmentationDataset
from kdrepro.data.labels import (
    CITYSCAPES_CATEGORIES,
    CITYSCAPES_CATEGORY_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    bit_interleaved_palette,
    label_id_to_train_id,
    reduce_zero_label,
    train_id_to_category,
    valid_train_ids,
)
from kdrepro.data.prepare import prepare_dataset
from kdrepro.data.transforms import eval_transform, train_transform
from kdrepro.errors import ConfigError

__all__ = [
    "SegmentationDataset",
    "build_dataset",
    "class_names",
    "label_id_to_train_id",
    "palette",
    "prepare_dataset",
    "reduce_zero_label",
]

LAYOUTS = ("cityscapes", "ade20k")


def _layout(dataset_cfg: Any) -> str:
    layout = str(dataset_cfg.layout)
    if layout not in LAYOUTS:
        raise ConfigError(f"dataset.layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    return layout


def build_dataset(dataset_cfg: Any, split: str, train_transforms: bool) -> Dataset:
    """The ``split`` ("train" or "val") of a dataset config, with training or evaluation transforms.

    Raises:
        DatasetError: the root is missing or incomplete (the message names the prepare command), or, when an item
            is read, a file is missing, corrupt, of the wrong size or holds values outside the dataset's set.
        ConfigError: unknown split/layout, or ADE20K without reduce_zero_label and a class count other than 151.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r}: expected 'train' or 'val'")
    layout, name, root = _layout(dataset_cfg), str(dataset_cfg.name), Path(str(dataset_cfg.root))
    num_classes = int(dataset_cfg.num_classes)
    transforms = {"joint_transform": train_transform(dataset_cfg)} if train_transforms else {
        "image_transform": eval_transform(dataset_cfg)
    }
    if layout == "cityscapes":
        files, label_files = cityscapes.find_pairs(root, split, name)
        if _categories(dataset_cfg):  # pre-training on the 7 categories (the embedded stand-in for ImageNet)
            return SegmentationDataset(name, files, label_files, valid_train_ids(19), train_id_to_category, **transforms)
        return SegmentationDataset(name, files, label_files, valid_train_ids(num_classes), None, **transforms)
    reduce = bool(dataset_cfg.reduce_zero_label)
    if num_classes != (150 if reduce else 151):
        raise ConfigError(
            f"dataset.num_classes={num_classes} does not fit ADE20K with reduce_zero_label={reduce} "
            f"(expected {150 if reduce else 151})"
        )
    files, label_files = ade20k.find_pairs(root, split, name)
    label_map = reduce_zero_label if reduce else None
    return SegmentationDataset(name, files, label_files, ade20k.RAW_VALID_VALUES, label_map, **transforms)


def _categories(dataset_cfg: Any) -> bool:
    """``dataset.label_set``: ``classes`` (default) or ``categories`` (Cityscapes layout: the 7 categories)."""
    label_set = str(dataset_cfg.get("label_set") or "classes")
    if label_set not in ("classes", "categories"):
        raise ConfigError(f"dataset.label_set={label_set!r}: use classes or categories")
    if label_set == "categories":
        if _layout(dataset_cfg) != "cityscapes":
            raise ConfigError("dataset.label_set=categories needs the Cityscapes layout; use label_set=classes")
        if int(dataset_cfg.num_classes) != len(CITYSCAPES_CATEGORIES):
            raise ConfigError(f"dataset.label_set=categories has {len(CITYSCAPES_CATEGORIES)} classes; set dataset.num_classes=7")
    return label_set == "categories"


def class_names(dataset_cfg: Any) -> list[str]:
    """Names of the ``num_classes`` classes in train-id order."""
    if _categories(dataset_cfg):
        return list(CITYSCAPES_CATEGORIES)
    names = list(CITYSCAPES_CLASSES if _layout(dataset_cfg) == "cityscapes" else ade20k.ADE20K_CLASSES)
    if _layout(dataset_cfg) == "ade20k" and not dataset_cfg.reduce_zero_label:
        names = ["other", *names]
    if len(names) != int(dataset_cfg.num_classes):
        raise ConfigError(f"dataset.num_classes={dataset_cfg.num_classes} but the {dataset_cfg.layout} layout has {len(names)}")
    return names


def palette(dataset_cfg: Any) -> list[tuple[int, int, int]]:
    """An RGB colour per class: the official Cityscapes colours (for the 7 categories, the colour of each one's most
    frequent class), or a deterministic bit-interleaved palette."""
    if _categories(dataset_cfg):
        return list(CITYSCAPES_CATEGORY_PALETTE)
    if _layout(dataset_cfg) == "cityscapes":
        return list(CITYSCAPES_PALETTE)
    return list(bit_interleaved_palette(len(class_names(dataset_cfg))))
