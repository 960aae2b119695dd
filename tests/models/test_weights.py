"""Strict weight loading: ImageNet backbones (mmseg ResNetV1c / torchvision layouts) and mmseg checkpoint import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from kdrepro.errors import WeightsError
from kdrepro.models import build_segmentor
from kdrepro.models.resnet import ResNetV1c
from kdrepro.models.weights import check_state_dict, import_mmseg_checkpoint, load_backbone_weights

BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def random_like(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value.clone() + 3
        for key, value in state_dict.items()
    }


# ---------------------------------------------------------------- mmseg key names, written out from mmseg's code
# ResNetV1c (mmseg/models/backbones/resnet.py): deep stem nn.Sequential(conv, BN, ReLU) x3 -> indices 0/1, 3/4, 6/7;
# blocks name their norms bn1/bn2(/bn3) (build_norm_layer postfix), shortcut = downsample.0 (conv) / .1 (BN).
# Heads (psp_head.py, aspp_head.py, fcn_head.py): mmcv ConvModule children conv / bn; classifier conv_seg (bias).


def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{entry}": (() if entry == "num_batches_tracked" else (channels,)) for entry in BN_ENTRIES}


def conv_module(prefix: str, in_channels: int, out_channels: int, kernel: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.conv.weight": (out_channels, in_channels, kernel, kernel), **bn(f"{prefix}.bn", out_channels)}


def mmseg_resnet18_v1c_shapes(width: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of mmseg ``ResNetV1c(depth=18, stem_channels=width, base_channels=width)`` (no prefix)."""
    half = width // 2
    shapes = {
        "stem.0.weight": (half, 3, 3, 3),
        **bn("stem.1", half),
        "stem.3.weight": (half, half, 3, 3),
        **bn("stem.4", half),
        "stem.6.weight": (width, half, 3, 3),
        **bn("stem.7", width),
    }
    in_channels = width
    for stage in range(4):
        planes = width * 2**stage
        for block in range(2):
            prefix = f"layer{stage + 1}.{block}"
            block_in = in_channels if block == 0 else planes
            shapes[f"{prefix}.conv1.weight"] = (planes, block_in, 3, 3)
            shapes.update(bn(f"{prefix}.bn1", planes))
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(bn(f"{prefix}.bn2", planes))
            if block == 0 and stage > 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes, in_channels, 1, 1)
                shapes.update(bn(f"{prefix}.downsample.1", planes))
        in_channels = planes
    return shapes


def mmseg_pspnet_r18_shapes(width: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of mmseg ``pspnet_r18-d8`` (decode channels 128, aux 64 at width 64) scaled to ``width``."""
    channels, aux_channels, c3, c4 = 2 * width, width, 4 * width, 8 * width
    shapes = {f"backbone.{k}": v for k, v in mmseg_resnet18_v1c_shapes(width).items()}
    for index in range(4):  # pool scales 1, 2, 3, 6: nn.Sequential(AdaptiveAvgPool2d, ConvModule) -> ".1."
        shapes.update(conv_module(f"decode_head.psp_modules.{index}.1", c4, channels, 1))
    shapes.update(conv_module("decode_head.bottleneck", c4 + 4 * channels, channels, 3))
    shapes["decode_head.conv_seg.weight"] = (num_classes, channels, 1, 1)
    shapes["decode_head.conv_seg.bias"] = (num_classes,)
    shapes.update(conv_module("auxiliary_head.convs.0", c3, aux_channels, 3))
    shapes["auxiliary_head.conv_seg.weight"] = (num_classes, aux_channels, 1, 1)
    shapes["auxiliary_head.conv_seg.bias"] = (num_classes,)
    return shapes


def mmseg_deeplabv3_head_shapes(width: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """``decode_head.*`` of mmseg ``deeplabv3_r18-d8`` (ASPPHead, dilations 1, 12, 24, 36) scaled to ``width``."""
    channels, c4 = 2 * width, 8 * width
    shapes = conv_module("decode_head.image_pool.1", c4, channels, 1)
    for index, kernel in enumerate((1, 3, 3, 3)):
        shapes.update(conv_module(f"decode_head.aspp_modules.{index}", c4, channels, kernel))
    shapes.update(conv_module("decode_head.bottleneck", 5 * channels, channels, 3))
    shapes["decode_head.conv_seg.weight"] = (num_classes, channels, 1, 1)
    shapes["decode_head.conv_seg.bias"] = (num_classes,)
    return shapes


def filled(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=generator)
        for key, shape in shapes.items()
    }


def tiny_cfg(arch: str = "pspnet", **extra) -> dict:
    return {"arch": arch, "depth": 18, "base_width": 16, "head_channels": 128, "aux_channels": 64, **extra}


# ---------------------------------------------------------------- ImageNet backbone weights


def test_load_mmseg_v1c_backbone_weights(tmp_path: Path) -> None:
    weights = filled(mmseg_resnet18_v1c_shapes(16))
    file = tmp_path / "resnet18_v1c.pth"
    checkpoint = {f"backbone.{k}": v for k, v in weights.items()} | {"fc.weight": torch.zeros(1000, 128)}
    torch.save({"meta": {"epoch": 100}, "state_dict": checkpoint}, file)
    backbone = ResNetV1c(18, base_width=16)
    load_backbone_weights(backbone, file)
    assert torch.equal(backbone.stem[0].weight, weights["stem.0.weight"])
    assert torch.equal(backbone.stem[7].running_var, weights["stem.7.running_var"])
    assert torch.equal(backbone.layer3[0].downsample[0].weight, weights["layer3.0.downsample.0.weight"])
    assert torch.equal(backbone.layer4[1].bn2.bias, weights["layer4.1.bn2.bias"])


def test_load_torchvision_weights_into_basic_stem(tmp_path: Path) -> None:
    torchvision_weights = random_like(torchvision.models.resnet18().state_dict())
    file = tmp_path / "resnet18-torchvision.pth"
    torch.save(torchvision_weights, file)
    backbone = ResNetV1c(18, base_width=64, stem="basic")
    load_backbone_weights(backbone, file)
    assert torch.equal(backbone.conv1.weight, torchvision_weights["conv1.weight"])
    assert torch.equal(
        backbone.layer2[0].downsample[1].running_mean, torchvision_weights["layer2.0.downsample.1.running_mean"]
    )
    assert torch.equal(backbone.layer4[1].conv2.weight, torchvision_weights["layer4.1.conv2.weight"])
    # the dilation of the loaded model is still -D8 (weights do not change the architecture)
    assert backbone.layer4[1].conv1.dilation == (4, 4)


def test_torchvision_resnet50_keys_fit_basic_stem_r50() -> None:
    torchvision_keys = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    check_state_dict(ResNetV1c(50, stem="basic"), torchvision_keys, "torchvision resnet50", "backbone")


def test_torchvision_file_into_deep_stem_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "resnet18-torchvision.pth"
    torch.save(torchvision.models.resnet18().state_dict(), file)
    with pytest.raises(WeightsError, match=r"7x7 'conv1' stem.*model.stem=basic"):
        load_backbone_weights(ResNetV1c(18, base_width=64), file)


def test_partial_file_names_missing_keys(tmp_path: Path) -> None:
    weights = filled(mmseg_resnet18_v1c_shapes(16))
    dropped = [k for k in weights if k.startswith("layer4.")]
    file = tmp_path / "partial.pth"
    torch.save({k: v for k, v in weights.items() if k not in dropped}, file)
    backbone = ResNetV1c(18, base_width=16)
    before = backbone.stem[0].weight.clone()
    n_missing = len([k for k in dropped if not k.endswith("num_batches_tracked")])
    with pytest.raises(WeightsError, match=rf"partial.pth.*{n_missing} missing keys \(layer4\.0\.conv1\.weight"):
        load_backbone_weights(backbone, file)
    assert torch.equal(backbone.stem[0].weight, before)  # nothing loaded


def test_wrong_shapes_and_unexpected_keys_are_errors(tmp_path: Path) -> None:
    weights = filled(mmseg_resnet18_v1c_shapes(16))
    file = tmp_path / "width16.pth"
    torch.save(weights, file)
    with pytest.raises(WeightsError, match=r"shape mismatches \(stem\.0\.weight \(8, 3, 3, 3\) in file vs \(16, 3"):
        load_backbone_weights(ResNetV1c(18, base_width=32), file)
    extra = tmp_path / "extra.pth"
    torch.save(weights | {"layer5.0.conv1.weight": torch.zeros(1)}, extra)
    with pytest.raises(WeightsError, match=r"1 unexpected keys \(layer5\.0\.conv1\.weight\)"):
        load_backbone_weights(ResNetV1c(18, base_width=16), extra)


def test_missing_or_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nowhere.pth does not exist"):
        load_backbone_weights(ResNetV1c(18, base_width=16), tmp_path / "nowhere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_backbone_weights(ResNetV1c(18, base_width=16), garbage)


def test_pretrained_key_of_model_config_loads_backbone(tmp_path: Path) -> None:
    weights = filled(mmseg_resnet18_v1c_shapes(16), seed=3)
    file = tmp_path / "v1c.pth"
    torch.save({"state_dict": weights}, file)
    model = build_segmentor(tiny_cfg(pretrained=str(file)), num_classes=5)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])


# ---------------------------------------------------------------- mmseg segmentor checkpoints


def test_import_mmseg_pspnet_checkpoint(tmp_path: Path) -> None:
    state_dict = filled(mmseg_pspnet_r18_shapes(16, num_classes=19))
    file = tmp_path / "pspnet_r18-d8_512x1024_80k_cityscapes.pth"
    torch.save({"meta": {"CLASSES": ("road", "sidewalk"), "mmseg_version": "0.x"}, "state_dict": state_dict}, file)
    model = build_segmentor(tiny_cfg(), num_classes=19)
    meta = import_mmseg_checkpoint(file, model)
    assert meta["CLASSES"] == ("road", "sidewalk")
    landed = {
        "backbone.stem.0.weight": model.backbone.stem[0].weight,
        "backbone.stem.4.running_mean": model.backbone.stem[4].running_mean,
        "backbone.layer3.0.conv1.weight": model.backbone.layer3[0].conv1.weight,
        "backbone.layer3.0.downsample.1.weight": model.backbone.layer3[0].downsample[1].weight,
        "decode_head.psp_modules.0.1.conv.weight": model.decode_head.psp_modules[0][1].conv.weight,
        "decode_head.psp_modules.3.1.bn.running_var": model.decode_head.psp_modules[3][1].bn.running_var,
        "decode_head.bottleneck.conv.weight": model.decode_head.bottleneck.conv.weight,
        "decode_head.conv_seg.weight": model.decode_head.conv_seg.weight,
        "decode_head.conv_seg.bias": model.decode_head.conv_seg.bias,
        "auxiliary_head.convs.0.conv.weight": model.auxiliary_head.convs[0].conv.weight,
        "auxiliary_head.conv_seg.weight": model.auxiliary_head.conv_seg.weight,
    }
    for key, tensor in landed.items():
        assert torch.equal(tensor, state_dict[key]), key
    assert model.backbone.stem[1].num_batches_tracked.item() == 7
    # every key was used: the model's state equals the file's
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state_dict.items()}


def test_import_mmseg_deeplabv3_checkpoint() -> None:
    shapes = mmseg_pspnet_r18_shapes(16, num_classes=19)
    shapes = {k: v for k, v in shapes.items() if not k.startswith("decode_head.")}
    state_dict = filled(shapes | mmseg_deeplabv3_head_shapes(16, num_classes=19), seed=1)
    model = build_segmentor(tiny_cfg("deeplabv3"), num_classes=19)
    import_mmseg_checkpoint({"meta": {}, "state_dict": state_dict}, model)
    head = model.decode_head
    assert torch.equal(head.image_pool[1].conv.weight, state_dict["decode_head.image_pool.1.conv.weight"])
    assert torch.equal(head.aspp_modules[2].conv.weight, state_dict["decode_head.aspp_modules.2.conv.weight"])
    assert head.aspp_modules[2].conv.dilation == (24, 24)
    assert torch.equal(head.aspp_modules[0].bn.bias, state_dict["decode_head.aspp_modules.0.bn.bias"])


def test_import_errors_are_strict() -> None:
    state_dict = filled(mmseg_pspnet_r18_shapes(16, num_classes=150))  # an ADE20K checkpoint
    with pytest.raises(
        WeightsError, match=r"4 shape mismatches \(decode_head\.conv_seg\.weight \(150, 32, 1, 1\) in file"
    ):
        import_mmseg_checkpoint({"state_dict": state_dict}, build_segmentor(tiny_cfg(), num_classes=19))
    cityscapes = filled(mmseg_pspnet_r18_shapes(16, num_classes=19))
    no_aux = {k: v for k, v in cityscapes.items() if not k.startswith("auxiliary_head.")}
    with pytest.raises(
        WeightsError,
        match=r"7 missing keys \(auxiliary_head\.conv_seg\.weight, .*auxiliary_head\.convs\.0\.conv\.weight",
    ):
        import_mmseg_checkpoint(no_aux, build_segmentor(tiny_cfg(), num_classes=19))
    model_without_aux = build_segmentor(tiny_cfg(aux_channels=None), num_classes=19)
    with pytest.raises(WeightsError, match="unexpected keys"):
        import_mmseg_checkpoint(cityscapes, model_without_aux)
    import_mmseg_checkpoint(cityscapes, model_without_aux, ignore_auxiliary=True)
    assert torch.equal(model_without_aux.decode_head.conv_seg.bias, cityscapes["decode_head.conv_seg.bias"])
