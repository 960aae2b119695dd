"""Backbone/head/segmentor tests in mmsegmentation's style: shapes, strides and dilations on tiny CPU tensors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kdrepro.config import CONF_DIR
from kdrepro.errors import ConfigError
from kdrepro.models import Segmentor, SegOutput, build_segmentor, count_flops, count_parameters
from kdrepro.models.heads import ASPPHead, FCNHead, PSPHead
from kdrepro.models.resnet import BasicBlock, ResNetV1c

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = {18: 1, 50: 4, 101: 4}
HEAD_WIDTHS = {18: (128, 64), 50: (512, 256), 101: (512, 256)}  # mmseg *_r18-d8 / *_r50-d8 / *_r101-d8


def model_cfg(arch: str = "pspnet", depth: int = 18, base_width: int = 16, **extra) -> dict:
    head, aux = HEAD_WIDTHS[depth]
    return {
        "arch": arch,
        "depth": depth,
        "base_width": base_width,
        "head_channels": head,
        "aux_channels": aux,
        "dropout": 0.1,
        "pretrained": None,
        **extra,
    }


def conv_of(block: nn.Module) -> nn.Conv2d:
    """The 3x3 conv that carries stride and dilation: conv1 of a BasicBlock, conv2 of a Bottleneck (mmseg)."""
    return block.conv1 if isinstance(block, BasicBlock) else block.conv2


def expected_stage_settings(stage: int, num_blocks: int) -> list[tuple[int, int]]:
    """(stride, dilation) per block of the -D8 ResNet: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contracted."""
    stride, dilation = (1, 2, 1, 1)[stage], (1, 1, 2, 4)[stage]
    first_dilation = dilation // 2 if dilation > 1 else dilation
    return [(stride, first_dilation)] + [(1, dilation)] * (num_blocks - 1)


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_backbone_strides_and_dilations_per_block(depth: int) -> None:
    backbone = ResNetV1c(depth, base_width=8)
    for stage, num_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
        layer = getattr(backbone, f"layer{stage + 1}")
        assert len(layer) == num_blocks
        for block, (stride, dilation) in zip(layer, expected_stage_settings(stage, num_blocks), strict=True):
            conv = conv_of(block)
            assert conv.kernel_size == (3, 3)
            assert conv.stride == (stride, stride) and conv.dilation == (dilation, dilation)
            assert conv.padding == (dilation, dilation)
            if isinstance(block, BasicBlock):  # mmseg: conv2 is a plain 3x3 even in dilated stages
                assert (block.conv2.stride, block.conv2.dilation, block.conv2.padding) == ((1, 1), (1, 1), (1, 1))
            else:
                assert block.conv1.kernel_size == block.conv3.kernel_size == (1, 1)
                assert block.conv1.stride == block.conv3.stride == (1, 1)
    # stage 3 / 4 dilations spelled out for R101: contracted first block then the stage dilation
    if depth == 101:
        assert [conv_of(b).dilation[0] for b in backbone.layer3] == [1] + [2] * 22
        assert [conv_of(b).dilation[0] for b in backbone.layer4] == [2, 4, 4]


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_backbone_downsample_is_1x1_conv_bn(depth: int) -> None:
    backbone = ResNetV1c(depth, base_width=8)
    for stage in range(4):
        first = getattr(backbone, f"layer{stage + 1}")[0]
        needs_shortcut = depth != 18 or stage > 0  # R18 layer1 keeps 64 channels at stride 1
        if not needs_shortcut:
            assert first.downsample is None
            continue
        conv, bn = first.downsample
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.stride == ((1, 2, 1, 1)[stage],) * 2 and conv.bias is None
        assert all(block.downsample is None for block in getattr(backbone, f"layer{stage + 1}")[1:])


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_backbone_stage_shapes_output_stride_8(depth: int) -> None:
    backbone = ResNetV1c(depth, base_width=16).eval()
    with torch.no_grad():
        stages = backbone(torch.randn(1, 3, 64, 64))
    widths = [16 * 2**i * EXPANSION[depth] for i in range(4)]
    assert [tuple(c.shape) for c in stages] == [(1, widths[0], 16, 16)] + [(1, w, 8, 8) for w in widths[1:]]
    assert backbone.out_channels == tuple(widths)


def test_deep_stem_and_width_scaling() -> None:
    standard = ResNetV1c(18)
    convs = [standard.stem[i] for i in (0, 3, 6)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 32), (32, 64)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)] and all(c.kernel_size == (3, 3) for c in convs)
    assert (standard.maxpool.kernel_size, standard.maxpool.stride) == (3, 2)
    assert standard.out_channels == (64, 128, 256, 512)
    assert ResNetV1c(101).out_channels == (256, 512, 1024, 2048)
    narrow = ResNetV1c(50, base_width=16)
    assert [narrow.stem[i].out_channels for i in (0, 3, 6)] == [8, 8, 16]
    assert narrow.out_channels == (64, 128, 256, 512)
    assert narrow.layer1[0].conv1.out_channels == 16


def test_basic_stem_is_torchvision_7x7() -> None:
    backbone = ResNetV1c(18, base_width=16, stem="basic").eval()
    assert not hasattr(backbone, "stem")
    assert (backbone.conv1.kernel_size, backbone.conv1.stride, backbone.conv1.out_channels) == ((7, 7), (2, 2), 16)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64))[3].shape == (1, 128, 8, 8)


def test_mmseg_style_init() -> None:
    model = build_segmentor(model_cfg(), num_classes=5)
    assert torch.all(model.backbone.stem[1].weight == 1) and torch.all(model.backbone.stem[1].bias == 0)
    assert torch.all(model.backbone.layer2[1].bn2.weight == 0)  # zero_init_residual (mmseg ResNet default)
    assert torch.all(model.decode_head.bottleneck.bn.weight == 1)
    assert 0.003 < model.decode_head.conv_seg.weight.std().item() < 0.02  # normal(0, 0.01)
    assert torch.all(model.decode_head.conv_seg.bias == 0)
    fan_out = 9 * model.backbone.layer3[0].conv1.out_channels  # kaiming normal, fan_out: std = sqrt(2 / fan_out)
    assert model.backbone.layer3[0].conv1.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)


@pytest.mark.parametrize("arch, head_type", [("pspnet", PSPHead), ("deeplabv3", ASPPHead)])
def test_segoutput_fields_and_channels(arch: str, head_type: type) -> None:
    model = build_segmentor(model_cfg(arch), num_classes=7).eval()
    assert isinstance(model, Segmentor) and isinstance(model.decode_head, head_type)
    assert isinstance(model.auxiliary_head, FCNHead)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 7, 8, 8)  # output stride 8, not upsampled
    assert out.aux_logits is None  # eval mode
    assert set(out.features) == {"c1", "c2", "c3", "c4", "decoder"}
    assert model.channels == {"c1": 16, "c2": 32, "c3": 64, "c4": 128, "decoder": 32, "logits": 7}
    for name, feature in out.features.items():
        assert feature.shape[1] == model.channels[name]
    assert out.features["decoder"].shape == (2, 32, 8, 8)


def test_head_structure_matches_mmseg() -> None:
    psp = build_segmentor(model_cfg("pspnet", base_width=64), num_classes=19)
    assert [m[0].output_size for m in psp.decode_head.psp_modules] == [1, 2, 3, 6]
    assert psp.decode_head.bottleneck.conv.in_channels == 512 + 4 * 128
    assert psp.decode_head.bottleneck.conv.kernel_size == (3, 3) and psp.decode_head.bottleneck.conv.bias is None
    assert psp.auxiliary_head.convs[0].conv.in_channels == 256 and psp.auxiliary_head.convs[0].conv.out_channels == 64
    assert len(psp.auxiliary_head.convs) == 1 and psp.auxiliary_head.dropout.p == 0.1
    aspp = build_segmentor(model_cfg("deeplabv3", base_width=64), num_classes=19).decode_head
    assert [m.conv.dilation[0] for m in aspp.aspp_modules] == [1, 12, 24, 36]
    assert [m.conv.kernel_size[0] for m in aspp.aspp_modules] == [1, 3, 3, 3]
    assert aspp.image_pool[1].conv.in_channels == 512 and aspp.bottleneck.conv.in_channels == 5 * 128


def test_aux_logits_only_in_training_mode() -> None:
    model = build_segmentor(model_cfg(), num_classes=4)
    out = model.train()(torch.randn(2, 3, 32, 32))
    assert out.aux_logits is not None and out.aux_logits.shape == (2, 4, 4, 4)
    (out.logits.sum() + out.aux_logits.sum()).backward()
    assert model.auxiliary_head.conv_seg.weight.grad is not None
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).aux_logits is None
    no_aux = build_segmentor(model_cfg(aux_channels=None), num_classes=4).train()
    assert no_aux.auxiliary_head is None and no_aux(torch.randn(2, 3, 32, 32)).aux_logits is None


def test_every_packaged_model_config_builds() -> None:
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        cfg.base_width = 8
        model = build_segmentor(cfg, num_classes=3)
        assert model.backbone.depth == cfg.depth and model.channels["logits"] == 3, path.name


def test_config_errors_list_valid_options() -> None:
    with pytest.raises(ConfigError, match="valid archs: pspnet, deeplabv3"):
        build_segmentor(model_cfg(arch="segformer"), 19)
    with pytest.raises(ConfigError, match="valid depths: 18, 50, 101"):
        build_segmentor({**model_cfg(), "depth": 34}, 19)
    with pytest.raises(ConfigError, match="valid stems"):
        build_segmentor(model_cfg(stem="wide"), 19)
    with pytest.raises(ConfigError, match="base_widht"):
        build_segmentor(model_cfg(base_widht=16), 19)
    with pytest.raises(ConfigError, match="base_width"):
        build_segmentor(model_cfg(base_width=7), 19)


# Measured (19 classes, base width 64, auxiliary head included). mmsegmentation/BPKD report 12.82 M and 68.07 M:
# those are counted with ADE20K's 150 classes (their Cityscapes table reuses them), see the 150-class check below.
PARAMS_19_CLASSES = {("pspnet", 18): 12_790_086, ("pspnet", 101): 67_967_622}
PARAMS_WIDTH_16 = {("pspnet", 18): 802_350, ("pspnet", 101): 4_271_742}
PUBLISHED_MILLIONS = {("pspnet", 18): 12.82, ("pspnet", 101): 68.07}


@pytest.mark.parametrize("depth", [18, 101])
def test_parameter_counts_match_mmsegmentation(depth: int) -> None:
    with torch.device("meta"):  # counts need no memory or init
        model = build_segmentor(model_cfg(depth=depth, base_width=64), num_classes=19)
        model_150 = build_segmentor(model_cfg(depth=depth, base_width=64), num_classes=150)
        narrow = build_segmentor(model_cfg(depth=depth, base_width=16), num_classes=19)
    assert count_parameters(model) == PARAMS_19_CLASSES[("pspnet", depth)]
    assert count_parameters(narrow) == PARAMS_WIDTH_16[("pspnet", depth)]
    published = PUBLISHED_MILLIONS[("pspnet", depth)]
    assert count_parameters(model) / 1e6 == pytest.approx(published, rel=0.01)
    assert round(count_parameters(model_150) / 1e6, 2) == published
    # the 19 -> 150 class difference is exactly the two classifiers: (channels + 1) * 131 each
    head, aux = HEAD_WIDTHS[depth]
    assert count_parameters(model_150) - count_parameters(model) == (head + 1 + aux + 1) * 131


def test_full_width_r101_runs_at_tiny_size() -> None:
    model = build_segmentor(model_cfg(depth=101, base_width=64), num_classes=19).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 19, 4, 4) and out.features["c4"].shape == (1, 2048, 4, 4)
    assert model.channels["c3"] == 1024 and model.channels["decoder"] == 512


def test_count_flops_exact_for_one_conv() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 3 * 8 * 9 * 16 * 16  # 2 FLOPs per multiply-add


def test_count_flops_scales_with_area_and_restores_mode() -> None:
    model = build_segmentor(model_cfg(), num_classes=5).train()
    small = count_flops(model, (1, 3, 32, 32))
    large = count_flops(model, (1, 3, 64, 64))  # area doubled twice
    assert small > 0 and 3.6 < large / small < 4.1
    assert model.training and model.decode_head.training
    model.eval()
    assert count_flops(model, (1, 3, 32, 32)) == small and not model.training


@pytest.mark.parametrize("depth, published_gmac", [(18, 54.53), (101, 256.89)])
def test_flops_match_bpkd_readme_at_their_setting(depth: int, published_gmac: float) -> None:
    """BPKD's FLOPs are mmcv multiply-adds of the ADE20K models (150 classes) at 512x512; counted on ``meta``."""
    with torch.device("meta"):
        model = build_segmentor(model_cfg(depth=depth, base_width=64), num_classes=150)
    gmac = count_flops(model, (1, 3, 512, 512)) / 2e9
    assert gmac == pytest.approx(published_gmac, rel=0.01)
    assert gmac < published_gmac  # mmcv also counts BN/ReLU/pooling elements, which FlopCounterMode does not


def _bilinear(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_psp_and_aspp_forward_follow_mmseg_order_and_resize() -> None:
    """Input first then pooled branches (PSP) / image pool first then ASPP branches, align_corners=False."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 11)
    psp = PSPHead(16, 8, num_classes=3).eval()
    aspp = ASPPHead(16, 8, num_classes=3, dilations=(1, 2, 3)).eval()
    with torch.no_grad():
        for module in (psp, aspp):  # non-trivial BN statistics so every branch matters
            for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.weight.uniform_(0.5, 1.5)
        psp_ref = psp.bottleneck(torch.cat([x] + [_bilinear(b(x), x.shape[-2:]) for b in psp.psp_modules], 1))
        psp_feature, psp_logits = psp(x)
        aspp_ref = aspp.bottleneck(
            torch.cat([_bilinear(aspp.image_pool(x), x.shape[-2:])] + [b(x) for b in aspp.aspp_modules], 1)
        )
        aspp_feature, _ = aspp(x)
    torch.testing.assert_close(psp_feature, psp_ref)
    torch.testing.assert_close(psp_logits, psp.conv_seg(psp_ref))  # eval: dropout is the identity
    torch.testing.assert_close(aspp_feature, aspp_ref)
    assert psp_feature.shape == (2, 8, 9, 11) and aspp_feature.shape == (2, 8, 9, 11)
