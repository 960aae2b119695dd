import math

import pytest
import torch

from kdrepro.evaluate import confusion_matrix, evaluate, metrics_from_confusion, slide_logits
from kdrepro.models.output import SegOutput


def test_confusion_matrix_against_hand_count():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    matrix = confusion_matrix(prediction, label, num_classes=3)
    # rows: ground truth, columns: prediction; the 255 pixel is skipped
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert torch.equal(matrix, expected)


def test_miou_from_hand_computed_matrix():
    matrix = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    metrics = metrics_from_confusion(matrix)
    # IoU_0 = 1/(2+2-1) = 1/3, IoU_1 = 2/(3+3-2) = 1/2, IoU_2 = 1/(2+2-1) = 1/3
    assert metrics.per_class_iou == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert metrics.miou == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert metrics.pixel_accuracy == pytest.approx(4 / 7)
    assert metrics.mean_accuracy == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_excluded_from_mean():
    matrix = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    metrics = metrics_from_confusion(matrix)
    assert math.isnan(metrics.per_class_iou[2])
    assert metrics.miou == pytest.approx(1.0)
    assert metrics.to_json()["per_class_iou"][2] is None


def test_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="class 5"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 5, 255]), num_classes=3)


class _Constant(torch.nn.Module):
    """Predicts class = (x > 0) per pixel at output stride 1, for exact evaluation checks."""

    def forward(self, image):
        positive = (image[:, :1] > 0).float()
        return SegOutput(logits=torch.cat([1 - positive, positive], dim=1))


def test_evaluate_whole_and_slide_agree_on_a_pixelwise_model():
    image = torch.randn(1, 3, 20, 30)
    label = (image[:, 0] > 0).long()
    label[0, 0, :5] = 255
    batches = [(image, label)]
    whole, _ = evaluate(_Constant(), batches, 2, mode="whole", progress=False)
    slide, _ = evaluate(_Constant(), batches, 2, mode="slide", slide_crop=(8, 12), slide_stride=(5, 7), progress=False)
    assert whole.miou == pytest.approx(1.0)
    assert slide.miou == pytest.approx(1.0)


def test_slide_covers_every_pixel_once_averaged():
    class Ones(torch.nn.Module):
        def forward(self, image):
            return SegOutput(logits=torch.ones(image.shape[0], 2, *image.shape[-2:]))

    logits = slide_logits(Ones(), torch.zeros(1, 3, 17, 23), 2, crop=(8, 8), stride=(5, 5))
    assert torch.allclose(logits, torch.ones_like(logits))


def test_evaluate_resizes_logits_to_label_size():
    class Half(torch.nn.Module):
        def forward(self, image):
            return SegOutput(logits=torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)], dim=1))

    metrics, matrix = evaluate(Half(), [(torch.zeros(1, 3, 4, 4), torch.zeros(1, 16, 16, dtype=torch.long))], 2, progress=False)
    assert int(matrix.sum()) == 256
    assert metrics.pixel_accuracy == 1.0
