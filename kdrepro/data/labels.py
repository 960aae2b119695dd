"""Label tables and label-value maps: Cityscapes ids -> train ids, ADE20K ``reduce_zero_label``, colour palettes.

The Cityscapes table is the fact table of ``cityscapesscripts/helpers/labels.py`` (Cordts et al., CVPR 2016): label
ids 0..33 plus the license plate (-1), each with its train id (0..18, or 255 = ignored in training and evaluation),
name and colour. ``tests/data/test_cityscapes.py`` checks it against ``cityscapesscripts`` when that is installed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = 255


class CityscapesLabel(NamedTuple):
    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


# name, label id, train id, colour (as in cityscapesscripts; the license plate's train id is -1 there, 255 here)
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(
    CityscapesLabel(*row)
    for row in [
        ("unlabeled", 0, 255, (0, 0, 0)),
        ("ego vehicle", 1, 255, (0, 0, 0)),
        ("rectification border", 2, 255, (0, 0, 0)),
        ("out of roi", 3, 255, (0, 0, 0)),
        ("static", 4, 255, (0, 0, 0)),
        ("dynamic", 5, 255, (111, 74, 0)),
        ("ground", 6, 255, (81, 0, 81)),
        ("road", 7, 0, (128, 64, 128)),
        ("sidewalk", 8, 1, (244, 35, 232)),
        ("parking", 9, 255, (250, 170, 160)),
        ("rail track", 10, 255, (230, 150, 140)),
        ("building", 11, 2, (70, 70, 70)),
        ("wall", 12, 3, (102, 102, 156)),
        ("fence", 13, 4, (190, 153, 153)),
        ("guard rail", 14, 255, (180, 165, 180)),
        ("bridge", 15, 255, (150, 100, 100)),
        ("tunnel", 16, 255, (150, 120, 90)),
        ("pole", 17, 5, (153, 153, 153)),
        ("polegroup", 18, 255, (153, 153, 153)),
        ("traffic light", 19, 6, (250, 170, 30)),
        ("traffic sign", 20, 7, (220, 220, 0)),
        ("vegetation", 21, 8, (107, 142, 35)),
        ("terrain", 22, 9, (152, 251, 152)),
        ("sky", 23, 10, (70, 130, 180)),
        ("person", 24, 11, (220, 20, 60)),
        ("rider", 25, 12, (255, 0, 0)),
        ("car", 26, 13, (0, 0, 142)),
        ("truck", 27, 14, (0, 0, 70)),
        ("bus", 28, 15, (0, 60, 100)),
        ("caravan", 29, 255, (0, 0, 90)),
        ("trailer", 30, 255, (0, 0, 110)),
        ("train", 31, 16, (0, 80, 100)),
        ("motorcycle", 32, 17, (0, 0, 230)),
        ("bicycle", 33, 18, (119, 11, 32)),
        ("license plate", -1, 255, (0, 0, 142)),
    ]
)

CITYSCAPES_ID = {label.name: label.id for label in CITYSCAPES_LABELS}
"""Label id by name, e.g. ``CITYSCAPES_ID["road"] == 7`` (the value written in ``*_gtFine_labelIds.png``)."""

CITYSCAPES_CLASSES: tuple[str, ...] = tuple(
    label.name for label in sorted(CITYSCAPES_LABELS, key=lambda label: label.train_id) if label.train_id != 255
)
"""The 19 evaluated classes in train-id order (road, sidewalk, ..., bicycle)."""

CITYSCAPES_CATEGORIES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
"""Cityscapes' 7 official categories of the 19 classes (cityscapesscripts ``labels.py``, ``category``)."""

_CATEGORY_OF_TRAIN_ID = (0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6)


def train_id_to_category(label: np.ndarray) -> np.ndarray:
    """Map a train-id label map (0..18, 255 ignore) to Cityscapes categories (0..6, 255 ignore)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[: len(_CATEGORY_OF_TRAIN_ID)] = _CATEGORY_OF_TRAIN_ID
    return table[label]


CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    label.color for label in sorted(CITYSCAPES_LABELS, key=lambda label: label.train_id) if label.train_id != 255
)


CITYSCAPES_CATEGORY_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    CITYSCAPES_PALETTE[CITYSCAPES_CLASSES.index(name)] for name in ("road", "building", "pole", "vegetation", "sky", "person", "car")
)
"""A colour per category: the Cityscapes colour of its most frequent class (flat = road, construction = building, ...)."""


def _cityscapes_lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """(id -> train id LUT, id-is-valid mask), both indexed by the uint8 pixel value; -1 is stored as 255."""
    train_ids = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    for label in CITYSCAPES_LABELS:
        train_ids[label.id % 256] = label.train_id
        valid[label.id % 256] = True
    return train_ids, valid


CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_VALID_IDS = _cityscapes_lookup_tables()


def label_id_to_train_id(label_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map Cityscapes label ids (0..33, 255 for the license plate's -1) to train ids (0..18, 255 = ignore).

    Vectorised through a 256-entry look-up table, as ``cityscapesscripts/preparation/createTrainIdLabelImgs.py``
    produces ``*_gtFine_labelTrainIds.png`` (mmsegmentation reads those). Values outside the table map to 255; the
    file readers reject them first (:func:`kdrepro.data.io.read_label`).
    """
    if isinstance(label_ids, torch.Tensor):
        return torch.from_numpy(CITYSCAPES_ID_TO_TRAIN_ID).to(label_ids.device)[label_ids.long()]
    return CITYSCAPES_ID_TO_TRAIN_ID[np.asarray(label_ids, dtype=np.uint8)]


def valid_train_ids(num_classes: int) -> np.ndarray:
    """Mask over 0..255 of the values allowed in a train-id label map: ``0..num_classes-1`` and 255."""
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[IGNORE_INDEX] = True
    return valid


_REDUCE_ZERO_LABEL = np.arange(-1, 255, dtype=np.int16)
_REDUCE_ZERO_LABEL[[0, 255]] = IGNORE_INDEX
_REDUCE_ZERO_LABEL = _REDUCE_ZERO_LABEL.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K ``reduce_zero_label``: 0 ("other") -> 255, every other value v -> v - 1, 255 stays 255.

    Same as mmsegmentation's ``LoadAnnotations(reduce_zero_label=True)``. Applied once, by the dataset when it reads
    a label file, never by a transform: applying it twice shifts every class by two (a known reproduction pitfall).
    """
    return _REDUCE_ZERO_LABEL[np.asarray(label, dtype=np.uint8)]


def bit_interleaved_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """A deterministic, well-spread palette: PASCAL VOC's bit-interleaved colour map, skipping its black entry 0."""
    colors = []
    for index in range(1, num_classes + 1):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colors.append((red, green, blue))
    return tuple(colors)
