"""Qualitative page (``notebooks/qualitative.ipynb``): evenly spaced validation images with the ground truth and
the predictions of the student alone, logit KD, the best segmentation-specific method (compute-matched), the best
extended distilled student (the student alone at every budget is on the extended page) and the teacher; under each
prediction its error map; in each title the image's mIoU.

Predictions follow :mod:`kdrepro.evaluate` (whole image at ``test_scale``, logits upsampled bilinearly to the
label's size, argmax). Colours: the dataset's palette (Cityscapes colours for the Cityscapes layout); ignored
pixels are black in the ground truth and white in the error maps.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from omegaconf import DictConfig, OmegaConf

from kdrepro.analysis.methods import LOGIT_KD, STUDENT_ALONE
from kdrepro.data import build_dataset, class_names, palette
from kdrepro.errors import ConfigError
from kdrepro.models.output import resize_logits
from kdrepro.report.style import FIGURE_WIDTH, figure_note

IGNORE_COLOUR = (0, 0, 0)
CORRECT_COLOUR = (225, 225, 225)
WRONG_COLOUR = (213, 94, 0)  # Okabe–Ito vermillion
IGNORED_IN_ERRORS = (255, 255, 255)


@dataclass(frozen=True)
class Column:
    """One model column: its title and run folder."""

    title: str
    run_dir: Path


def _mean_miou(stats: pd.DataFrame, protocol: str, method: str, multiplier: float = 1.0) -> float:
    row = stats[(stats.protocol == protocol) & (stats.method == method) & (stats.multiplier == multiplier)]
    return float(row.miou_mean.iloc[0]) if len(row) else float("nan")


def pick_columns(runs: pd.DataFrame, stats: pd.DataFrame, families: dict[str, str], names: dict[str, str],
                 runs_dir: str | Path, seed: int | None = None) -> list[Column]:
    """Student alone, logit KD, the best segmentation-specific method (compute-matched mean mIoU), the best
    extended student (highest mean over its budgets) and the teacher, each the run of ``seed`` (default: the
    smallest seed). Models without a finished run are left out."""
    runs_dir = Path(runs_dir)
    finished = runs.dropna(subset=["miou"])
    seed = int(finished.seed.dropna().min()) if seed is None and finished.seed.notna().any() else seed
    compute = stats[(stats.protocol == "compute_matched") & (stats.multiplier == 1.0)]
    specific = compute[compute.method.map(families).eq("segmentation_specific")]
    extended = stats[(stats.protocol == "extended") & (stats.method != STUDENT_ALONE)]
    wanted: list[tuple[str, str, float, str]] = [("compute_matched", STUDENT_ALONE, 1.0, "student alone"),
                                                  ("compute_matched", LOGIT_KD, 1.0, "logit KD")]
    if len(specific):
        best = specific.loc[specific.miou_mean.idxmax()]
        wanted.append(("compute_matched", best.method, 1.0, "best seg.-specific"))
    if len(extended):
        best = extended.loc[extended.miou_mean.idxmax()]
        wanted.append(("extended", best.method, float(best.multiplier), f"best extended KD ({best.multiplier:g}×)"))
    columns = []
    for protocol, method, multiplier, role in wanted:
        match = finished[(finished.protocol == protocol) & (finished.method == method) & (finished.multiplier == multiplier)
                         & ((finished.seed == seed) if seed is not None else True)]
        if len(match) and (runs_dir / match.run.iloc[0] / "checkpoint.pt").is_file():
            columns.append(Column(f"{role}:\n{names.get(method, method)}", runs_dir / match.run.iloc[0]))
    if (runs_dir / "teacher" / "checkpoint.pt").is_file():
        columns.append(Column("teacher", runs_dir / "teacher"))
    if not columns:
        raise ConfigError(f"no checkpoint to show under {runs_dir}; run the pipeline (`make repro`) first")
    return columns


def dataset_config(run_dir: Path, dataset_root: str | None = None, base: str | Path | None = None) -> DictConfig:
    """The dataset config a run trained with (its ``config.yaml``), optionally pointed at another root folder. A
    relative root (the pipeline records ``data/<profile>``) is taken relative to ``base``, the repository root, so
    a notebook running in ``notebooks/`` finds the same images as the pipeline."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; qualitative figures need a run trained by `kdrepro train`")
    cfg = OmegaConf.load(path).dataset
    if dataset_root:
        cfg.root = str(dataset_root)
    if base is not None and not Path(str(cfg.root)).is_absolute():
        cfg.root = str(Path(base) / str(cfg.root))
    return cfg


@torch.inference_mode()
def predict(model: torch.nn.Module, image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Argmax labels ``(H, W)`` of one normalised image ``(3, h, w)``, logits upsampled to ``size``."""
    device = next(model.parameters()).device
    logits = model(image[None].to(device)).logits
    return resize_logits(logits.float(), size).argmax(1)[0].cpu().numpy().astype(np.uint8)


def colorize(labels: np.ndarray, colours: list[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 RGB; ``ignore_index`` (and any id without a colour) is black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    table[ignore_index] = IGNORE_COLOUR
    return table[labels.astype(np.uint8)]


def error_map(prediction: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """RGB: correct pixels light grey, wrong pixels vermillion, ignored pixels white."""
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[...] = CORRECT_COLOUR
    out[prediction != label] = WRONG_COLOUR
    out[label == ignore_index] = IGNORED_IN_ERRORS
    return out


def image_miou(prediction: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> float:
    """mIoU (%) of one image over the classes present in its ground truth or prediction (ignored pixels skipped)."""
    valid = label != ignore_index
    pred, true = prediction[valid].astype(np.int64), label[valid].astype(np.int64)
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float(100 * np.mean(np.diag(confusion)[present] / union[present])) if present.any() else float("nan")


def _load(run_dir: Path, num_classes: int, dataset: str, device: str) -> torch.nn.Module:
    from kdrepro.models.loading import load_model

    return load_model(Path(run_dir) / "checkpoint.pt", num_classes, dataset, map_location=device).eval()


def qualitative_panels(columns: list[Column], num_images: int = 6, dataset_root: str | None = None,
                       device: str = "auto", threads: int | None = 1, base: str | Path | None = None) -> dict:
    """Images, ground truths, predictions, error maps and per-image mIoU of ``num_images`` evenly spaced validation
    images (relative dataset roots are relative to ``base``). ``threads`` (CPU): one, because a few small forward passes gain nothing from more and OpenMP's spinning
    threads make them far slower on a busy shared CPU."""
    if threads:
        torch.set_num_threads(int(threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    cfg = dataset_config(columns[0].run_dir, dataset_root, base)
    dataset = build_dataset(cfg, "val", train_transforms=False)
    names, colours = class_names(cfg), palette(cfg)
    ignore = int(cfg.ignore_index)
    models = [_load(column.run_dir, len(names), str(cfg.get("name", "")), device) for column in columns]
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).astype(int))
    images, present = [], set()
    for index in indices:
        tensor, _ = dataset[int(index)]
        raw, label = dataset.load(int(index))
        predictions = [predict(model, tensor, label.shape) for model in models]
        for labels in (label, *predictions):
            present |= {int(v) for v in np.unique(labels) if v < len(colours)}
        images.append({"index": int(index), "image": raw, "truth": colorize(label, colours, ignore),
                       "predictions": [colorize(p, colours, ignore) for p in predictions],
                       "errors": [error_map(p, label, ignore) for p in predictions],
                       "miou": [image_miou(p, label, len(names), ignore) for p in predictions]})
    return {"titles": [c.title for c in columns], "images": images, "present": sorted(present), "names": names,
            "colours": colours}


def plot_qualitative(panels: dict, profile: str = "") -> Figure:
    """Two rows per image: image, ground truth and each model's prediction (title: its mIoU on this image); below,
    each model's error map. A class legend and an error legend underneath."""
    images, titles = panels["images"], panels["titles"]
    n_columns = 2 + len(titles)
    height, width = images[0]["image"].shape[:2]
    panel = FIGURE_WIDTH / n_columns
    fig_height = len(images) * (2 * panel * height / width + 0.45) + 2.2
    fig, axes = plt.subplots(2 * len(images), n_columns, figsize=(FIGURE_WIDTH, fig_height), squeeze=False,
                             gridspec_kw={"hspace": 0.12, "wspace": 0.04, "height_ratios": [1.25, 1] * len(images)})
    for row, item in enumerate(images):
        top, bottom = axes[2 * row], axes[2 * row + 1]
        pictures = [item["image"], item["truth"], *item["predictions"]]
        labels = [f"val image {item['index']}", "ground truth", *[f"mIoU {m:.1f}" for m in item["miou"]]]
        for ax, picture, label in zip(top, pictures, labels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(label, fontsize=8.5, pad=2)
        for ax, picture in zip(bottom[2:], item["errors"], strict=True):
            ax.imshow(picture, interpolation="nearest")
        bottom[1].text(1.0, 0.5, "errors →", ha="right", va="center", fontsize=9, transform=bottom[1].transAxes)
        for ax in (*top, *bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        for ax in bottom[:2]:
            ax.axis("off")
    characters = max(8, int(panel * 72 / (8.5 * 0.55)))  # what fits in one panel's width at 8.5 pt
    wrapped = ["\n".join(textwrap.fill(line, characters) for line in title.split("\n")) for title in titles]
    for ax, title in zip(axes[0][2:], wrapped, strict=True):
        ax.set_title(f"{title}\n{ax.get_title()}", fontsize=8.5, pad=2)
    title_lines = 1 + max((title.count("\n") + 1 for title in wrapped), default=1)
    handles = [Patch(color=np.asarray(panels["colours"][i]) / 255, label=panels["names"][i]) for i in panels["present"]]
    handles += [Patch(color=np.asarray(IGNORE_COLOUR) / 255, label="ignored (ground truth)"),
                Patch(color=np.asarray(WRONG_COLOUR) / 255, label="error"),
                Patch(facecolor=np.asarray(CORRECT_COLOUR) / 255, edgecolor="#999", label="correct")]
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), frameon=False, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - (0.2 + 0.16 * title_lines) / fig_height,
                        bottom=(0.35 + 0.2 * (len(handles) // 6 + 1)) / fig_height)
    return figure_note(fig, profile)


def alt_text(panels: dict) -> str:
    """The figure's alt text: how many images and which models it compares."""
    models = ", ".join(title.replace("\n", " ") for title in panels["titles"])
    return (f"{len(panels['images'])} validation images, each with ground truth, the predictions of {models}, "
            "their per-image mIoU and error maps.")
