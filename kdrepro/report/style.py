"""One look for every report page: colour-blind-safe colours, a marker and line style per method family (so canonical
and segmentation-specific KD differ without colour), legible fonts at 1024 px, 2× PNG figures with alt text, tables
at one decimal, and the profile banner.

Families (the ``family:`` key of each method config): ``student`` (the student alone), ``canonical`` (logit KD,
feature KD), ``segmentation_specific`` and ``teacher``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from kdrepro.analysis.methods import STUDENT_ALONE, method_names

FAMILIES = ("student", "canonical", "segmentation_specific", "teacher")
FAMILY_LABELS = {
    "student": "student alone",
    "canonical": "canonical KD",
    "segmentation_specific": "segmentation-specific KD",
    "teacher": "teacher",
}
FAMILY_MARKERS = {"student": "s", "canonical": "o", "segmentation_specific": "^", "teacher": "*"}
FAMILY_LINES = {"student": ":", "canonical": "-", "segmentation_specific": "--", "teacher": "-."}
PROTOCOL_LABELS = {
    "teacher": "teacher",
    "iter_matched": "iteration-matched",
    "compute_matched": "compute-matched",
    "extended": "extended",
}
#: Okabe & Ito (2008), the colour-blind-safe qualitative palette (black kept for the student alone).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7")  # yellow left out: unreadable on white
#: Paul Tol's "muted" scheme, also colour-blind safe, for methods beyond the first seven.
TOL_MUTED = ("#332288", "#44AA99", "#117733", "#999933", "#CC6677", "#882255", "#AA4499", "#88CCEE")  # pale sand left out
STUDENT_COLOUR = "#000000"
TEACHER_COLOUR = "#555555"
SIGNIFICANT_NOTE = "≈ marks a difference whose 95 % interval includes 0 (inside the seed noise)"
FIGURE_WIDTH = 9.6  # inches at 100 dpi: fits the page body at 1024 px without scaling the text down


def set_style() -> None:
    """Seaborn whitegrid with fonts that stay legible when a 9.6-inch figure fills a 1024 px window."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=1.05)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 200, "axes.titleweight": "bold", "axes.titlesize": 12,
                         "legend.fontsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10})


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A colour per method that is the same on every page: the student alone black, the teacher grey, every other
    method the palette entry of its position among all method configs (``kdrepro/conf/method``)."""
    methods = list(dict.fromkeys(methods))
    palette = OKABE_ITO + TOL_MUTED
    universe = sorted(set(method_names()) | {m for m in methods if m not in (STUDENT_ALONE, "teacher")})
    colours = {method: palette[index % len(palette)] for index, method in enumerate(universe)}
    colours[STUDENT_ALONE] = STUDENT_COLOUR
    colours["teacher"] = TEACHER_COLOUR
    return {method: colours[method] for method in methods}


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def profile_banner(profile: str) -> str:
    """HTML shown at the top of every report: a loud warning for synthetic profiles, a plain line otherwise."""
    if profile.startswith("synthetic") or profile == "smoke":
        return (
            '<div class="kdrepro-banner" style="border:3px solid #c0392b;background:#fdecea;padding:10px 14px;'
            f'margin:6px 0;font-size:15px"><b>SYNTHETIC PROFILE ({profile}) — not the paper\'s results.</b> Every '
            "number below comes from procedurally generated street scenes and reduced-width models trained on this "
            "machine. They exercise the paper's protocol end to end; they are not comparable with published "
            "Cityscapes / ADE20K mIoU.</div>"
        )
    return (
        f'<div class="kdrepro-banner" style="border:1px solid #888;padding:6px 12px;margin:6px 0">Profile <b>{profile}'
        "</b>: numbers measured by this pipeline run; published numbers are labelled with their source.</div>"
    )


def figure_note(fig: Figure, profile: str) -> Figure:
    """Stamp the synthetic profile on a figure so a copied picture is never mistaken for the paper's."""
    if profile.startswith("synthetic") or profile == "smoke":
        fig.text(0.995, 0.998, f"{profile} profile — not paper results", ha="right", va="top", color="#c0392b", fontsize=9)
    return fig


def figure_png(fig: Figure) -> bytes:
    """The figure as a 2× PNG (200 dpi for a 100-dpi layout): sharp on high-density screens and when zoomed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=200, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def show(fig: Figure, alt: str) -> None:
    """Display ``fig`` in the notebook as a 2× PNG shown at its layout size, with ``alt`` as its alt text, and
    close it (the HTML template writes the alt text; an image without one is a bug the browser test catches)."""
    from IPython.display import Image, display

    if not alt.strip():
        raise ValueError("every figure needs alt text")
    display(Image(data=figure_png(fig), format="png", retina=True, alt=alt))
    plt.close(fig)


def interval(mean: float, low: float, high: float, signed: bool = False) -> str:
    """``"71.2 ± 0.8"`` for a symmetric interval, ``"+1.2 [−0.3, +2.7]"`` for a signed difference; "—" if missing."""
    if pd.isna(mean):
        return "—"
    if not signed:
        if pd.isna(low) or pd.isna(high):
            return f"{mean:.1f}"
        return f"{mean:.1f} ± {(high - low) / 2:.1f}"
    body = f"{_signed(mean)}"
    if pd.isna(low) or pd.isna(high):
        return body
    return f"{body} [{_signed(low)}, {_signed(high)}]"


def _signed(value: float) -> str:
    text = f"{value:+.1f}"
    return text.replace("-", "−")


def styled(frame: pd.DataFrame, table_id: str | None = None, caption: str | None = None, decimals: int = 1,
           wrap: Sequence[str] = ()):
    """A pandas Styler for the HTML pages: no index, floats at ``decimals``, integers without decimals, "—" for
    missing values, text left-aligned; ``table_id`` names the table (its HTML id is ``T_<table_id>``). Cells stay on
    one line, except in the ``wrap`` columns (long free text, such as a list of schedules), which wrap at a readable
    width instead of pushing the table past the page's edge."""
    formats = {}
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
            continue
        whole = bool(len(values.dropna())) and values.dropna().apply(lambda v: float(v).is_integer()).all()
        formats[column] = "{:,.0f}" if whole else f"{{:.{decimals}f}}"
    styler = frame.style.hide(axis="index").format(formats, na_rep="—")
    text = [c for c in frame.columns if c not in formats]
    styler = styler.set_properties(subset=text, **{"text-align": "left"})
    if table_id:
        styler = styler.set_uuid(table_id).set_table_attributes('class="kdrepro-table"')
    if caption:
        styler = styler.set_caption(caption)
    styler = styler.set_table_styles(
        [
            {"selector": "th", "props": "text-align: center; font-size: 92%; padding: 3px 6px"},
            {"selector": "td", "props": "font-size: 92%; padding: 3px 6px; white-space: nowrap"},
            {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold; padding: 4px 0"},
        ]
    )
    if wrap:  # "#T_x td.colN" outranks the "#T_x td" rule above; a per-cell "#T_x_rowM_colN" rule would not
        rule = [{"selector": "td", "props": "white-space: normal; min-width: 12em"}]
        styler = styler.set_table_styles({column: rule for column in wrap}, overwrite=False)
    return styler
