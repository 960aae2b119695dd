"""Joint image/mask transforms (torchvision.transforms.v2) that reproduce mmsegmentation's pipelines.

Training (mmsegmentation ``configs/_base_/datasets/cityscapes.py`` / ``ade20k.py``, as used by the paper's
PSPNet baselines and by CIRKD/BPKD):

    RandomResize(scale, ratio_range, keep_ratio=True) -> RandomCrop(crop_size, cat_max_ratio=0.75)
    -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize(mean, std, RGB) -> Pad(crop_size, 0 / 255)

Padding comes after normalisation (mmseg 0.x ``Pad`` after ``Normalize``; mmseg 1.x pads in the data
preprocessor after normalising), so padded image pixels are 0 in normalised units and padded labels are 255.
Evaluation: ``Resize(test_scale, keep_ratio=True)`` of the image only, then normalisation.

Library transforms are used where they match (flip, dtype, normalise, crop/pad/resize kernels). Written here: the
mmseg keep-ratio rescale rule (it bounds the long *and* the short edge, so ``v2.RandomResize``/``ScaleJitter`` differ
on portrait images and in rounding), the ``cat_max_ratio`` crop, bottom/right padding to a fixed size, and
``PhotoMetricDistortion`` (additive brightness, multiplicative "contrast", HSV saturation scaling: none of these is
what ``v2.ColorJitter``/``RandomPhotometricDistort`` compute). All randomness comes from torch's global RNG, so a
seeded ``torch.manual_seed`` makes the augmentation stream reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from kdrepro.data.labels import IGNORE_INDEX


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """Output ``(height, width)`` of mmcv's ``rescale_size`` for a ``(w, h)`` target scale with keep_ratio=True.

    The factor is the largest that keeps the long edge <= max(scale) and the short edge <= min(scale); sizes are
    rounded half up (``int(x + 0.5)``), as mmcv does.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _first_mask(flat_inputs: list[Any]) -> torch.Tensor | None:
    return next((inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)), None)


class KeepRatioResize(v2.Transform):
    """mmseg ``RandomResize(scale, ratio_range, keep_ratio=True)``; with ``ratio_range=(1, 1)`` the test ``Resize``.

    A ratio r ~ U(ratio_range) scales the target to ``(int(w * r), int(h * r))``; the image is then rescaled with
    :func:`keep_ratio_size` (bilinear, no antialias, like cv2's INTER_LINEAR) and the mask with nearest neighbour.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.ratio_range
        ratio = low + float(torch.rand(())) * (high - low) if high > low else low
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = v2.query_size(flat_inputs)
        return {"size": list(keep_ratio_size(height, width, target))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if list(inpt.shape[-2:]) == params["size"]:
            return inpt
        return F.resize(inpt, params["size"], interpolation=InterpolationMode.BILINEAR, antialias=False)


class CatMaxRatioCrop(v2.Transform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random ``(h, w)`` window (clipped to the image).

    With ``cat_max_ratio < 1`` the window is re-drawn up to 10 times until the crop holds more than one class and no
    single class covers ``cat_max_ratio`` or more of its labelled (non-ignore) pixels; if all 10 checks fail, the
    11th draw is used unchecked (exactly mmseg's loop).
    """

    def __init__(self, crop_size: Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)

    def _random_window(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_height, crop_width = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = int(torch.randint(0, height - crop_height + 1, ()))
        left = int(torch.randint(0, width - crop_width + 1, ()))
        return top, left, crop_height, crop_width

    def _balanced(self, mask: torch.Tensor, window: tuple[int, int, int, int]) -> bool:
        top, left, height, width = window
        labels = mask[..., top : top + height, left : left + width].reshape(-1)
        counts = torch.bincount(labels[labels != self.ignore_index].long())
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        window = self._random_window(height, width)
        mask = _first_mask(flat_inputs)
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(10):
                if self._balanced(mask, window):
                    break
                window = self._random_window(height, width)
        return dict(zip(("top", "left", "height", "width"), window, strict=True))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class PadToSize(v2.Transform):
    """mmseg ``Pad(size=crop_size, pad_val=0, seg_pad_val=255)``: pad bottom and right up to ``(h, w)``."""

    def __init__(self, size: Sequence[int], image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = image_fill
        self.mask_fill = mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return F.pad(inpt, params["padding"], fill=fill)


class PhotoMetricDistortion(v2.Transform):
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB image; masks pass through untouched.

    In order: brightness (add U(-32, 32)), then with probability 1/2 contrast here, saturation (scale HSV S by
    U(0.5, 1.5)), hue (shift by an integer in [-18, 18) of OpenCV's 180-step hue circle), and contrast last otherwise.
    "Contrast" is mmseg's: multiply by U(0.5, 1.5). Each operation fires with probability 1/2; after each the image
    is clipped to 0..255 and truncated to integers, as mmseg's uint8 round trips do.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _maybe_uniform(low: float, high: float) -> float | None:
        if int(torch.randint(2, ())) == 0:
            return None
        return low + float(torch.rand(())) * (high - low)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        brightness = self._maybe_uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = int(torch.randint(2, ())) == 1
        contrast = self._maybe_uniform(*self.contrast_range)
        saturation = self._maybe_uniform(*self.saturation_range)
        hue = int(torch.randint(-self.hue_delta, self.hue_delta, ())) if int(torch.randint(2, ())) else None
        return {
            "brightness": brightness,
            "contrast_first": contrast_first,
            "contrast": contrast,
            "saturation": saturation,
            "hue": hue,
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = inpt.as_subclass(torch.Tensor).float()
        if params["brightness"] is not None:
            image = _to_uint8_range(image + params["brightness"])
        if params["contrast"] is not None and params["contrast_first"]:
            image = _to_uint8_range(image * params["contrast"])
        if params["saturation"] is not None:
            image = _to_uint8_range(scale_saturation(image, params["saturation"]))
        if params["hue"] is not None:
            image = _to_uint8_range(F.adjust_hue(image / 255.0, params["hue"] / 180.0) * 255.0)
        if params["contrast"] is not None and not params["contrast_first"]:
            image = _to_uint8_range(image * params["contrast"])
        return tv_tensors.wrap(image.to(inpt.dtype), like=inpt)


def _to_uint8_range(image: torch.Tensor) -> torch.Tensor:
    """``np.clip(x, 0, 255).astype(np.uint8)``: clip, then truncate toward zero."""
    return image.clamp(0.0, 255.0).floor()


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale HSV saturation by ``factor`` (clipped to 1) keeping hue and value, on a ``(..., 3, H, W)`` RGB tensor.

    With V = max and m = min over channels, S = (V - m) / V; every channel c becomes V - (V - c) * k with
    k = min(factor, V / (V - m)), which sets S to min(S * factor, 1) and leaves V and the hue unchanged.
    """
    value = image.amax(dim=-3, keepdim=True)
    minimum = image.amin(dim=-3, keepdim=True)
    spread = value - minimum
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-6), torch.full_like(spread, float("inf")))
    k = torch.clamp(limit, max=factor)
    return value - (value - image) * k


def train_transform(cfg: Any) -> v2.Compose:
    """The training pipeline of a dataset config (keys image_scale, ratio_range, crop_size, cat_max_ratio,
    flip_prob, photometric, mean, std, ignore_index)."""
    steps: list[v2.Transform] = [
        KeepRatioResize(cfg.image_scale, cfg.ratio_range),
        CatMaxRatioCrop(cfg.crop_size, cfg.cat_max_ratio, cfg.ignore_index),
        v2.RandomHorizontalFlip(float(cfg.flip_prob)),
    ]
    if cfg.photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=False),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
        PadToSize(cfg.crop_size, image_fill=0.0, mask_fill=int(cfg.ignore_index)),
    ]
    return v2.Compose(steps)


def eval_transform(cfg: Any) -> v2.Compose:
    """The evaluation pipeline for the *image* (keys test_scale, mean, std); labels stay at their original size."""
    return v2.Compose(
        [
            KeepRatioResize(cfg.test_scale),
            v2.ToDtype(torch.float32, scale=False),
            v2.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
