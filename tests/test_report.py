"""Unit tests of the report helpers (kdrepro.report, kdrepro.report_index, kdrepro.report_qualitative.colorize,
kdrepro.published) on small hand-made tables: ranks, deltas, percent of teacher, the published side-by-side."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kdrepro import report, report_curves, report_extended  # noqa: E402
from kdrepro.cli import main  # noqa: E402
from kdrepro.errors import ConfigError  # noqa: E402
from kdrepro.published import PUBLISHED, SOURCES, base_method, published_results  # noqa: E402
from kdrepro.report_index import git_commit, miou_overview, write_index  # noqa: E402


def run_row(protocol, method, miou, iterations, seconds, multiplier=1.0):
    run = method if protocol == "teacher" else f"{protocol}/{method}" + (f"-{multiplier:g}" if protocol == "extended" else "")
    return {"run": run, "protocol": protocol, "method": method, "multiplier": multiplier, "miou": miou,
            "iterations": iterations, "train_seconds": seconds}


@pytest.fixture()
def runs() -> pd.DataFrame:
    """Teacher 0.80; iteration-matched cwd > kd > none; compute-matched kd > none > cwd (cwd is expensive)."""
    rows = [
        run_row("teacher", "teacher", 0.80, 100, 50.0),
        run_row("iter_matched", "none", 0.70, 100, 10.0),
        run_row("iter_matched", "kd", 0.72, 100, 14.0),
        run_row("iter_matched", "cwd", 0.74, 100, 20.0),
        run_row("compute_matched", "none", 0.73, 200, 20.0),
        run_row("compute_matched", "kd", 0.75, 142, 20.0),
        run_row("compute_matched", "cwd", 0.72, 100, 20.0),
        run_row("extended", "kd", 0.77, 284, 40.0, 2.0),
        run_row("extended", "kd", 0.78, 568, 80.0, 4.0),
    ]
    frame = pd.DataFrame(rows)
    frame["percent_of_teacher"] = 100 * frame.miou / 0.80
    frame["miou_percent"] = 100 * frame.miou
    return frame


def test_phases_match_the_training_loop():
    from kdrepro.train.timing import PHASES

    assert report.PHASES == PHASES


def test_rank_of_ranks_highest_first_and_shares_ties():
    assert report.rank_of(pd.Series([70.0, 75.0, 75.0, np.nan])).tolist()[:3] == [3.0, 1.0, 1.0]
    assert math.isnan(report.rank_of(pd.Series([70.0, np.nan]))[1])


def test_delta_to_reference_and_missing_reference():
    values, methods = pd.Series([70.0, 72.5, 74.0]), pd.Series(["none", "kd", "cwd"])
    assert report.delta_to(values, methods).tolist() == [-2.5, 0.0, 1.5]
    assert report.delta_to(values, pd.Series(["none", "fitnet", "cwd"])).isna().all()


def test_matched_table_ranks_deltas_and_rank_change(runs):
    table = report.matched_table(runs).set_index("method")
    assert list(table.index) == ["kd", "none", "cwd", "teacher"]  # sorted by compute-matched mIoU, teacher last
    assert table.loc["cwd", "rank_iter"] == 1 and table.loc["cwd", "rank_compute"] == 3
    assert table.loc["cwd", "rank_change"] == -2 and table.loc["none", "rank_change"] == 1 and table.loc["kd", "rank_change"] == 1
    assert table.loc["cwd", "delta_kd_iter"] == pytest.approx(2.0)
    assert table.loc["cwd", "delta_kd_compute"] == pytest.approx(-3.0)
    assert table.loc["none", "iterations_compute"] == 200 and table.loc["kd", "iterations_iter"] == 100
    assert table.loc["teacher", "miou_compute"] == pytest.approx(80.0) and math.isnan(table.loc["teacher", "rank_compute"])
    assert table.loc["teacher", "family"] == "teacher (100 it)"
    assert table.loc["kd", "family"] == "canonical KD" and table.loc["cwd", "family"] == "segmentation-specific KD"


def test_matched_display_groups_columns_by_protocol(runs):
    display = report.matched_display(report.matched_table(runs))
    assert ("compute-matched", "mIoU (%)") in display.columns and ("iteration-matched", "Δ kd (pp)") in display.columns
    assert display[("compute-matched", "iterations")].tolist()[:3] == [142, 200, 100]


def test_matched_summary_names_best_methods_and_kd_rank(runs):
    text = report.matched_summary(report.matched_table(runs))
    assert "best `cwd` (74.00 mIoU); logit KD `kd` ranks 2 of 3" in text
    assert "best `kd` (75.00 mIoU); logit KD `kd` ranks 1 of 3" in text
    assert "3 of 3 methods change rank" in text


def test_diverged_run_has_no_rank_and_is_named_in_table_and_summary(runs):
    runs = runs.copy()
    runs["diverged_at"] = np.nan
    diverged = (runs.protocol == "iter_matched") & (runs.method == "cwd")
    runs.loc[diverged, ["miou", "miou_percent", "percent_of_teacher", "diverged_at"]] = [np.nan, np.nan, np.nan, 30]
    table = report.matched_table(runs)
    cwd = table[table.method == "cwd"].iloc[0]
    assert pd.isna(cwd.rank_iter) and cwd.rank_compute == 3 and cwd.note == "diverged at step 30 (iteration-matched)"
    assert ("", "note") in report.matched_display(table).columns
    summary = report.matched_summary(table)
    assert "`cwd`: diverged at step 30 (iteration-matched)" in summary and "best `kd` (72.00 mIoU)" in summary
    report.styled(report.matched_display(table)).to_html()  # renders with the missing value


def test_budget_curve_puts_compute_matched_at_one(runs):
    curve = report_extended.budget_curve(runs)
    kd = curve[curve.method == "kd"]
    assert kd.multiplier.tolist() == [1.0, 2.0, 4.0]
    assert kd.miou_percent.tolist() == pytest.approx([75.0, 77.0, 78.0])
    assert kd.percent_of_teacher.tolist() == pytest.approx([93.75, 96.25, 97.5])
    assert kd.extended.all() and not curve[curve.method == "cwd"].extended.any()
    assert "teacher" not in set(curve.method)


def test_extension_choice_names_the_best_specific_method_and_flags_it_when_not_extended(runs):
    text = report_extended.extension_choice(runs)
    assert "**`cwd`** (72.00 mIoU)" in text and "Extended runs: `kd`." in text
    assert "`cwd` has no extended runs" in text and "extended.methods" in text
    with_cwd = pd.concat([runs, pd.DataFrame([run_row("extended", "cwd", 0.75, 200, 40.0, 2.0)])], ignore_index=True)
    text = report_extended.extension_choice(with_cwd)
    assert "Extended runs: `cwd`, `kd`." in text and "no extended runs" not in text
    assert "No segmentation-specific" in report_extended.extension_choice(runs[runs.method != "cwd"])


def test_published_numbers_and_sources():
    table = published_results()
    value = {(r.dataset, r.method, r.source): (r.miou, r.percent_of_teacher) for r in table.itertuples()}
    expected = {
        ("cityscapes", "bpkd"): 77.57, ("ade20k", "bpkd"): 38.51, ("cityscapes", "cwd"): 76.26, ("ade20k", "cwd"): 37.02,
        ("cityscapes", "cirkd"): 76.03, ("ade20k", "cirkd"): 35.07, ("cityscapes", "ifvd"): 76.24, ("ade20k", "ifvd"): 34.54,
        ("cityscapes", "skd"): 76.13, ("ade20k", "skd"): 34.49, ("cityscapes", "none"): 74.23, ("ade20k", "none"): 33.30,
        ("cityscapes", "teacher"): 79.74, ("ade20k", "teacher"): 44.39,
    }
    for (dataset, method), miou in expected.items():
        assert value[(dataset, method, "bpkd")][0] == miou
    assert value[("cityscapes", "teacher", "mmseg")][0] == 79.76
    assert value[("cityscapes", "kd", "paper")][0] == 79.0 and value[("cityscapes", "teacher", "paper")][0] == 79.8
    assert value[("ade20k", "kd", "paper")][1] == 92.0
    assert {result.source for result in PUBLISHED} <= set(SOURCES)
    assert all(url.startswith("https://") for url in table.source_url)
    assert len(published_results("ade20k")) == 8


def test_base_method_maps_config_variants():
    assert [base_method(n) for n in ("cwd_published", "cwd_mmrazor", "kd_t4", "kd", "kd_fitnet")] == ["cwd", "cwd", "kd", "kd", "kd_fitnet"]


def test_state_of_the_art_table_puts_this_run_beside_published(runs):
    runs = pd.concat([runs, pd.DataFrame([{**run_row("compute_matched", "cwd_published", 0.76, 90, 20.0), "miou_percent": 76.0,
                                           "percent_of_teacher": 95.0}])], ignore_index=True)
    table = report_extended.state_of_the_art_table(runs, "synthetic")
    config, compute = "this run (synthetic): method config", "this run (synthetic): compute-matched mIoU (%)"
    cwd = table[table["published row"] == "CWD"].set_index(config)
    assert set(cwd.index) == {"cwd", "cwd_published"}
    assert cwd.loc["cwd", "published Cityscapes mIoU (%)"] == "76.26" and cwd.loc["cwd", "published ADE20K mIoU (%)"] == "37.02"
    assert cwd.loc["cwd", compute] == "72.00" and cwd.loc["cwd_published", compute] == "76.00"
    paper_kd = table[table["published row"] == "Canonical KD student (paper)"].iloc[0]
    assert paper_kd["published Cityscapes mIoU (%)"] == "79.00" and paper_kd["published ADE20K mIoU (%)"] == "92 % of teacher"
    assert paper_kd["this run (synthetic): best extended mIoU (%)"] == "78.00 (4×)"
    assert paper_kd["this run (synthetic): % of teacher"] == "97.5"
    assert table[table["published row"] == "BPKD"].iloc[0][config] == "not run"
    assert table.iloc[0][config] == "teacher"  # teacher rows first


def test_cost_table_units_and_memory_note():
    calibration = pd.DataFrame(
        {"method": ["none", "kd"], "terms": ["CE only", "kd λ=1"], "seconds_per_iteration": [0.02, 0.03],
         "relative_spread": [0.1, 0.05], "relative_to_none": [1.0, 1.5], "relative_to_kd": [2 / 3, 1.0],
         "flops_per_iteration": [8e9, 1.6e10], "peak_memory_bytes": [None, None], "pretrain_seconds": [0.0, 0.0],
         "matched_iterations": [150, 100], "flop_matched_iterations": [200, 100]}
    )
    table = report.cost_table(calibration).set_index("method")
    assert table.loc["kd", "ms / iteration"] == pytest.approx(30.0) and table.loc["kd", "GFLOPs / iteration"] == pytest.approx(16.0)
    assert table.loc["kd", "× none"] == 1.5 and table["peak memory (MiB)"].isna().all()
    assert "not measured" in report.memory_note(calibration)
    calibration["peak_memory_bytes"] = [2 * 2**20, 3 * 2**20]
    assert report.cost_table(calibration).set_index("method").loc["kd", "peak memory (MiB)"] == 3.0
    assert "max_memory_allocated" in report.memory_note(calibration)


def test_describe_terms():
    assert report.describe_terms({}) == "CE only"
    assert report.describe_terms({"kd": {"weight": 1.0}, "cwd": {"weight": 3, "temperature": 4}}) == "kd λ=1 + cwd λ=3"


def test_curves_over_time_joins_seconds_by_step_and_appends_final_miou(runs):
    curves = pd.DataFrame(
        [("compute_matched/kd", s, "train/seconds", 0.1 * s) for s in (1, 2, 3, 4)]
        + [("compute_matched/kd", s, "train/total", 3.0 - 0.5 * s) for s in (1, 2, 3, 4)]
        + [("compute_matched/kd", 2, "val/miou", 0.5)],
        columns=["run", "step", "metric", "value"],
    )
    frame = report_curves.curves_over_time(curves, runs[runs.run.isin(["compute_matched/kd", "teacher"])])
    miou = frame[frame.metric == "val/miou"]
    assert miou.step.tolist() == [2, 142] and miou.value.tolist() == pytest.approx([50.0, 75.0])
    assert miou.seconds.tolist() == pytest.approx([0.2, 20.0])
    loss = frame[frame.metric == "train/total"]
    assert loss.seconds.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4]) and set(loss.method) == {"kd"}
    assert "evaluated only at the end" not in report_curves.curves_note(frame)
    assert "evaluated only at the end" in report_curves.curves_note(frame[frame.step != 2])


def test_spread_labels_keeps_order_and_gap():
    values = np.array([47.74, 47.69, 46.93, 40.0])
    placed = report_extended.spread_labels(values, 0.5)
    assert np.all(np.diff(placed[np.argsort(values)]) >= 0.5 - 1e-9)
    assert list(np.argsort(placed)) == list(np.argsort(values)) and placed[3] == 40.0
    assert report_extended.spread_labels(np.array([1.0, 5.0]), 1.0).tolist() == [1.0, 5.0]


def test_styled_formats_integers_floats_links_and_highlights_kd():
    frame = pd.DataFrame({"method": ["kd", "none"], "iterations": [100, 200], "mIoU (%)": [75.123, 73.0],
                          "where": ["https://example.org/a", "https://example.org/b"]})
    html = report.styled(frame).to_html()
    assert "75.12" in html and "73.00" in html and ">200<" in html
    assert '<a href="https://example.org/a">' in html
    shaded = " ".join(rule.split("{")[0] for rule in html.split("}") if "#fff3cd" in rule)  # selectors of shaded cells
    assert all(f"_row0_col{i}" in shaded for i in range(4)) and "_row1_" not in shaded


def test_figures_render_with_units(runs):
    table = report.matched_table(runs)
    fig = report.plot_rank_slope(table, "synthetic")
    assert fig.axes[0].get_ylabel() == "rank (1 = best mIoU)" and len(fig.axes[0].lines) == 3
    assert any("synthetic profile" in text.get_text() for text in fig.texts)
    fig = report_extended.plot_budget_curve(report_extended.budget_curve(runs), runs)
    assert fig.axes[0].get_ylabel() == "mIoU (%)" and "budget" in fig.axes[0].get_xlabel()
    plt.close("all")


def test_read_runs_explains_missing_results(tmp_path):
    with pytest.raises(ConfigError, match="kdrepro results"):
        report.read_runs(tmp_path / "results")
    with pytest.raises(ConfigError, match="kdrepro calibrate"):
        report.read_calibration(tmp_path)


def test_colorize_uses_palette_and_blacks_out_ignore():
    from kdrepro.report_qualitative import colorize

    rgb = colorize(np.array([[0, 1], [255, 7]]), [(128, 64, 128), (244, 35, 232)])
    assert rgb.dtype == np.uint8 and rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [244, 35, 232]
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [0, 0, 0]


def test_git_commit_reads_loose_and_packed_refs(tmp_path):
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n" + "a" * 40 + " refs/heads/main\n")
    assert git_commit(tmp_path / "repo" / "reports") == "a" * 40
    (git / "refs" / "heads" / "main").write_text("b" * 40 + "\n")
    assert git_commit(tmp_path / "repo") == "b" * 40


def test_write_index_states_provenance_and_links(tmp_path, runs):
    runs_dir, results_dir, reports_dir = tmp_path / "runs", tmp_path / "results", tmp_path / "reports"
    runs_dir.mkdir()
    results_dir.mkdir()
    reports_dir.mkdir()
    runs.drop(columns=["miou_percent"]).to_csv(results_dir / "runs.csv", index=False)
    (runs_dir / "calibration.json").write_text(json.dumps({
        "created": "2026-01-01T00:00:00+00:00", "dataset": "synthetic", "student": "pspnet_r18", "teacher": "pspnet_r101",
        "batch_size": 4, "crop_size": [64, 128], "precision": "fp32",
        "hardware": {"device": "cuda", "gpu": "NVIDIA H100", "torch": "2.14.1", "threads": 2},
        "methods": {"none": {}, "kd": {}, "cwd": {}},
        "matched": {"reference_method": "cwd", "reference_iterations": 100, "budget_seconds": 20.0, "iterations": {}},
    }))
    (reports_dir / "cost.html").write_text("<html></html>")
    page = write_index(reports_dir, runs_dir, results_dir, "synthetic").read_text()
    assert "SYNTHETIC PROFILE" in page and "NVIDIA H100" in page
    assert "20.0 s = 100 iterations of cwd (reference method)" in page
    assert report.seconds_label(0.10234) == "0.102 s" and report.seconds_label(1234.5) == "1,234 s"
    assert '<a href="cost.html">cost</a>' in page and "matched <i>(not rendered yet)</i>" in page
    assert "75.00" in page and "80.00" in page  # compute-matched kd, teacher
    overview = miou_overview(results_dir)
    assert list(overview.index[:2]) == ["teacher", "none"] and overview.loc["kd", "extended ×4"] == 78.0


def test_report_index_command(tmp_path, capsys):
    assert main(["report-index", f"runs_dir={tmp_path}", f"results_dir={tmp_path}", f"+reports_dir={tmp_path / 'out'}"]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "calibration</th><td>not found" in page and "No results table yet" in page
