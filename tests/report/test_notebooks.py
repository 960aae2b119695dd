"""Every report notebook executes from its own folder (``notebooks/``) with its default parameters, as a reader's
``jupyter lab`` runs it, against a finished pipeline's tables; the rendered pages show the verdict, Table 1 and the
numbers behind them, stand alone offline and link to each other. Plus fast checks of the notebooks and DVC stages."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import report_fixtures as fixtures
import yaml

from kdrepro.report.pages import PAGES

ROOT = Path(__file__).resolve().parents[2]
FIGURE = 'src="data:image/png;base64,'


def test_every_notebook_has_one_parameters_cell_with_profile_and_method_selection():
    names = sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))
    assert names == sorted(PAGES)
    for name in names:
        notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for parameter in ("profile = None", 'runs_dir = "runs/{profile}"', 'results_dir = "results/{profile}"', "methods = None"):
            assert parameter in tagged[0].source, (name, parameter)
        assert notebook.cells[0].cell_type == "markdown" and "What this shows" in notebook.cells[0].source
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), f"{name}: clear outputs"


def test_notebooks_stay_thin():
    """Logic lives in kdrepro.report: no notebook defines functions or loops over data itself."""
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert not re.search(r"^\s*(def|class|for|while) ", code, re.MULTILINE), path.name
        assert len(code.splitlines()) < 60, path.name


def test_dvc_report_stages_render_every_page_with_the_report_package():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    report = stages["report"]["do"]
    assert sorted(stages["report"]["foreach"]) == sorted(PAGES)
    assert "papermill" in report["cmd"] and "python -m kdrepro.report.pages reports/${item}.ipynb" in report["cmd"]
    package = sorted(f"kdrepro/report/{p.name}" for p in (ROOT / "kdrepro" / "report").glob("*.py") if p.name != "index.py")
    for dep in ("notebooks/${item}.ipynb", "./kdrepro/report/templates", "results/${profile}/stats.csv",
                "results/${profile}/verdict.json", "results/${profile}/per_class.csv", *package):
        assert dep in report["deps"], dep
    assert {"reports/${item}.html", "reports/${item}.ipynb"} <= set(report["outs"])
    index = stages["index"]
    assert all(f"reports/{name}.html" in index["deps"] for name in PAGES)
    assert {"kdrepro/report/index.py", "./kdrepro/report/templates", "results/${profile}/verdict.json"} <= set(index["deps"])
    assert index["outs"] == ["reports/index.html"]


def page(rendered: Path, name: str) -> str:
    return (rendered / "reports" / f"{name}.html").read_text()


@pytest.mark.slow
def test_every_page_is_rendered_offline_with_navigation_and_alt_text(rendered):
    for name in [*PAGES, "index"]:
        html = page(rendered, name)
        assert "Traceback" not in html and "SYNTHETIC PROFILE (smoke)" in html, name
        assert not re.search(r'<script[^>]+src="https?:', html) and "require.min.js" not in html and "mathjax" not in html.lower(), name
        assert 'class="kdrepro-nav"' in html and ('href="index.html"' in html) == (name != "index"), name
        assert all(f'href="{other}.html"' in html for other in PAGES if other != name), name
        assert re.search(r"<title>kdrepro — [^<]{8,}</title>", html), name
        if name != "index":
            assert f'href="{name}.ipynb"' in html and FIGURE in html, name
            assert "No description has been provided" not in html and 'alt="figure without a description"' not in html
            assert (rendered / "reports" / f"{name}.ipynb").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cost", "extended", "curves", "qualitative"])
def test_every_results_page_states_the_regime_under_its_banner(rendered, name):
    html = page(rendered, name)
    regime = html.index("Regime of this run.")
    assert html.index("SYNTHETIC PROFILE (smoke)") < regime < html.index(FIGURE)
    assert "Profile smoke, 2 seeds (0, 1), reference schedule 40 iterations" in html[regime:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["matched", "index"])
def test_verdict_and_table1_come_first(rendered, name):
    html = page(rendered, name)
    assert html.index('id="verdict"') < html.index('id="table1"')
    for claim in fixtures.verdict(None)["claims"]:
        assert claim["claim"] in html and claim["verdict"] in html
    assert "Profile smoke, 2 seeds (0, 1), reference schedule 40 iterations" in html
    stats = fixtures.stats_table(fixtures.runs_table())
    kd = stats[(stats.protocol == "compute_matched") & (stats.method == "kd")].iloc[0]
    assert f"{kd.miou_mean:.1f} ± {(kd.miou_ci_high - kd.miou_ci_low) / 2:.1f}" in html
    assert "≈ " in html and "kdrepro-noise" in html  # cwd vs the student alone is inside the noise
    for family in ("student alone", "canonical KD", "segmentation-specific KD"):
        assert family in html
    assert "74.2" in html and "bpkd" in html  # the published student with its source


@pytest.mark.slow
def test_matched_page_shows_per_class_heatmaps_and_both_protocols(rendered):
    html = page(rendered, "matched")
    assert html.count(FIGURE) == 2 and "Per-class IoU" in html and "iteration-matched above, compute-matched below" in html


@pytest.mark.slow
def test_cost_page_shows_spread_and_pareto(rendered):
    html = page(rendered, "cost")
    assert html.count(FIGURE) == 2 and "IQR" in html
    calibration = fixtures.calibration_table().set_index("method")
    assert f"{1000 * calibration.loc['dist', 'p25_seconds']:.1f}–{1000 * calibration.loc['dist', 'p75_seconds']:.1f}" in html


@pytest.mark.slow
def test_extended_page_has_the_control_and_one_basis(rendered):
    html = page(rendered, "extended")
    # one basis: what "% of teacher" is the mean of, and the published numbers (mIoU or a ratio) in their own columns
    assert "% of teacher = mean mIoU over seeds ÷ the teacher's mIoU (same validation set, this profile)" in html
    assert "Published: mIoU (%) or % of teacher on the real datasets as reported by the source" in html
    assert ">published ADE20K<" in html and ">this run (smoke): % of teacher<" in html
    assert html.count("Student alone") >= 3 and "control" in html  # 1×, 2×, 4×
    assert "chosen by the pipeline" in html
    assert re.search(r">\s*92 % of the teacher \[paper\]\s*<", html)  # the paper's ADE20K ratio, own column


@pytest.mark.slow
def test_curves_page_plots_cross_entropy_and_small_multiples(rendered):
    html = page(rendered, "curves")
    assert html.count(FIGURE) == 4 and "train/ce" in html and "Validation mIoU at 4 points per run" in html


@pytest.mark.slow
def test_qualitative_page_compares_five_models_on_six_images(rendered):
    html = page(rendered, "qualitative")
    match = re.search(r'alt="(\d+) validation images, each with ground truth, the predictions of ([^"]+)"', html)
    assert match and int(match.group(1)) >= 3  # the tiny dataset has 3 validation images; the default asks for 6
    for role in ("student alone", "logit KD", "best seg.-specific", "best extended", "teacher"):
        assert role in match.group(2), role


def test_notebook_from_its_own_folder_reads_the_profile_of_params_yaml(tmp_path):
    """The failure of issue 12: the default parameters resolve from notebooks/ to the repository root."""
    repository = fixtures.make_repository(tmp_path)
    html = fixtures.execute(repository, "extended").read_text()
    assert "SYNTHETIC PROFILE (smoke)" in html and "Traceback" not in html
    (repository / "params.yaml").write_text("profile: elsewhere\n")
    missing = (r"results/elsewhere/\w+\.\w+ does not exist \(repository root .+: the nearest folder at or above the working "
               r"directory holding dvc\.yaml, params\.yaml or results/; the parameters' relative paths start there\); "
               r"run `make repro`")
    with pytest.raises(Exception, match=missing):
        fixtures.execute(repository, "extended")
