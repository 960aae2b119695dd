"""Joint transforms: image/mask alignment, mmseg semantics (keep-ratio rescale, cat_max_ratio crop, padding,
photometric distortion, normalisation), determinism under an explicit generator, and the resize / hue kernels
against torchvision's (the oracle: the runtime code does not import torchvision)."""

import colorsys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from torchvision.transforms import InterpolationMode

from kdrepro.data.transforms import (
    CatMaxRatioCrop,
    Compose,
    KeepRatioResize,
    PadToSize,
    PhotoMetricDistortion,
    PhotometricParams,
    RandomHorizontalFlip,
    adjust_hue,
    eval_transform,
    keep_ratio_size,
    resize_bilinear,
    resize_nearest,
    scale_saturation,
    train_transform,
)

# 19 well-separated colours (one per class) so a label can be read back from the image
PALETTE = torch.tensor([[(40 * i) % 256, (90 * i + 30) % 256, (150 * i + 60) % 256] for i in range(19)], dtype=torch.uint8)
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def encoded_sample(height=32, width=64, block=8, seed=0):
    """A blocky label map and an image whose colour at every pixel is its label's palette colour."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 19, (height // block, width // block), generator=generator)
    label = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1).to(torch.uint8)
    image = PALETTE[label.long()].permute(2, 0, 1).contiguous()
    return image, label


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def decode(image: torch.Tensor) -> torch.Tensor:
    """Label of each pixel = nearest palette colour."""
    pixels = image.permute(1, 2, 0).reshape(-1, 1, 3).float()
    distance = ((pixels - PALETTE.float()[None]) ** 2).sum(-1)
    return distance.argmin(-1).reshape(image.shape[-2:])


def interior(label: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood holds a single label (away from block edges and the border)."""
    padded = torch.nn.functional.pad(label[None, None].float(), [radius] * 4, value=-1.0)
    windows = torch.nn.functional.unfold(padded, 2 * radius + 1).reshape(-1, *label.shape)
    return (windows == label.float()[None]).all(0)


def assert_aligned(image, mask, radius=1):
    keep = interior(mask, radius) & (mask != 255)
    assert keep.sum() > 0.2 * mask.numel()
    assert torch.equal(decode(image)[keep], mask.long()[keep])


def test_keep_ratio_size_follows_mmcv_rescale_rule():
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(1024, 2048, (1024, 512)) == (512, 1024)  # ratio 0.5 of Cityscapes' scale
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)  # ADE20K: short side 512
    assert keep_ratio_size(600, 400, (2048, 512)) == (768, 512)  # portrait: the short edge is the width
    assert keep_ratio_size(100, 3000, (2048, 512)) == (68, 2048)  # a long edge capped at 2048
    assert keep_ratio_size(3, 5, (7, 7)) == (4, 7)  # int(4.2 + 0.5) = 4


@pytest.mark.parametrize("seed", range(4))
def test_random_resize_keeps_image_and_mask_aligned(seed):
    image, mask = encoded_sample(block=16, seed=seed)
    out_image, out_mask = KeepRatioResize((64, 32), (0.5, 2.0))(image, mask, gen(seed))
    assert out_image.shape[-2:] == out_mask.shape[-2:]
    assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.uint8
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist())  # nearest: no new label values
    assert_aligned(out_image, out_mask, radius=2)


def test_random_resize_samples_the_ratio_range():
    image, mask = encoded_sample()
    sizes = set()
    for seed in range(20):
        out_image, _ = KeepRatioResize((64, 32), (0.5, 2.0))(image, mask, gen(seed))
        height, width = out_image.shape[-2:]
        assert 16 <= height <= 64 and width == pytest.approx(2 * height, abs=1)
        sizes.add(height)
    assert len(sizes) > 5


@pytest.mark.parametrize("seed", range(4))
def test_crop_and_flip_move_image_and_mask_together(seed):
    image, mask = encoded_sample(seed=seed)
    out_image, out_mask = Compose([CatMaxRatioCrop((24, 40), 0.75), RandomHorizontalFlip(0.5)])(image, mask, gen(seed))
    assert out_image.shape[-2:] == (24, 40) and out_mask.shape == (24, 40)
    assert torch.equal(decode(out_image), out_mask.long())  # exact: no interpolation involved


def test_flip_mirrors_both():
    image, mask = encoded_sample()
    out_image, out_mask = RandomHorizontalFlip(1.0)(image, mask, gen(0))
    assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_image, image.flip(-1))
    kept_image, kept_mask = RandomHorizontalFlip(0.0)(image, mask, gen(0))
    assert kept_image is image and kept_mask is mask


def test_crop_is_a_window_of_the_input():
    image, mask = encoded_sample(seed=3)
    out_image, out_mask = CatMaxRatioCrop((16, 16), 1.0)(image, mask, gen(0))
    matches = [
        (top, left)
        for top in range(32 - 16 + 1)
        for left in range(64 - 16 + 1)
        if torch.equal(mask[top : top + 16, left : left + 16], out_mask)
        and torch.equal(image[:, top : top + 16, left : left + 16], out_image)
    ]
    assert matches


def test_crop_larger_than_image_keeps_whole_image_then_pad_fills_bottom_right():
    image, mask = encoded_sample(height=16, width=24)
    out_image, out_mask = Compose([CatMaxRatioCrop((32, 40), 0.75), PadToSize((32, 40), 0.0, 255)])(image, mask, gen(0))
    assert out_mask.shape == (32, 40)
    assert torch.equal(out_mask[:16, :24], mask) and torch.equal(out_image[:, :16, :24], image)
    assert (out_mask[16:] == 255).all() and (out_mask[:, 24:] == 255).all()
    assert (out_image[:, 16:] == 0).all() and (out_image[:, :, 24:] == 0).all()


def _half_dominated_mask():
    """Left half all class 0 (crops there are rejected), right half a 4-class checkerboard."""
    mask = torch.zeros(32, 64, dtype=torch.uint8)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask[:, 32:] = (1 + (rows // 2 % 2) * 2 + cols // 2 % 2).to(torch.uint8)
    return mask


def _max_ratio(mask):
    counts = torch.bincount(mask[mask != 255].long())
    return counts.max().item() / counts.sum().item()


def test_cat_max_ratio_redraws_dominated_crops():
    mask = _half_dominated_mask()
    image = torch.zeros(3, 32, 64, dtype=torch.uint8)
    ratios_with, ratios_without = [], []
    for seed in range(40):
        ratios_with.append(_max_ratio(CatMaxRatioCrop((16, 16), 0.75)(image, mask, gen(seed))[1]))
        ratios_without.append(_max_ratio(CatMaxRatioCrop((16, 16), 1.0)(image, mask, gen(seed))[1]))
    assert max(ratios_with) < 0.75
    assert max(ratios_without) >= 0.75  # without the rule, dominated crops do occur for these seeds


def test_cat_max_ratio_ignores_255_and_needs_two_classes():
    crop = CatMaxRatioCrop((10, 10), 0.75)
    mask = torch.full((10, 10), 255, dtype=torch.uint8)
    mask[:6] = 0  # 60 pixels of class 0
    mask[6, :] = 1  # 10 pixels of class 1; 30 ignored pixels
    assert not crop._balanced(mask, (0, 0, 10, 10))  # 60 / 70 >= 0.75 (it would be 0.6 if 255 counted)
    mask[7, :] = 1
    assert not crop._balanced(mask, (0, 0, 10, 10))  # 60 / 80 = 0.75 exactly: mmseg needs strictly less
    mask[8, :] = 2
    assert crop._balanced(mask, (0, 0, 10, 10))  # 60 / 90
    assert not crop._balanced(torch.zeros(10, 10, dtype=torch.uint8), (0, 0, 10, 10))


def test_cat_max_ratio_falls_back_to_an_unchecked_crop():
    image, mask = torch.zeros(3, 32, 64, dtype=torch.uint8), torch.zeros(32, 64, dtype=torch.uint8)
    out_image, out_mask = CatMaxRatioCrop((16, 16), 0.75)(image, mask, gen(0))
    assert out_image.shape[-2:] == (16, 16) and out_mask.shape == (16, 16)


def test_cat_max_ratio_draws_eleven_windows_when_every_check_fails():
    """mmseg's loop: one draw, then up to 10 checked redraws; the last (11th) window is used unchecked."""
    crop = CatMaxRatioCrop((16, 16), 0.75)
    mask = torch.zeros(32, 64, dtype=torch.uint8)
    generator = gen(0)
    window = crop.window(32, 64, mask, generator)
    replay = gen(0)
    windows = [crop._random_window(32, 64, replay) for _ in range(11)]
    assert window == windows[-1]
    assert torch.equal(generator.get_state(), replay.get_state())  # exactly 11 draws, no more


def test_photometric_distortion_changes_only_the_image():
    image, mask = encoded_sample()
    changed = 0
    for seed in range(8):
        out_image, out_mask = PhotoMetricDistortion()(image, mask, gen(seed))
        assert out_mask is mask
        assert out_image.dtype == torch.uint8 and out_image.shape == image.shape
        changed += int(not torch.equal(out_image, image))
    assert changed >= 6


def test_photometric_brightness_is_additive_with_truncation():
    image = torch.tensor([[[0, 100, 250]]] * 3, dtype=torch.uint8)
    params = PhotometricParams(brightness=10.7, contrast_first=True, contrast=None, saturation=None, hue=None)
    out = PhotoMetricDistortion.apply(image, params)
    assert out.dtype == torch.uint8 and out[0, 0].tolist() == [10, 110, 255]
    params = PhotometricParams(brightness=None, contrast_first=True, contrast=1.5, saturation=None, hue=None)
    assert PhotoMetricDistortion.apply(image, params)[0, 0].tolist() == [0, 150, 255]  # mmseg "contrast" = scale


def test_photometric_hue_shifts_opencv_steps_and_truncates():
    image = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8).expand(3, 2, 2)  # pure red, hue 0
    params = PhotometricParams(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=-18)
    out = PhotoMetricDistortion.apply(image, params)  # 36 degrees back: (255, 0, 153) = magenta-red
    expected = TF.adjust_hue(image.float() / 255, -0.1).mul(255).floor()
    assert torch.equal(out.float(), expected) and out[:, 0, 0].tolist() == [255, 0, 153]


def test_photometric_parameters_follow_mmseg_ranges():
    distortion = PhotoMetricDistortion()
    generator = gen(0)
    draws = [distortion.draw(generator) for _ in range(400)]
    brightness = [d.brightness for d in draws if d.brightness is not None]
    hues = [d.hue for d in draws if d.hue is not None]
    contrast = [d.contrast for d in draws if d.contrast is not None]
    saturation = [d.saturation for d in draws if d.saturation is not None]
    assert 150 < len(brightness) < 250 and all(-32 <= b <= 32 for b in brightness)
    assert 150 < len(hues) < 250 and all(-18 <= h < 18 for h in hues) and isinstance(hues[0], int)
    assert {-18, 17} <= set(hues)
    assert 150 < len(contrast) < 250 and all(0.5 <= c <= 1.5 for c in contrast)
    assert 150 < len(saturation) < 250 and all(0.5 <= c <= 1.5 for c in saturation)
    assert 150 < sum(d.contrast_first for d in draws) < 250


def test_scale_saturation_matches_hsv():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 255, (50, 3))
    for factor in (0.5, 1.3, 3.0):
        out = scale_saturation(torch.tensor(rgb.T[:, :, None], dtype=torch.float64), factor)[:, :, 0].T.numpy()
        for before, after in zip(rgb, out, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*(before / 255))
            expected = np.array(colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v)) * 255
            np.testing.assert_allclose(after, expected, atol=1e-6)


def _cfg(**overrides):
    base = {"image_scale": [64, 32], "ratio_range": [0.5, 2.0], "crop_size": [24, 40], "cat_max_ratio": 0.75,
            "flip_prob": 0.5, "photometric": True, "mean": MEAN, "std": STD, "ignore_index": 255, "test_scale": [128, 64]}  # fmt: skip
    return OmegaConf.create({**base, **overrides})


def test_normalisation_values():
    pixel = torch.tensor([200, 100, 50], dtype=torch.uint8)
    image = pixel[:, None, None].expand(3, 4, 8).contiguous()
    out = eval_transform(_cfg(test_scale=[8, 4]))(image)
    expected = (pixel.double() - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 8)
    torch.testing.assert_close(out[:, 0, 0].double(), expected, rtol=0, atol=1e-5)


def test_eval_transform_rescales_keeping_the_ratio():
    image, _ = encoded_sample(height=32, width=64)
    assert eval_transform(_cfg(test_scale=[128, 64]))(image).shape == (3, 64, 128)
    assert eval_transform(_cfg(test_scale=[2048, 16]))(image).shape == (3, 16, 32)


def test_train_transform_shapes_padding_and_alignment():
    image, mask = encoded_sample()
    cfg = _cfg(photometric=False, ratio_range=[0.5, 0.5], crop_size=[24, 40])  # 16x32 image: padded to 24x40
    out_image, out_mask = train_transform(cfg)(image, mask, gen(0))
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
    assert out_image.shape == (3, 24, 40) and out_mask.shape == (24, 40)
    assert (out_mask[16:] == 255).all() and (out_image[:, 16:] == 0).all()  # padded after normalisation
    assert (out_mask[:, 32:] == 255).all() and (out_mask[:16, :32] != 255).all()
    restored = (out_image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).round().clamp(0, 255)
    assert_aligned(restored[:, :16, :32].to(torch.uint8), out_mask[:16, :32], radius=1)


def test_train_transform_is_deterministic_under_its_generator():
    image, mask = encoded_sample()
    transform = train_transform(_cfg())
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed + 100)  # the global RNG must play no part
        outputs.append(transform(image, mask, gen(seed)))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
    assert not torch.equal(outputs[0][0], outputs[2][0])


def test_train_transform_leaves_the_global_rng_alone_and_needs_a_generator():
    image, mask = encoded_sample()
    state = torch.get_rng_state()
    train_transform(_cfg())(image, mask, gen(0))
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="torch.Generator"):
        train_transform(_cfg())(image, mask)


@pytest.mark.parametrize(
    ("size", "out"), [((128, 256), (64, 128)), ((128, 256), (255, 511)), ((37, 53), (90, 17)), ((64, 128), (65, 130))]
)
def test_resize_kernels_match_torchvision(size, out):
    generator = gen(sum(out))
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=generator)
    mask = torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
    expected = TF.resize(image, list(out), InterpolationMode.BILINEAR, antialias=False)
    assert torch.equal(resize_bilinear(image, out), expected)
    assert torch.equal(resize_nearest(mask, out), TF.resize_mask(mask, list(out)))


@pytest.mark.parametrize("shift", [-0.5, -0.1, -1 / 180, 0.0, 0.05, 17 / 180, 0.3, 0.5])
def test_adjust_hue_matches_torchvision(shift):
    generator = gen(0)
    image = torch.rand(3, 32, 48, generator=generator)
    image[:, :4] = image[:1, :4]  # grey pixels: hue and saturation 0
    image[:, 4:12] = image[:, 4:12].mul(255).floor() / 255  # uint8 levels, as the photometric distortion feeds it
    image[:, 12:16, :8] = torch.tensor([1.0, 1.0, 0.0])[:, None, None]  # ties between max channels
    torch.testing.assert_close(adjust_hue(image, shift), TF.adjust_hue(image, shift), rtol=0, atol=1e-5)
