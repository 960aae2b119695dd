"""Small stand-ins for the real datasets, at the real resolutions and in the real folder layouts (benchmark and test
support: ``benchmarks/full_size.py`` and the tests it backs import it from here, never the package).

They let the ``cityscapes`` and ``ade20k`` profiles run end to end (``kdrepro prepare`` validating an existing root,
training crops, whole-image evaluation at the test scale) on a machine without the datasets, e.g. in CI:

* Cityscapes: ``leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png`` (2048×1024 RGB) and
  ``gtFine/.../*_gtFine_labelIds.png`` (label ids 0..33; ``kdrepro prepare`` writes the ``labelTrainIds``), exactly
  what the Cityscapes download unpacks to (the JSON polygons and instance maps are not read, so not written);
* ADE20K: ``images/{training,validation}/ADE_<split>_<8 digits>.jpg`` in ADE's varied sizes and
  ``annotations/.../*.png`` of raw values 0..150 (0 = "other", removed by ``reduce_zero_label``).

Scenes are the synthetic generator's street scenes (:func:`kdrepro.data.synthetic.render_scene`); for ADE20K their
classes are mapped to the ADE classes of the same name and void pixels to 0. Unlike the synthetic dataset these trees
carry no manifest, so ``kdrepro prepare`` treats them as real data (validates, never regenerates).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from kdrepro.data.ade20k import ADE20K_CLASSES, SPLIT_FOLDERS
from kdrepro.data.io import atomic_directory
from kdrepro.data.labels import CITYSCAPES_LABELS
from kdrepro.data.synthetic import CITIES, render_scene

CITYSCAPES_SIZE = (1024, 2048)  # (height, width) of every Cityscapes image
#: (height, width) of ADE20K-like images: landscape 4:3, portrait, small (upscaled at test time) and a wide panorama
#: whose long side hits the test scale's 2048 cap
ADE20K_SIZES = {"train": ((512, 683), (768, 512)), "val": ((512, 683), (375, 500), (256, 1100))}

#: Cityscapes class name -> ADE20K class name (ADE raw value = its index in ADE20K_CLASSES + 1); others -> 0 "other"
_ADE_NAME = {
    "road": "road", "sidewalk": "sidewalk", "building": "building", "wall": "wall", "fence": "fence",
    "guard rail": "railing", "pole": "pole", "traffic light": "traffic light", "traffic sign": "signboard",
    "vegetation": "tree", "terrain": "grass", "sky": "sky", "person": "person", "rider": "person", "car": "car",
    "truck": "truck", "bus": "bus", "train": "bus", "motorcycle": "minibike", "bicycle": "bicycle",
    "bridge": "bridge", "parking": "road", "rail track": "path",
}  # fmt: skip


def _ade_lookup() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for label in CITYSCAPES_LABELS:
        if label.id >= 0 and label.name in _ADE_NAME:
            table[label.id] = ADE20K_CLASSES.index(_ADE_NAME[label.name]) + 1
    return table


def write_cityscapes_tree(root: Path, num_train: int = 2, num_val: int = 1, seed: int = 0,
                          size: Sequence[int] = CITYSCAPES_SIZE) -> Path:  # fmt: skip
    """Write a Cityscapes-layout tree of ``num_train`` + ``num_val`` scenes at ``size`` (default 1024×2048)."""
    height, width = int(size[0]), int(size[1])
    with atomic_directory(Path(root)) as folder:
        for split_code, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            for index in range(count):
                image, label = render_scene(np.random.default_rng([seed, split_code, index]), height, width)
                city = CITIES[split][index % len(CITIES[split])]
                stem = f"{city}_{index // len(CITIES[split]):06d}_000019"
                _save(folder / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                _save(folder / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return Path(root)


def write_ade20k_tree(root: Path, seed: int = 0, sizes: dict[str, Sequence[Sequence[int]]] | None = None) -> Path:
    """Write an ADEChallengeData2016-layout tree with one image per ``(height, width)`` in ``sizes[split]``."""
    lookup = _ade_lookup()
    with atomic_directory(Path(root)) as folder:
        for split_code, (split, split_sizes) in enumerate((sizes or ADE20K_SIZES).items()):
            for index, (height, width) in enumerate(split_sizes):
                image, label_ids = render_scene(np.random.default_rng([seed, split_code, index]), int(height), int(width))
                name = f"ADE_{split}_{index + 1:08d}"  # ADE_train_00000001, ADE_val_00000001
                jpeg = folder / "images" / SPLIT_FOLDERS[split] / f"{name}.jpg"
                jpeg.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(jpeg, format="JPEG", quality=90)
                _save(folder / "annotations" / SPLIT_FOLDERS[split] / f"{name}.png", lookup[label_ids])
    return Path(root)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def write_mmseg_checkpoint(path: Path, model_cfg: dict, num_classes: int, seed: int = 0) -> Path:
    """A randomly initialised segmentor saved as mmsegmentation 0.x saves one (``{"meta", "state_dict"}``, mmseg key
    names), for testing ``kdrepro import-teacher`` / ``teacher_import`` without downloading a checkpoint."""
    import torch

    from kdrepro.models import build_segmentor
    from kdrepro.models.weights import MMSEG_MODULE_MAP

    torch.manual_seed(seed)
    model = build_segmentor({**dict(model_cfg), "pretrained": None}, int(num_classes))
    to_mmseg = {ours: theirs for theirs, ours in MMSEG_MODULE_MAP.items()}
    state_dict = {}
    for key, value in model.state_dict().items():
        prefix = next((ours for ours in to_mmseg if key.startswith(ours)), "")
        state_dict[to_mmseg.get(prefix, "") + key.removeprefix(prefix)] = value
    meta = {"mmseg_version": "0.30.0", "config": f"# kdrepro fake {model_cfg.get('name')}", "iter": 0}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    return Path(path)


def write_imagenet_backbone(path: Path, model_cfg: dict, seed: int = 0) -> Path:
    """A randomly initialised ResNetV1c backbone saved as mmcv saves ImageNet weights (``{"state_dict": ...}`` with
    ``stem.*`` / ``layer*`` keys), for testing ``kdrepro pretrain`` with ``pretrain.source`` offline."""
    import torch

    from kdrepro.models import build_segmentor

    torch.manual_seed(seed)
    model = build_segmentor({**dict(model_cfg), "pretrained": None}, 19)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.backbone.state_dict()}, path)
    return Path(path)
