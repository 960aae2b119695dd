"""Published numbers of the paper and of the baselines, each with its source, for the report's side-by-side tables.

Every number here was read from the cited page; none was produced by kdrepro. mIoU values are in percent
(single-scale validation mIoU). The baselines table is the BPKD README's PSPNet-R101 → PSPNet-R18 comparison
(mmsegmentation protocol: Cityscapes 512×1024 crops, 80k iterations; ADE20K 512×512 crops, 80k iterations for the
students, the ADE20K teacher being mmsegmentation's 160k checkpoint). The paper (arXiv 2604.25530) states two numbers
in its abstract: a canonically distilled student reaches 79.0 mIoU against the teacher's 79.8 on Cityscapes, and
92 % of the teacher on ADE20K.

``method`` is the kdrepro method config the published row corresponds to (``none`` = student alone, ``teacher`` =
the teacher), so a report can put this run's number beside it; the ``*_published`` configs reproduce the same rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from kdrepro.analysis.methods import base_method

DATASETS = ("cityscapes", "ade20k")


@dataclass(frozen=True)
class Source:
    """Where a published number was read."""

    key: str
    title: str
    url: str


@dataclass(frozen=True)
class PublishedResult:
    """One published number: an mIoU (percent) or, where a source only gives a ratio, a percent of the teacher."""

    dataset: str  # "cityscapes" | "ade20k"
    method: str  # the kdrepro method config it corresponds to ("teacher", "none", "kd", "cwd", ...)
    label: str  # the name the source gives the row
    source: str  # a key of SOURCES
    miou: float | None = None
    percent_of_teacher: float | None = None
    schedule: str = ""
    note: str = ""


SOURCES: dict[str, Source] = {
    "paper": Source(
        "paper",
        "The Surprising Effectiveness of Canonical Knowledge Distillation for Semantic Segmentation, abstract",
        "https://arxiv.org/abs/2604.25530",
    ),
    "bpkd": Source(
        "bpkd",
        "BPKD README, 'Results and models' (PSPNet-R101 teacher -> PSPNet-R18 student)",
        "https://github.com/AkideLiu/BPKD#results-and-models",
    ),
    "mmseg": Source(
        "mmseg",
        "mmsegmentation configs/pspnet/README.md, Cityscapes table (PSPNet R-101-D8, 512x1024, 80000 iterations)",
        "https://github.com/open-mmlab/mmsegmentation/tree/main/configs/pspnet",
    ),
}

_BPKD_CITYSCAPES = "512x1024, 80k iterations"
_BPKD_ADE20K = "512x512, 80k iterations"

PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult("cityscapes", "teacher", "Teacher (paper)", "paper", miou=79.8, note="PSPNet-R101"),
    PublishedResult("cityscapes", "kd", "Canonical KD student (paper)", "paper", miou=79.0, note="best canonical student"),
    PublishedResult("ade20k", "kd", "Canonical KD student (paper)", "paper", percent_of_teacher=92.0, note="best canonical student"),
    PublishedResult("cityscapes", "teacher", "T: PSPNet-R101", "mmseg", miou=79.76, schedule="512x1024, 80k iterations"),
    PublishedResult("cityscapes", "teacher", "T: PSPNet-R101", "bpkd", miou=79.74, schedule=_BPKD_CITYSCAPES),
    PublishedResult("ade20k", "teacher", "T: PSPNet-R101", "bpkd", miou=44.39, schedule="512x512, 160k iterations"),
    PublishedResult("cityscapes", "none", "S: PSPNet-R18", "bpkd", miou=74.23, schedule=_BPKD_CITYSCAPES, note="mmseg R-18b-D8"),
    PublishedResult("ade20k", "none", "S: PSPNet-R18", "bpkd", miou=33.30, schedule=_BPKD_ADE20K),
    PublishedResult("cityscapes", "skd", "SKD", "bpkd", miou=76.13, schedule=_BPKD_CITYSCAPES, note="'SKDS' in the source"),
    PublishedResult("ade20k", "skd", "SKD", "bpkd", miou=34.49, schedule=_BPKD_ADE20K, note="'SKDS' in the source"),
    PublishedResult("cityscapes", "ifvd", "IFVD", "bpkd", miou=76.24, schedule=_BPKD_CITYSCAPES),
    PublishedResult("ade20k", "ifvd", "IFVD", "bpkd", miou=34.54, schedule=_BPKD_ADE20K),
    PublishedResult("cityscapes", "cirkd", "CIRKD", "bpkd", miou=76.03, schedule=_BPKD_CITYSCAPES),
    PublishedResult("ade20k", "cirkd", "CIRKD", "bpkd", miou=35.07, schedule=_BPKD_ADE20K),
    PublishedResult("cityscapes", "cwd", "CWD", "bpkd", miou=76.26, schedule=_BPKD_CITYSCAPES),
    PublishedResult("ade20k", "cwd", "CWD", "bpkd", miou=37.02, schedule=_BPKD_ADE20K),
    PublishedResult("cityscapes", "bpkd", "BPKD", "bpkd", miou=77.57, schedule=_BPKD_CITYSCAPES),
    PublishedResult("ade20k", "bpkd", "BPKD", "bpkd", miou=38.51, schedule=_BPKD_ADE20K),
)


def published_results(dataset: str | None = None) -> pd.DataFrame:
    """The published numbers as a table (one row per number), optionally of one dataset, with each source's URL."""
    frame = pd.DataFrame([asdict(result) for result in PUBLISHED])
    if dataset is not None:
        frame = frame[frame.dataset == dataset]
    frame["source_url"] = frame.source.map(lambda key: SOURCES[key].url)
    return frame.reset_index(drop=True)


def published_entry(method: str, dataset: str = "cityscapes") -> dict[str, object] | None:
    """The published mIoU of the row a config reproduces on ``dataset`` (the mmsegmentation-protocol BPKD table
    first, then the paper), with its source and schedule; None when no source publishes one."""
    base = base_method(method)
    candidates = [r for r in PUBLISHED if r.dataset == dataset and r.method == base and r.miou is not None]
    if not candidates:
        return None
    order = {"bpkd": 0, "mmseg": 1, "paper": 2}
    best = min(candidates, key=lambda r: order.get(r.source, 3))
    schedule = best.schedule or ("extended training" if best.source == "paper" and base != "teacher" else "not stated")
    return {"miou": best.miou, "source": best.source, "label": best.label, "schedule": schedule,
            "url": SOURCES[best.source].url}
