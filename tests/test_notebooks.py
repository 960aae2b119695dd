"""Every report notebook executes under papermill against a tiny real pipeline (teacher, calibration of none/kd/cwd,
iteration- and compute-matched runs, kd at 2x the matched budget, `kdrepro results`) and its HTML shows the key
numbers; plus fast checks of the notebooks' parameters cells and of the DVC report stages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from kdrepro import report
from kdrepro.config import load_config
from kdrepro.pipeline import write_results
from kdrepro.report_index import NOTEBOOKS, write_index

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "kd", "cwd")
FIGURE = 'src="data:image/png;base64,'  # an inline matplotlib PNG (the template has other data: URIs)


def test_every_notebook_has_a_parameters_cell_with_the_pipeline_folders():
    names = sorted(path.stem for path in (ROOT / "notebooks").glob("*.ipynb"))
    assert names == sorted(NOTEBOOKS)
    for name in names:
        notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for parameter in ("runs_dir", "results_dir", "profile"):
            assert f"{parameter} = " in tagged[0].source, (name, parameter)
        assert notebook.cells[0].cell_type == "markdown" and "What this shows" in notebook.cells[0].source
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), f"{name}: clear outputs"


def test_dvc_report_stages_render_every_notebook_and_the_index():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(stages["report"]["foreach"]) == sorted(NOTEBOOKS)
    report = stages["report"]["do"]
    assert "papermill" in report["cmd"] and "nbconvert --to html --no-input" in report["cmd"]
    assert "notebooks/${item}.ipynb" in report["deps"] and "reports/${item}.html" in report["outs"]
    index_deps = stages["index"]["deps"]
    assert all(f"reports/{name}.html" in index_deps for name in NOTEBOOKS)
    assert stages["index"]["outs"] == ["reports/index.html"]


@pytest.fixture(scope="module")
def pipeline(tiny_teacher, tmp_path_factory) -> dict[str, Path]:
    """runs/ and results/ of a tiny pipeline: teacher, calibration, 3 methods x 2 protocols, kd x2 extended."""
    import torch

    threads = torch.get_num_threads()  # runs use one thread (OpenMP spinning made tiny models ~100x slower on a busy CPU)
    try:
        return build_pipeline(tiny_teacher, tmp_path_factory.mktemp("pipeline"))
    finally:
        torch.set_num_threads(threads)


def build_pipeline(tiny_teacher: list[str], base: Path) -> dict[str, Path]:
    from kdrepro.train.calibrate import calibrate
    from kdrepro.train.run import train

    runs = base / "runs"
    teacher_checkpoint = Path(next(o for o in tiny_teacher if o.startswith("teacher_checkpoint=")).split("=", 1)[1])
    shutil.copytree(teacher_checkpoint.parent, runs / "teacher")
    overrides = [*tiny_teacher, "eval_every=2", "threads=1"]
    calibration = [
        *overrides, f"calibrate.methods=[{','.join(METHODS)}]", "calibrate.warmup=1", "calibrate.rounds=2",
        "calibrate.iterations_per_round=1", f"calibrate.output={runs / 'calibration.json'}",
    ]
    calibrate(load_config(calibration), lambda name: load_config([*calibration, f"method={name}"]))
    matched = ["budget=calibrated", f"budget.calibration={runs / 'calibration.json'}"]
    for method in METHODS:
        train(load_config([*overrides, f"method={method}", f"out_dir={runs / 'iter_matched' / method}"]))
        train(load_config([*overrides, f"method={method}", *matched, f"out_dir={runs / 'compute_matched' / method}"]))
    train(load_config([*overrides, "method=kd", *matched, "budget.multiplier=2", f"out_dir={runs / 'extended' / 'kd-2'}"]))
    write_results([*overrides, f"runs_dir={runs}", f"results_dir={base / 'results'}"])
    return {"runs": runs, "results": base / "results", "reports": base / "reports"}


def render(name: str, pipeline: dict[str, Path]) -> str:
    """papermill + nbconvert (--no-input), as the DVC report stage does; returns the HTML."""
    import papermill
    from nbconvert import HTMLExporter

    pipeline["reports"].mkdir(exist_ok=True)
    executed = pipeline["reports"] / f"{name}.ipynb"
    parameters = {"runs_dir": str(pipeline["runs"]), "results_dir": str(pipeline["results"]), "profile": "synthetic"}
    papermill.execute_notebook(
        str(ROOT / "notebooks" / f"{name}.ipynb"), str(executed), parameters=parameters, kernel_name="python3",
        progress_bar=False, cwd=str(ROOT),
    )
    notebook = nbformat.read(executed, as_version=4)
    assert "injected-parameters" in notebook.cells[2].metadata.get("tags", [])
    html, _ = HTMLExporter(exclude_input=True).from_notebook_node(notebook)
    (pipeline["reports"] / f"{name}.html").write_text(html)
    assert "SYNTHETIC PROFILE" in html and "Traceback" not in html
    assert FIGURE in html  # at least one inline figure
    return html


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def runs_table(pipeline) -> pd.DataFrame:
    return pd.read_csv(pipeline["results"] / "runs.csv").set_index("run")


@pytest.mark.slow
def test_cost_notebook(pipeline):
    html = render("cost", pipeline)
    calibration = json.loads((pipeline["runs"] / "calibration.json").read_text())
    for method in METHODS:
        assert f"{1000 * calibration['methods'][method]['seconds_per_iteration']:.2f}" in html
    assert f"{calibration['methods']['kd']['flops_per_iteration'] / 1e9:.2f}" in html
    assert "Peak memory: not measured" in html and "ms / iteration" in html
    assert report.seconds_label(calibration["matched"]["budget_seconds"]) in html


@pytest.mark.slow
def test_matched_notebook(pipeline):
    html = render("matched", pipeline)
    runs = runs_table(pipeline)
    for method in METHODS:
        assert percent(runs.loc[f"iter_matched/{method}", "miou"]) in html
        assert percent(runs.loc[f"compute_matched/{method}", "miou"]) in html
    assert percent(runs.loc["teacher", "miou"]) in html
    assert "iteration-matched" in html and "compute-matched" in html and "rank change" in html


@pytest.mark.slow
def test_extended_notebook(pipeline):
    html = render("extended", pipeline)
    runs = runs_table(pipeline)
    assert percent(runs.loc["extended/kd-2", "miou"]) + " (2×)" in html
    for published in ("77.57", "38.51", "76.26", "37.02", "79.76", "79.00", "92 % of teacher"):
        assert published in html
    assert "this run (synthetic)" in html and "https://github.com/AkideLiu/BPKD" in html


@pytest.mark.slow
def test_curves_notebook(pipeline):
    html = render("curves", pipeline)
    assert "mIoU points: every" in html  # eval_every=2 gives intermediate points
    assert html.count(FIGURE) >= 2


@pytest.mark.slow
def test_qualitative_notebook(pipeline):
    html = render("qualitative", pipeline)
    assert html.count(FIGURE) == 1


@pytest.mark.slow
def test_index_links_rendered_reports(pipeline):
    page = write_index(pipeline["reports"], pipeline["runs"], pipeline["results"], "synthetic").read_text()
    calibration = json.loads((pipeline["runs"] / "calibration.json").read_text())
    assert report.seconds_label(calibration["matched"]["budget_seconds"]) in page
    assert percent(runs_table(pipeline).loc["compute_matched/kd", "miou"]) in page
