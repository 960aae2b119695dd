"""Semantic-segmentation evaluation: confusion matrix → mIoU, per-class IoU, pixel accuracy.

Protocol (mmsegmentation): logits are bilinearly resized to the *original* label size, arg-maxed, and compared with
the label; pixels labelled ``ignore_index`` are skipped. Inference is ``whole`` (the resized image at once) or
``slide`` (overlapping crops whose logits are averaged), single scale, no flip.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kdrepro.models.output import resize_logits


def confusion_matrix(prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(K, K)`` int64 matrix, rows = ground truth, columns = prediction (``bincount`` of ``K·gt + pred``)."""
    valid = label != ignore_index
    if valid.any() and int(label[valid].max()) >= num_classes:
        raise ValueError(f"label holds class {int(label[valid].max())} but the dataset has {num_classes} classes")
    index = label[valid].to(torch.int64) * num_classes + prediction[valid].to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclass
class SegMetrics:
    """Scores from a confusion matrix; ``per_class_iou`` is NaN for classes absent from both GT and prediction."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    per_class_iou: list[float]

    def to_json(self, class_names: Sequence[str] | None = None) -> dict:
        result = asdict(self)
        result["per_class_iou"] = [None if math.isnan(v) else v for v in self.per_class_iou]
        if class_names is not None:
            result["class_names"] = list(class_names)
        return result


def metrics_from_confusion(matrix: Tensor) -> SegMetrics:
    """mIoU = mean over classes present in GT or prediction of TP / (TP + FP + FN) (mmseg ``nanmean``)."""
    matrix = matrix.to(torch.float64)
    true_positive = matrix.diag()
    gt_total = matrix.sum(dim=1)
    pred_total = matrix.sum(dim=0)
    union = gt_total + pred_total - true_positive
    iou = true_positive / union  # NaN where a class appears in neither
    accuracy = true_positive / gt_total
    total = matrix.sum()
    return SegMetrics(
        miou=float(torch.nanmean(iou)) if total > 0 else float("nan"),
        pixel_accuracy=float(true_positive.sum() / total) if total > 0 else float("nan"),
        mean_accuracy=float(torch.nanmean(accuracy)) if total > 0 else float("nan"),
        per_class_iou=[float(v) for v in iou],
    )


def slide_logits(model: nn.Module, image: Tensor, num_classes: int, crop: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Sliding-window inference (mmseg ``slide_inference``): average of overlapping crops' upsampled logits."""
    batch, _, height, width = image.shape
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    summed = image.new_zeros((batch, num_classes, height, width))
    counts = image.new_zeros((batch, 1, height, width))
    for row in range(rows):
        for col in range(cols):
            top = min(row * stride_h, max(height - crop_h, 0))
            left = min(col * stride_w, max(width - crop_w, 0))
            bottom, right = min(top + crop_h, height), min(left + crop_w, width)
            window = image[:, :, top:bottom, left:right]
            logits = resize_logits(model(window).logits.float(), (bottom - top, right - left))
            summed[:, :, top:bottom, left:right] += logits
            counts[:, :, top:bottom, left:right] += 1
    return summed / counts


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    ignore_index: int = 255,
    mode: str = "whole",
    slide_crop: Sequence[int] = (512, 1024),
    slide_stride: Sequence[int] = (341, 683),
    device: torch.device | str = "cpu",
    progress: bool | None = None,
    autocast_dtype: torch.dtype | None = None,
    reporter: Any = None,
) -> tuple[SegMetrics, Tensor]:
    """Evaluate ``model`` on ``(image, label)`` batches; returns the metrics and the confusion matrix.

    Labels may be larger than images (images resized to the test scale, labels at original size): logits are resized
    to the label size before the arg-max, as in mmsegmentation. Progress: ``reporter.update()`` after every batch
    when a reporter is given (the training loop's :class:`kdrepro.train.progress.Progress`: a bar on a terminal, a
    line at a steady interval in a log), else a tqdm bar when ``progress`` (default: stderr is a terminal).
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown evaluation mode {mode!r}; use whole or slide")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    show = sys.stderr.isatty() if progress is None else progress
    shown = reporter or tqdm(total=len(batches) if hasattr(batches, "__len__") else None, desc="evaluate",
                             disable=not show, leave=False)  # fmt: skip
    for image, label in batches:
        image, label = image.to(device), label.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            if mode == "whole":
                logits = model(image).logits.float()
            else:
                logits = slide_logits(model, image, num_classes, slide_crop, slide_stride)
        prediction = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)
        matrix += confusion_matrix(prediction, label, num_classes, ignore_index)
        shown.update()
    shown.close()
    model.train(was_training)
    return metrics_from_confusion(matrix), matrix

