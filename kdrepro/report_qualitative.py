"""Qualitative figure of the report (``notebooks/qualitative.ipynb``): a few validation images with their ground
truth and the predictions of the teacher, the student alone and the best distilled student, in the dataset's palette
(the official Cityscapes colours for the Cityscapes layout, ignore = black).

Predictions follow the evaluation protocol of :mod:`kdrepro.evaluate` (whole image at ``test_scale``, logits
upsampled bilinearly to the label's size, argmax). Checkpoints are read with
:func:`kdrepro.train.checkpoint.load_checkpoint` and rebuilt with :func:`kdrepro.models.build_segmentor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from omegaconf import DictConfig, OmegaConf

from kdrepro.data import build_dataset, class_names, palette
from kdrepro.errors import ConfigError
from kdrepro.models import build_segmentor
from kdrepro.models.output import resize_logits
from kdrepro.report import figure_note
from kdrepro.train.checkpoint import load_checkpoint

IGNORE_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class Column:
    """One model column of the figure: its title and run folder."""

    title: str
    run_dir: Path


def pick_columns(runs: pd.DataFrame, runs_dir: str | Path) -> list[Column]:
    """Teacher, student alone and the best distilled student (highest compute-matched mIoU, else iteration-matched)."""
    runs_dir = Path(runs_dir)
    columns = []
    if (runs_dir / "teacher" / "checkpoint.pt").is_file():
        teacher = runs[runs.protocol == "teacher"]
        columns.append(Column(f"teacher\n(mIoU {100 * teacher.miou.iloc[0]:.1f})" if len(teacher) else "teacher", runs_dir / "teacher"))
    for protocol in ("compute_matched", "iter_matched"):
        students = runs[(runs.protocol == protocol) & runs.miou.notna()]  # diverged runs keep no checkpoint
        if students.empty:
            continue
        label = protocol.replace("_", "-")
        alone = students[students.method == "none"]
        if not alone.empty:
            columns.append(Column(f"student alone: none\n({label}, mIoU {100 * alone.miou.iloc[0]:.1f})", runs_dir / alone.run.iloc[0]))
        distilled = students[students.method != "none"]
        if not distilled.empty:
            best = distilled.loc[distilled.miou.idxmax()]
            columns.append(Column(f"best KD: {best.method}\n({label}, mIoU {100 * best.miou:.1f})", runs_dir / best.run))
        break
    if not columns:
        raise ConfigError(f"no checkpoint to show under {runs_dir}; train the teacher and some students first")
    return columns


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The trained model of a run folder, in eval mode (backbone weights come from the checkpoint, not ImageNet)."""
    state = load_checkpoint(Path(run_dir) / "checkpoint.pt", map_location=device)
    model_cfg = dict(state["model_cfg"])
    model_cfg["pretrained"] = None
    model = build_segmentor(model_cfg, int(state["num_classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def dataset_config(run_dir: Path, dataset_root: str | None = None) -> DictConfig:
    """The dataset config a run trained with (its ``config.yaml``), optionally pointed at another root folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; qualitative figures need a run trained by `kdrepro train`")
    cfg = OmegaConf.load(path).dataset
    if dataset_root:
        cfg.root = str(dataset_root)
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


def qualitative_rows(
    runs: pd.DataFrame,
    runs_dir: str | Path,
    num_images: int = 3,
    dataset_root: str | None = None,
    device: str = "auto",
    threads: int | None = 1,
) -> tuple[list[str], list[list[np.ndarray]], DictConfig, set[int]]:
    """Titles, one row of RGB panels per image (image, ground truth, each model), the dataset config and the class
    ids that appear in the panels.

    ``device`` "auto" = CUDA when available. ``threads`` (CPU): one by default, because a few small forward passes
    gain nothing from more, and on a busy shared CPU OpenMP's spinning threads made them ~250x slower (measured).
    """
    if threads:
        torch.set_num_threads(int(threads))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    columns = pick_columns(runs, runs_dir)
    cfg = dataset_config(columns[-1].run_dir, dataset_root)
    dataset = build_dataset(cfg, "val", train_transforms=False)
    colours = palette(cfg)
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).astype(int))
    models = [load_model(column.run_dir, device) for column in columns]
    rows, present = [], set()
    for index in indices:
        image, _ = dataset[int(index)]
        raw_image, label = dataset.load(int(index))
        predictions = [predict(model, image, label.shape) for model in models]
        for labels in [label, *predictions]:
            present |= {int(v) for v in np.unique(labels) if v < len(colours)}
        rows.append([raw_image, *[colorize(labels, colours, int(cfg.ignore_index)) for labels in [label, *predictions]]])
    titles = ["image", "ground truth", *[column.title for column in columns]]
    return titles, rows, cfg, present


def plot_qualitative(titles: list[str], rows: list[list[np.ndarray]], cfg: DictConfig, present: set[int], profile: str = "") -> Figure:
    """The grid of panels with a legend of the classes that appear in it."""
    height, width = rows[0][0].shape[:2]
    panel = 2.6
    fig, axes = plt.subplots(len(rows), len(titles), figsize=(panel * len(titles), panel * height / width * len(rows) + 1.6), squeeze=False)
    for row_axes, panels in zip(axes, rows, strict=True):
        for ax, picture in zip(row_axes, panels, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=10)
    names, colours = class_names(cfg), palette(cfg)
    handles = [Patch(color=np.asarray(colours[i]) / 255, label=names[i]) for i in sorted(present)]
    handles.append(Patch(color=np.asarray(IGNORE_COLOUR) / 255, label="ignored (255)"))
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 7), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.09 + 0.02 * (len(handles) // 7), 1, 0.97))
    return figure_note(fig, profile)
