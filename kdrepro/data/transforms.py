"""Joint image/mask transforms in plain torch that reproduce mmsegmentation's pipelines.

Training (mmsegmentation ``configs/_base_/datasets/cityscapes.py`` / ``ade20k.py``, as used by the paper's
PSPNet baselines and by CIRKD/BPKD):

    RandomResize(scale, ratio_range, keep_ratio=True) -> RandomCrop(crop_size, cat_max_ratio=0.75)
    -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize(mean, std, RGB) -> Pad(crop_size, 0 / 255)

Padding comes after normalisation (mmseg 0.x ``Pad`` after ``Normalize``; mmseg 1.x pads in the data
preprocessor after normalising), so padded image pixels are 0 in normalised units and padded labels are 255.
Evaluation: ``Resize(test_scale, keep_ratio=True)`` of the image only, then normalisation.

Every step is a callable ``step(image, mask, generator) -> (image, mask)`` on a ``(3, H, W)`` image (uint8 until
:class:`ToFloat`) and an ``(H, W)`` mask (uint8 until :class:`ToFloat`, ``None`` on the image-only evaluation path).
All randomness is drawn from the explicit ``torch.Generator``, never from torch's global RNG, so a sample's
augmentation is a pure function of the generator's seed.

Why not torchvision.transforms.v2: importing it costs ~1.5 s per process (``torchvision.ops`` imports
``torch._dynamo``) plus ~0.4 s at exit (``import kdrepro.train.run``: 3.9 s -> 2.2 s wall on a 2-core CPU, where the
DVC pipeline starts ~36 training processes), and its per-sample dispatch plus ``fork_rng`` seeding made a training
sample ~3.2 ms instead of ~2.2 ms (PNG decoding included). The kernels are torchvision's (uint8 bilinear
``interpolate`` without antialias, nearest for masks, its RGB<->HSV hue rotation), so outputs are bit-identical to
the former v2 pipeline for the same parameters; the tests check them against torchvision.
Written for mmseg: the keep-ratio rescale rule (it bounds the long *and* the short edge), the ``cat_max_ratio``
crop, bottom/right padding to a fixed size, and ``PhotoMetricDistortion`` (additive brightness, multiplicative
"contrast", HSV saturation scaling).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

import torch
import torch.nn.functional as F

from kdrepro.data.labels import IGNORE_INDEX

Sample = tuple[torch.Tensor, torch.Tensor | None]  # (image, mask or None)


class Transform(Protocol):
    """A pipeline step: maps ``(image, mask, generator)`` to ``(image, mask)``, drawing only from ``generator``."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample: ...


def _checked(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        raise ValueError("random transforms draw from an explicit torch.Generator; none was given")
    return generator


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    """U(low, high) drawn from ``generator``."""
    return low + float(torch.rand((), generator=_checked(generator))) * (high - low)


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """An integer uniform in [low, high) drawn from ``generator``."""
    return int(torch.randint(low, high, (), generator=_checked(generator)))


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """Output ``(height, width)`` of mmcv's ``rescale_size`` for a ``(w, h)`` target scale with keep_ratio=True.

    The factor is the largest that keeps the long edge <= max(scale) and the short edge <= min(scale); sizes are
    rounded half up (``int(x + 0.5)``), as mmcv does.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


# torchvision's resize_image resizes uint8 natively where torch has the vectorised kernel, else in float32 + round
_NATIVE_UINT8_BILINEAR = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
    "aarch64",
    "arm64",
)


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a ``(3, H, W)`` uint8 image, align_corners=False, no antialias (cv2 INTER_LINEAR's
    sampling grid); the same kernel as torchvision's ``resize(..., BILINEAR, antialias=False)`` on CPU."""
    if image.device.type == "cpu" and _NATIVE_UINT8_BILINEAR:
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return resized[0].round_().to(image.dtype)


def resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an ``(H, W)`` label map (torch/torchvision ``NEAREST``, like cv2 INTER_NEAREST)."""
    return F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0]


class KeepRatioResize:
    """mmseg ``RandomResize(scale, ratio_range, keep_ratio=True)``; with ``ratio_range=(1, 1)`` the test ``Resize``.

    A ratio r ~ U(ratio_range) scales the target to ``(int(w * r), int(h * r))``; the image is then rescaled with
    :func:`keep_ratio_size` (bilinear, no antialias, like cv2's INTER_LINEAR) and the mask with nearest neighbour.
    A fixed ratio draws nothing.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0)):
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def output_size(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        low, high = self.ratio_range
        ratio = _uniform(generator, low, high) if high > low else low
        return keep_ratio_size(height, width, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        size = self.output_size(*image.shape[-2:], generator)
        if size == tuple(image.shape[-2:]):
            return image, mask
        return resize_bilinear(image, size), None if mask is None else resize_nearest(mask, size)


class CatMaxRatioCrop:
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: a random ``(h, w)`` window (clipped to the image).

    With ``cat_max_ratio < 1`` the window is re-drawn up to 10 times until the crop holds more than one class and no
    single class covers ``cat_max_ratio`` or more of its labelled (non-ignore) pixels; if all 10 checks fail, the
    11th draw is used unchecked (exactly mmseg's loop).
    """

    def __init__(self, crop_size: Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = IGNORE_INDEX):
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)

    def _random_window(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        crop_height, crop_width = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = _randint(generator, 0, height - crop_height + 1)
        left = _randint(generator, 0, width - crop_width + 1)
        return top, left, crop_height, crop_width

    def _balanced(self, mask: torch.Tensor, window: tuple[int, int, int, int]) -> bool:
        """mmseg's check: more than one class, and the largest under ``cat_max_ratio`` of the labelled pixels."""
        top, left, height, width = window
        labels = mask[..., top : top + height, left : left + width].reshape(-1)
        counts = torch.bincount(labels, minlength=self.ignore_index + 1)
        counts[self.ignore_index] = 0
        classes, largest, total = int((counts > 0).sum()), int(counts.max()), int(counts.sum())
        return classes > 1 and largest / total < self.cat_max_ratio

    def window(
        self, height: int, width: int, mask: torch.Tensor | None, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the crop, after mmseg's cat_max_ratio redraws."""
        window = self._random_window(height, width, generator)
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(10):
                if self._balanced(mask, window):
                    break
                window = self._random_window(height, width, generator)
        return window

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        top, left, height, width = self.window(*image.shape[-2:], mask, generator)
        rows, cols = slice(top, top + height), slice(left, left + width)
        return image[..., rows, cols], None if mask is None else mask[rows, cols]


class RandomHorizontalFlip:
    """mmseg ``RandomFlip(prob, direction="horizontal")``: mirror image and mask together with probability ``prob``."""

    def __init__(self, prob: float):
        self.prob = float(prob)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        if _uniform(generator, 0.0, 1.0) >= self.prob:
            return image, mask
        return image.flip(-1), None if mask is None else mask.flip(-1)


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of :class:`PhotoMetricDistortion`; ``None`` means the operation does not fire."""

    brightness: float | None
    contrast_first: bool
    contrast: float | None
    saturation: float | None
    hue: int | None


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB image; masks pass through untouched.

    In order: brightness (add U(-32, 32)), then with probability 1/2 contrast here, saturation (scale HSV S by
    U(0.5, 1.5)), hue (shift by an integer in [-18, 18) of OpenCV's 180-step hue circle), and contrast last otherwise.
    "Contrast" is mmseg's: multiply by U(0.5, 1.5). Each operation fires with probability 1/2; after each the image
    is clipped to 0..255 and truncated to integers, as mmseg's uint8 round trips do.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = hue_delta

    @staticmethod
    def _maybe_uniform(generator: torch.Generator | None, low: float, high: float) -> float | None:
        return _uniform(generator, low, high) if _randint(generator, 0, 2) else None

    def draw(self, generator: torch.Generator | None) -> PhotometricParams:
        """The parameters of one application (mmseg's ``randint(2)`` coin per operation)."""
        brightness = self._maybe_uniform(generator, -self.brightness_delta, self.brightness_delta)
        contrast_first = _randint(generator, 0, 2) == 1
        contrast = self._maybe_uniform(generator, *self.contrast_range)
        saturation = self._maybe_uniform(generator, *self.saturation_range)
        hue = _randint(generator, -self.hue_delta, self.hue_delta) if _randint(generator, 0, 2) else None
        return PhotometricParams(brightness, contrast_first, contrast, saturation, hue)

    @staticmethod
    def apply(image: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        """Distort a ``(3, H, W)`` RGB image (any dtype holding 0..255) with given parameters; same dtype out."""
        out = image.float()
        if params.brightness is not None:
            out = _to_uint8_range(out + params.brightness)
        if params.contrast is not None and params.contrast_first:
            out = _to_uint8_range(out * params.contrast)
        if params.saturation is not None:
            out = _to_uint8_range(scale_saturation(out, params.saturation))
        if params.hue is not None:
            out = _to_uint8_range(adjust_hue(out / 255.0, params.hue / 180.0) * 255.0)
        if params.contrast is not None and not params.contrast_first:
            out = _to_uint8_range(out * params.contrast)
        return out.to(image.dtype)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        return self.apply(image, self.draw(generator)), mask


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


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] -> HSV in [0, 1] (Pillow's ``rgb2hsv``, with torchvision's operation order)."""
    r, g, _ = image.unbind(-3)
    minc, maxc = image.amin(-3), image.amax(-3)
    flat = maxc == minc  # grey: S = H = 0 (denominators replaced by 1 to avoid NaN)
    spread = maxc - minc
    saturation = spread / torch.where(flat, 1.0, maxc)
    rc, gc, bc = ((maxc[None] - image) / torch.where(flat, 1.0, spread)[None]).unbind(-3)
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, rc + 2.0 - bc, gc + 4.0 - rc))
    return torch.stack(((hue * (1.0 / 6.0) + 1.0).fmod(1.0), saturation, maxc))


# which of (v, p, q, t) each of R, G, B (rows) takes in the six hue sectors (columns); row r starts at 6 * r
_SECTOR_CHANNELS = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])
_ROW_STARTS = torch.tensor([0, 6, 12]).view(3, 1, 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv` (torchvision's ``_hsv_to_rgb``)."""
    h, s, v = hsv.unbind(-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    fraction = h6 - sector
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * fraction) * v).clamp(0.0, 1.0)
    t = ((s * fraction + (1.0 - s)) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t))
    choice = torch.take(_SECTOR_CHANNELS, sector.long().remainder(6) + _ROW_STARTS)
    return vpqt.gather(0, choice)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a float ``(3, H, W)`` RGB image in [0, 1] by ``shift`` turns (torchvision ``adjust_hue``)."""
    h, s, v = _rgb_to_hsv(image).unbind(-3)
    return _hsv_to_rgb(torch.stack(((h + shift).remainder(1.0), s, v)))


class ToFloat:
    """Image to float32 (values kept, not scaled to [0, 1]) and mask to int64 class ids."""

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        return image.to(torch.float32), None if mask is None else mask.to(torch.int64)


class Normalize:
    """mmseg ``Normalize(mean, std, to_rgb=True)`` on an RGB float image: ``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor([float(m) for m in mean]).view(-1, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        return (image - self.mean) / self.std, mask


class PadToSize:
    """mmseg ``Pad(size=crop_size, pad_val=0, seg_pad_val=255)``: pad bottom and right up to ``(h, w)``."""

    def __init__(self, size: Sequence[int], image_fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        self.size = (int(size[0]), int(size[1]))
        self.image_fill = image_fill
        self.mask_fill = mask_fill

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None) -> Sample:
        height, width = image.shape[-2:]
        padding = (0, max(self.size[1] - width, 0), 0, max(self.size[0] - height, 0))
        if not any(padding):
            return image, mask
        padded_mask = None if mask is None else F.pad(mask, padding, value=self.mask_fill)
        return F.pad(image, padding, value=self.image_fill), padded_mask


class Compose:
    """Apply steps in order to an image (and its mask), all drawing from one generator.

    Called with an image alone, it returns the image; with a mask, the ``(image, mask)`` pair.
    """

    def __init__(self, steps: Sequence[Transform]):
        self.steps = list(steps)

    @overload
    def __call__(self, image: torch.Tensor) -> torch.Tensor: ...

    @overload
    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        for step in self.steps:
            image, mask = step(image, mask, generator)
        return image if mask is None else (image, mask)


def train_transform(cfg: Any) -> Compose:
    """The training pipeline of a dataset config (keys image_scale, ratio_range, crop_size, cat_max_ratio,
    flip_prob, photometric, mean, std, ignore_index)."""
    steps: list[Transform] = [
        KeepRatioResize(cfg.image_scale, cfg.ratio_range),
        CatMaxRatioCrop(cfg.crop_size, cfg.cat_max_ratio, cfg.ignore_index),
        RandomHorizontalFlip(float(cfg.flip_prob)),
    ]
    if cfg.photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        ToFloat(),
        Normalize(cfg.mean, cfg.std),
        PadToSize(cfg.crop_size, image_fill=0.0, mask_fill=int(cfg.ignore_index)),
    ]
    return Compose(steps)


def eval_transform(cfg: Any) -> Compose:
    """The evaluation pipeline for the *image* (keys test_scale, mean, std); labels stay at their original size."""
    return Compose([KeepRatioResize(cfg.test_scale), ToFloat(), Normalize(cfg.mean, cfg.std)])
