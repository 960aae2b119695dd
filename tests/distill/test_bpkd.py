"""BPKD: edge masks against explicit window loops, ignore handling, edge/body losses, distiller, config."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.distill import build, build_term
from kdrepro.distill.bpkd import bpkd_body_loss, bpkd_edge_loss, edge_masks
from kdrepro.distill.cwd import cwd_loss
from kdrepro.errors import ConfigError
from kdrepro.models.output import SegOutput

CHANNELS = {"c3": 16, "c4": 32, "decoder": 8, "logits": 19}
TEACHER_CHANNELS = {"c3": 64, "c4": 128, "decoder": 32, "logits": 19}
IGNORE = 255


def window(labels: list[list[int]], row: int, col: int, radius: int) -> list[int]:
    """Labels of the pixels within ``radius`` (Chebyshev) of (row, col), inside the image."""
    height, width = len(labels), len(labels[0])
    return [
        labels[r][c]
        for r in range(max(0, row - radius), min(height, row + radius + 1))
        for c in range(max(0, col - radius), min(width, col + radius + 1))
    ]


def loop_masks(labels: torch.Tensor, classes: int, cell: int, kernel: int) -> torch.Tensor:
    """Reference edge masks: pixel p is in class c's band iff p is labelled and its window holds c and another
    labelled class; the band is then averaged over ``cell × cell`` blocks."""
    batch, height, width = labels.shape
    out = torch.zeros(batch, classes, height // cell, width // cell, dtype=torch.float64)
    for n in range(batch):
        grid = labels[n].tolist()
        for row in range(height):
            for col in range(width):
                seen = {v for v in window(grid, row, col, kernel // 2) if v != IGNORE}
                if grid[row][col] == IGNORE or len(seen) < 2:
                    continue
                for c in seen:
                    out[n, c, row // cell, col // cell] += 1.0 / cell**2
    return out


def dilate_minus_erode(labels: torch.Tensor, classes: int, kernel: int) -> torch.Tensor:
    """Full-resolution dilate(1[y=c]) − erode(1[y=c]) for label maps without ignore pixels."""
    batch, height, width = labels.shape
    out = torch.zeros(batch, classes, height, width, dtype=torch.float64)
    for n in range(batch):
        grid = labels[n].tolist()
        for row in range(height):
            for col in range(width):
                values = window(grid, row, col, kernel // 2)
                for c in range(classes):
                    out[n, c, row, col] = float(c in values) - float(all(v == c for v in values))
    return out


def test_edge_masks_match_window_loops_with_ignore() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 1, 1)).repeat(1, 12, 12)
    labels[:, :, 6:] = torch.randint(0, 4, (2, 1, 1))
    labels[0, 2:5, 1:4] = IGNORE
    labels[1, 9:, :] = 3
    labels[1, 0, 0] = IGNORE
    masks = edge_masks(labels, num_classes=5, logits_size=(3, 3), kernel_size=3)
    assert masks.shape == (2, 5, 3, 3)
    torch.testing.assert_close(masks.double(), loop_masks(labels, 5, cell=4, kernel=3))


def test_edge_band_equals_dilate_minus_erode_without_ignore() -> None:
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (1, 6, 6))
    band = edge_masks(labels, num_classes=3, logits_size=(6, 6), kernel_size=3)  # cell 1: no pooling
    torch.testing.assert_close(band.double(), dilate_minus_erode(labels, 3, kernel=3))


def test_straight_boundary_band_width_and_soft_values() -> None:
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1  # vertical boundary between columns 7 and 8
    masks = edge_masks(labels, num_classes=2, logits_size=(2, 2), kernel_size=7)
    # band = columns 5..10 (3 each side); each 8x8 cell holds 3 band columns of 8 -> 3/8 for both classes
    torch.testing.assert_close(masks, torch.full((1, 2, 2, 2), 3 / 8))


def test_ignore_pixels_never_create_boundaries() -> None:
    labels = torch.full((1, 16, 16), IGNORE, dtype=torch.long)
    labels[:, :, :6] = 2
    labels[:, :, 11:] = 2  # same class on both sides of an unlabelled strip
    assert edge_masks(labels, 19, (2, 2), kernel_size=7).abs().sum() == 0
    labels[:, :, 8:] = 5  # different classes 3 px apart (strip of 2 px), within the 7x7 window: a real boundary
    assert (edge_masks(labels, 19, (2, 2), kernel_size=7)[:, [2, 5]] > 0).all()
    labels[:, :, 6:] = IGNORE  # one class beside unlabelled pixels
    assert edge_masks(labels, 19, (2, 2), kernel_size=7).abs().sum() == 0
    assert edge_masks(torch.full((1, 16, 16), IGNORE), 19, (2, 2)).abs().sum() == 0


def test_out_of_range_labels_raise() -> None:
    with pytest.raises(ValueError, match="labels must be in"):
        edge_masks(torch.full((1, 8, 8), 30), 19, (1, 1))


def test_edge_loss_matches_explicit_loops() -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    masks = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    masks[0, 1] = 0.1  # class 1 of image 0: edge area 0.4 < 1 -> floored at one pixel
    tau = 4.0
    expected = 0.0
    for n in range(2):
        kl = {}
        for i in range(2):
            for j in range(2):
                s = [student[n, k, i, j].item() * masks[n, k, i, j].item() / tau for k in range(3)]
                t = [teacher[n, k, i, j].item() * masks[n, k, i, j].item() / tau for k in range(3)]
                p_s = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
                p_t = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
                kl[i, j] = tau**2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
        for c in range(3):
            area = max(masks[n, c].sum().item(), 1.0)
            expected += sum(kl[i, j] * masks[n, c, i, j].item() for i in range(2) for j in range(2)) / area / 2
    assert bpkd_edge_loss(student, teacher, masks, tau).item() == pytest.approx(expected, rel=1e-10)


def test_body_loss_is_cwd_of_body_masked_logits() -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    masks = torch.rand(2, 4, 3, 3)
    expected = cwd_loss(student * (1 - masks), teacher * (1 - masks), 4.0)
    assert bpkd_body_loss(student, teacher, masks, 4.0).item() == pytest.approx(expected.item(), rel=1e-6)
    no_edges = torch.zeros_like(masks)
    assert bpkd_body_loss(student, teacher, no_edges, 4.0).item() == pytest.approx(
        cwd_loss(student, teacher, 4.0).item()
    )
    assert bpkd_edge_loss(student, teacher, no_edges, 4.0).item() == 0.0


def make_output(batch: int = 2, grad: bool = False) -> SegOutput:
    return SegOutput(logits=torch.randn(batch, 19, 8, 8, requires_grad=grad), features={})


def make_labels(batch: int = 2) -> torch.Tensor:
    labels = torch.randint(0, 19, (batch, 4, 4)).repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    labels[:, :5, :] = IGNORE
    return labels


def test_distiller_terms_gradients_and_zero_for_equal_logits() -> None:
    torch.manual_seed(4)
    distiller = build_term("bpkd", {}, CHANNELS, TEACHER_CHANNELS)
    student, teacher, labels = make_output(grad=True), make_output(), make_labels()
    losses = distiller(student, teacher, labels)
    assert set(losses) == {"bpkd_edge", "bpkd_body"}
    masks = edge_masks(labels, 19, (8, 8), kernel_size=7)
    assert masks.sum() > 0
    expected_edge = 5.0 * bpkd_edge_loss(student.logits, teacher.logits, masks, 4.0)
    assert losses["bpkd_edge"].item() == pytest.approx(expected_edge.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert student.logits.grad.abs().sum() > 0
    same = distiller(teacher, teacher, labels)
    assert all(value.item() == pytest.approx(0.0, abs=1e-6) for value in same.values())


def test_batch_size_one_non_divisible_sizes_determinism_state_dict() -> None:
    torch.manual_seed(5)
    distiller = build_term("bpkd", {"edge_kernel_size": 5}, CHANNELS, TEACHER_CHANNELS)
    student, teacher = make_output(batch=1, grad=True), make_output(batch=1)
    labels = torch.randint(0, 19, (1, 60, 60))  # logits 8x8 = ceil(60 / 8)
    first = distiller(student, teacher, labels)
    assert all(torch.isfinite(value) and value.item() > 0 for value in first.values())
    restored = build_term("bpkd", {"edge_kernel_size": 5}, CHANNELS, TEACHER_CHANNELS)
    restored.load_state_dict(distiller.state_dict())
    second = restored(student, teacher, labels)
    assert all(torch.equal(first[name], second[name]) for name in first)
    all_ignored = distiller(student, teacher, torch.full((1, 60, 60), IGNORE))
    assert all_ignored["bpkd_edge"].item() == 0.0 and all_ignored["bpkd_body"].item() > 0


@pytest.mark.parametrize("options", [{"edge_kernel_size": 4}, {"temperature": 0.0}])
def test_bad_options_raise_config_error(options: dict) -> None:
    with pytest.raises(ConfigError):
        build_term("bpkd", options, CHANNELS, TEACHER_CHANNELS)


def test_method_config(method_yaml) -> None:
    config = OmegaConf.to_container(method_yaml("bpkd"))
    assert config["terms"]["bpkd"]["edge_weight"] == 5.0 and config["terms"]["bpkd"]["body_weight"] == 2.0  # 1/10 of 50, 20
    built = build(config, CHANNELS, TEACHER_CHANNELS).terms["bpkd"]
    assert (built.temperature, built.edge_kernel_size, built.ignore_index) == (4.0, 7, 255)
