"""Load ImageNet backbone weights and import mmsegmentation segmentor checkpoints -- strictly.

Every load checks the file against the model key by key and raises :class:`WeightsError` naming the missing and
unexpected keys (first few and the count) and every shape mismatch; nothing is ever loaded partially. (CIRKD filters
a checkpoint down to the keys that match, so a wrong file loads silently.)

Two backbone layouts are recognised:

* mmsegmentation/mmcv ``ResNetV1c`` (``open-mmlab://resnet{18,50,101}_v1c``): deep stem ``stem.0.weight`` ...
  ``stem.7.*``; the mmseg ``pspnet_*-d8`` configs start from these;
* torchvision ``ResNet`` (and mmseg ``ResNetV1b``): 7x7 stem ``conv1.weight``, ``bn1.*``. It fits only a model built
  with ``stem: basic``; loading it into the deep-stem default is an error that says so.

``layer1..4`` keys are the same in both (``layer1.0.conv1.weight``, ``layer1.0.downsample.0.weight`` ...), and
the ImageNet classifier ``fc.*`` is ignored. A ``state_dict``/``model`` wrapper, a DDP ``module.`` prefix and a
``backbone.`` prefix (a whole mmseg segmentor checkpoint: its heads are then skipped) are unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kdrepro.errors import WeightsError
from kdrepro.io import read_torch_file

#: mmsegmentation ``EncoderDecoder`` top-level module -> ours. Inside each module our names equal mmseg's
#: (``ResNetV1c`` stem/layers, mmcv ``ConvModule`` conv/bn, ``psp_modules.N.1``, ``image_pool.1``,
#: ``aspp_modules.N``, ``bottleneck``, ``convs.N``, ``conv_seg``), so the map is the identity below this level.
MMSEG_MODULE_MAP: dict[str, str] = {
    "backbone.": "backbone.",
    "decode_head.": "decode_head.",
    "auxiliary_head.": "auxiliary_head.",
}
#: keys of mmseg checkpoints that hold no weights of ours (mmseg 1.x normalisation constants).
MMSEG_IGNORED_PREFIXES: tuple[str, ...] = ("data_preprocessor.",)
IMAGENET_CLASSIFIER_PREFIX = "fc."
SHOWN_KEYS = 5


def read_state_dict(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of a checkpoint file or an already loaded checkpoint dict.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP ``module.`` prefix. Files are read by
    :func:`kdrepro.io.read_torch_file`: tensors, containers and NumPy data are built, OpenMMLab bookkeeping objects
    (mmengine's ``message_hub``) become inert placeholders, and nothing in the file is executed.
    """
    checkpoint = _load_file(Path(source)) if isinstance(source, (str, Path)) else source
    name = str(source) if isinstance(source, (str, Path)) else "the given state dict"
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{name} holds a {type(checkpoint).__name__}, not a state dict; save model.state_dict()")
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    not_tensors = [key for key, value in checkpoint.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise WeightsError(f"{name} is not a state dict: entries {_first(not_tensors)} are not tensors")
    state_dict = dict(checkpoint)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict, dict(meta)


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path (model.pretrained / the argument)")
    return read_torch_file(path)


def _first(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else shown


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, what: str) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` has exactly ``module``'s keys with the same shapes.

    BatchNorm ``num_batches_tracked`` counters may be absent (old torchvision files lack them).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} in file vs {tuple(expected[k].shape)} in model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_first(mismatched)})")
    if problems:
        raise WeightsError(
            f"{source} does not fit the {what}: {'; '.join(problems)}. Check the file matches the model's depth, "
            f"base_width, stem and number of classes"
        )


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], source: str, what: str) -> None:
    """:func:`check_state_dict`, then copy every tensor into ``module``."""
    check_state_dict(module, state_dict, source, what)
    module.load_state_dict(state_dict, strict=False)


def backbone_layout(state_dict: Mapping[str, Tensor]) -> str | None:
    """``"deep"`` (mmseg ResNetV1c), ``"basic"`` (torchvision / ResNetV1b 7x7 stem) or ``None`` (neither)."""
    if "stem.0.weight" in state_dict:
        return "deep"
    if "conv1.weight" in state_dict:
        return "basic"
    return None


def _backbone_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ImageNet classifier; keep only ``backbone.*`` (prefix removed) when the file is a whole segmentor."""
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    return {k: v for k, v in state_dict.items() if not k.startswith(IMAGENET_CLASSIFIER_PREFIX)}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a :class:`~kdrepro.models.resnet.ResNetV1c` from a local file, strictly.

    Accepts mmseg/mmcv ResNetV1c keys (``stem.0.weight`` ...) or torchvision ResNet keys (``conv1.weight`` ...;
    only into a ``stem="basic"`` backbone), optionally wrapped in ``state_dict`` and/or prefixed ``backbone.``.

    Raises:
        WeightsError: the file is missing or unreadable, its stem does not match the model's, or its keys/shapes
            differ from the backbone's (names the keys).
    """
    state_dict, _ = read_state_dict(path)
    state_dict = _backbone_keys(state_dict)
    layout = backbone_layout(state_dict)
    stem = getattr(backbone, "stem_kind", "deep")
    depth = getattr(backbone, "depth", "?")
    if layout == "basic" and stem == "deep":
        raise WeightsError(
            f"{path} is a torchvision-style ResNet with a 7x7 'conv1' stem, but the model has the deep ResNetV1c stem; "
            f"set model.stem=basic to use it, or use mmseg's ResNetV1c weights (open-mmlab://resnet{depth}_v1c)"
        )
    if layout == "deep" and stem == "basic":
        raise WeightsError(
            f"{path} is an mmseg ResNetV1c with a deep 'stem.*' stem, but the model has stem=basic (7x7); "
            f"set model.stem=deep to use it"
        )
    load_strict(backbone, state_dict, str(path), f"ResNet-{depth} backbone (stem={stem})")


def mmseg_to_kdrepro_key(key: str) -> str | None:
    """Our key for an mmseg ``EncoderDecoder`` key, or ``None`` for keys without weights of ours."""
    if key.startswith(MMSEG_IGNORED_PREFIXES):
        return None
    for mmseg_prefix, our_prefix in MMSEG_MODULE_MAP.items():
        if key.startswith(mmseg_prefix):
            return our_prefix + key.removeprefix(mmseg_prefix)
    return key  # left as is: reported as unexpected by the strict check


def import_mmseg_checkpoint(
    source: str | Path | Mapping[str, Any], model: nn.Module, ignore_auxiliary: bool = False
) -> dict[str, Any]:
    """Load an mmsegmentation PSPNet/DeepLabV3 checkpoint (``{"meta": ..., "state_dict": {...}}``) into ``model``.

    E.g. the public ``pspnet_r101-d8_512x1024_80k_cityscapes`` teacher (79.76 mIoU), so users need not train the
    teacher. Strict: every key of the model must be in the file with the same shape, and vice versa.

    Args:
        source: a checkpoint path or an already loaded checkpoint / state dict.
        model: a :class:`~kdrepro.models.Segmentor` of the same arch, depth, width and number of classes.
        ignore_auxiliary: skip the file's ``auxiliary_head.*`` keys (only for a model built without one).

    Returns:
        The checkpoint's ``meta`` dict (mmseg stores ``CLASSES``, ``PALETTE``, versions), ``{}`` if it has none.
    """
    state_dict, meta = read_state_dict(source)
    name = str(source) if isinstance(source, (str, Path)) else "the given mmseg state dict"
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        our_key = mmseg_to_kdrepro_key(key)
        if our_key is None or (ignore_auxiliary and our_key.startswith("auxiliary_head.")):
            continue
        mapped[our_key] = value
    load_strict(model, mapped, name, "segmentor (mmseg import)")
    return meta
