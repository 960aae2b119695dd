"""Unit tests of kdrepro.report on constructed tables: Table 1 and its noise marks, the verdict block, path
resolution from notebooks/, label placement, Pareto front, extended control, curves, per-class IoU, error maps,
pages and the index (template, dulwich commit)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import report_fixtures as fixtures  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from kdrepro.analysis.methods import base_method  # noqa: E402
from kdrepro.cli import main  # noqa: E402
from kdrepro.errors import ConfigError  # noqa: E402
from kdrepro.report import cost, curves, extended, index, matched, pages, readers, style  # noqa: E402
from kdrepro.report.published import PUBLISHED, SOURCES, published_entry, published_results  # noqa: E402
from kdrepro.report.qualitative import colorize, error_map, image_miou  # noqa: E402


@pytest.fixture()
def stats() -> pd.DataFrame:
    return fixtures.stats_table(fixtures.runs_table())


@pytest.fixture()
def meta(stats) -> pd.DataFrame:
    return readers.method_metadata(sorted(set(stats.method)), stats)


def test_phases_match_the_training_loop():
    from kdrepro.train.timing import PHASES

    assert cost.PHASES == PHASES


def test_interval_formats_means_and_signed_differences():
    assert style.interval(71.23, 70.0, 72.4) == "71.2 ± 1.2"
    assert style.interval(1.25, -0.3, 2.8, signed=True) == "+1.2 [−0.3, +2.8]"
    assert style.interval(np.nan, 0, 1) == "—" and style.interval(3.0, np.nan, np.nan) == "3.0"


def test_method_colours_are_the_same_on_every_page():
    one, two = style.method_colours(["none", "kd", "cwd"]), style.method_colours(["cwd", "dist", "kd", "teacher"])
    assert one["kd"] == two["kd"] and one["cwd"] == two["cwd"] and one["none"] == "#000000"
    assert len(set(style.method_colours(["kd", "fitnet", "cwd", "dist", "skd", "at"]).values())) == 6


def test_locate_resolves_defaults_from_the_notebooks_folder(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("profile: smoke\n")
    inputs = readers.locate(start=tmp_path / "notebooks")
    assert inputs.profile == "smoke" and inputs.root == tmp_path.resolve()
    assert inputs.results_dir == tmp_path.resolve() / "results" / "smoke" and inputs.runs_dir.name == "smoke"
    other = readers.locate("cityscapes", "/abs/runs", None, start=tmp_path / "notebooks")
    assert str(other.runs_dir) == "/abs/runs" and other.results_dir.name == "cityscapes"
    (tmp_path / "params.yaml").write_text("seeds: [0]\n")
    with pytest.raises(ConfigError, match="no `profile`"):
        readers.locate(start=tmp_path)


def test_missing_tables_name_the_command_that_writes_them(tmp_path):
    with pytest.raises(ConfigError, match="stats.csv does not exist; run `make repro`"):
        readers.read_stats(tmp_path)
    with pytest.raises(ConfigError, match="verdict.json does not exist"):
        readers.read_verdict(tmp_path)


def test_select_keeps_the_references_and_refuses_unknown_methods(stats):
    chosen = readers.select(stats, ["cwd"])
    assert set(chosen.method) == {"cwd", "none", "kd"}
    with pytest.raises(ConfigError, match=r"methods \['nope'\] have no results; choose among"):
        readers.select(stats, ["nope"])


def test_method_metadata_reads_family_and_citation_from_the_configs(stats):
    meta = readers.method_metadata(["none", "kd", "cwd", "teacher"]).set_index("method")
    assert meta.loc["kd", "family"] == "canonical" and meta.loc["cwd", "family"] == "segmentation_specific"
    assert meta.loc["none", "family"] == "student" and meta.loc["teacher", "family"] == "teacher"
    assert "Shu" in meta.loc["cwd", "reproduces"] and meta.loc["cwd", "display_name"] == "CWD"


def test_table1_groups_by_family_and_takes_intervals_from_stats(stats, meta):
    table = matched.table1(stats, fixtures.calibration_table(), meta, 40.0)
    assert list(table.method) == ["none", "kd", "fitnet", "cwd", "dist", "teacher"]  # family, then compute-matched mIoU
    kd = table.set_index("method").loc["kd"]
    assert kd.compute_miou_mean == pytest.approx(34.0) and kd.iter_iterations_mean == 40 and kd.compute_iterations_mean == 40
    assert kd.relative_cost == pytest.approx(0.050 / 0.030)
    assert kd.compute_delta_student_mean == pytest.approx(1.0) and kd.compute_delta_student_significant is True
    cwd = table.set_index("method").loc["cwd"]
    assert cwd.compute_delta_student_significant is False  # noise differs by seed: the interval includes 0
    assert table.set_index("method").loc["none", "published_miou"] == 74.23


def test_table1_marks_differences_inside_the_noise(stats, meta):
    html = matched.table1_html(matched.table1(stats, fixtures.calibration_table(), meta, 40.0), "caption")
    assert html.startswith('<div id="table1"') and "caption" in html
    assert html.count("kdrepro-noise") >= 2 and "≈ +0.2" in html  # cwd − none, compute-matched
    assert '<span class="kdrepro-significant">+1.0</span>' in html  # kd − none, compute-matched
    assert "34.0 ± " in html and "1.67×" in html and "Shu et al., ICCV 2021" in html
    assert matched.short_citation("Shu et al., Channel-wise KD for Dense Prediction, ICCV 2021") == "Shu et al., ICCV 2021"


def test_verdict_block_states_every_claim_in_words():
    verdict = fixtures.verdict(None)
    html = matched.verdict_html(verdict)
    assert 'id="verdict"' in html and html.count("verdict-badge") == 3
    for word in ("supported", "contradicted", "inconclusive"):
        assert f"verdict-{word}" in html
    assert "dist_minus_kd_iter = 1.50" in html and "gap 10.0 points" in html
    verdict["claims"][1]["figures"]["per_class"] = {"difference": 0.1188, "deciding": ["flat", "vehicle"], "largest": "sky"}
    assert "per_class = difference: 0.12 · deciding: flat, vehicle · largest: sky" in matched.verdict_html(verdict)
    assert "86 % of its mIoU at 4x the schedule" in matched.regime_line(verdict)
    verdict["regime"].pop("schedule")
    assert "has 86 % of its mIoU at 4× the schedule" in matched.regime_line(verdict)
    assert "learns" not in matched.regime_line(verdict)
    verdict["regime"]["classes_learned_by_student"] = {"present": 7, "learned": 5, "not_learned": ["object", "human"]}
    assert "learns 5 of the 7 classes present in validation (IoU 0: object, human)." in matched.regime_line(verdict)


def test_per_class_matrix_averages_seeds_and_drops_absent_classes(stats, meta):
    per_class = fixtures.per_class_table(fixtures.runs_table())
    matrix = matched.per_class_matrix(per_class, "compute_matched", ["none", "kd"], {"none": "Student alone", "kd": "KD"})
    assert list(matrix.index) == ["Student alone", "KD"] and "car" not in matrix.columns  # NaN in every run
    assert matrix.loc["KD", "road"] == pytest.approx(100 * 0.34 * 1.6)
    fig = matched.plot_per_class(per_class, ["none", "kd", "cwd"], {}, "smoke")
    assert len([ax for ax in fig.axes if ax.get_title()]) == 2
    plt.close("all")


def test_spread_labels_keeps_order_and_gap():
    values = np.array([47.74, 47.69, 46.93, 40.0])
    placed = cost.spread_labels(values, 0.5)
    assert np.all(np.diff(placed[np.argsort(values)]) >= 0.5 - 1e-9)
    assert list(np.argsort(placed)) == list(np.argsort(values)) and placed[3] == 40.0


def test_labels_of_a_figure_do_not_overlap(stats, meta):
    _, names, families = readers.method_maps(stats)
    for fig in (cost.plot_pareto(stats, families, names, {}, "smoke"),
                extended.plot_budget(extended.budget_frame(stats), families, names, 40.0, "smoke"),
                matched.plot_rank_change(stats, meta, "smoke")):
        fig.canvas.draw()
        boxes = [Text.get_window_extent(t) for t in fig.axes[0].texts if t.get_text().strip()]  # text, not leader line
        assert len(boxes) >= 4
        overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        assert not overlaps
    plt.close("all")


def test_pareto_axis_stays_within_miou_range(stats):
    _, names, families = readers.method_maps(stats)
    wide = stats.copy()
    wide.loc[wide.index[0], "miou_ci_low"] = -25.0  # a diverged seed's interval
    low, high = cost.plot_pareto(wide, families, names, {}, "smoke").axes[0].get_ylim()
    plt.close("all")
    assert 0.0 <= low < high <= 100.0


def test_pareto_front_keeps_only_undominated_points():
    front = cost.pareto_front(np.array([1.0, 2.0, 2.0, 3.0, 4.0]), np.array([30.0, 29.0, 33.0, 32.0, 35.0]))
    assert front.tolist() == [[1.0, 30.0], [2.0, 33.0], [4.0, 35.0]]


def test_calibration_header_warns_of_disturbed_timing():
    header = {"matched": {"budget_seconds": 12.0, "reference_method": "kd", "reference_iterations": 60}}
    assert "Disturbed" not in cost.calibration_header(header)
    text = cost.calibration_header({**header, "disturbed": {"cwd": 0.63}, "max_spread": 0.5})
    assert "**Disturbed timing**: IQR / median above 50 % for `cwd` (63 %)" in text
    assert "dvc repro -f -s calibrate" in text


def test_cost_table_shows_the_timing_spread():
    table = cost.cost_table(fixtures.calibration_table(), {"dist": "DIST"}).set_index("method")
    assert table.loc["DIST", "IQR (ms)"] == "54.6–75.4" and table.loc["DIST", "IQR / median (%)"] == pytest.approx(32.0)
    assert table.loc["none", "× student alone"] == 1.0 and table["peak memory (MiB)"].isna().all()
    assert list(table.index)[0] == "none"  # cheapest first
    assert cost.cost_unit({"hardware": {"gpu": "NVIDIA H200"}}) == ("training cost (GPU-hours, NVIDIA H200)", 3600.0)


def test_extended_frame_has_the_student_alone_at_every_budget(stats):
    frame = extended.budget_frame(stats)
    assert frame[frame.method == "none"].multiplier.tolist() == [1.0, 2.0, 4.0]
    assert "cwd" not in set(frame.method)  # compute-matched only: not an extended method
    table = extended.budget_table(frame, {"none": "Student alone"}, 40.0).set_index(["method", "budget"])
    assert table.loc[("Student alone", "4×"), "Δ vs student alone, same budget"] == "control"
    assert table.loc[("kd", "4×"), "% of teacher"] == pytest.approx(100 * 39.0 / 40.0)
    assert table.loc[("kd", "4×"), "Δ vs student alone, same budget"] == "+2.0 [+2.0, +2.0]"


def test_published_table_keeps_ratios_and_miou_apart(stats):
    table = extended.published_table(stats, {}, 40.0, "smoke")
    paper = table[(table["published row"] == "Canonical KD student (paper)") & (table.dataset == "ade20k")].iloc[0]
    assert pd.isna(paper["published mIoU (%)"]) and paper["published % of teacher"] == 92.0
    assert paper["this run (smoke): best extended mIoU"] == "39.0 (4×)"
    assert (table.schedule != "").all() and set(table.source) == set(SOURCES)


def test_published_entry_gives_source_and_schedule():
    assert published_entry("cwd_published") == {"miou": 76.26, "source": "bpkd", "label": "CWD",
                                                 "schedule": "512x1024, 80k iterations", "url": SOURCES["bpkd"].url}
    assert published_entry("dist") is None and published_entry("kd")["schedule"] == "extended training"
    assert base_method("kd_t4") == "kd" and len(published_results("ade20k")) == 8
    assert {r.source for r in PUBLISHED} <= set(SOURCES)


def test_curves_join_the_training_clock_and_average_seeds():
    runs = fixtures.runs_table()
    runs = runs[runs.run.str.startswith("compute_matched/kd/")]
    frame = curves.curves_over_time(fixtures.curves_table(runs), runs)
    ce = frame[(frame.metric == curves.CE) & (frame.seed == 0)]
    assert ce.seconds.tolist() == pytest.approx((ce.step * 0.05).tolist())
    miou = frame[(frame.metric == curves.MIOU) & (frame.seed == 0)]
    assert miou.value.iloc[-1] == pytest.approx(100 * runs[runs.seed == 0].miou.iloc[0])
    agg = curves.over_seeds(frame)
    last = agg[agg.metric == curves.MIOU].iloc[-1]
    assert last["mean"] == pytest.approx(34.0) and last["std"] == pytest.approx(np.std([33.8, 34.2], ddof=1))
    assert "4 points per run" in curves.evaluation_note(frame)


def test_error_map_and_image_miou():
    label = np.array([[0, 0], [1, 255]])
    prediction = np.array([[0, 1], [1, 0]])
    errors = error_map(prediction, label)
    assert errors[0, 0].tolist() == [225, 225, 225] and errors[0, 1].tolist() == [213, 94, 0]
    assert errors[1, 1].tolist() == [255, 255, 255]
    assert image_miou(prediction, label, 3) == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)
    rgb = colorize(np.array([[0, 255]]), [(128, 64, 128)])
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[0, 1].tolist() == [0, 0, 0]


def test_nav_links_cover_every_page():
    links = pages.nav_links("cost")
    assert [link["href"] for link in links] == ["index.html", *[f"{name}.html" for name in pages.PAGES]]
    assert [link["current"] for link in links].count(True) == 1


def test_render_html_refuses_a_missing_notebook(tmp_path, capsys):
    assert pages.main([str(tmp_path / "cost.ipynb")]) == 1
    assert "error:" in capsys.readouterr().err and pages.main([]) == 2


def test_git_commit_reads_head_with_dulwich(tmp_path):
    from dulwich import porcelain

    repo = porcelain.init(str(tmp_path))
    (tmp_path / "a.txt").write_text("a")
    porcelain.add(repo, [str(tmp_path / "a.txt")])
    sha = porcelain.commit(repo, message=b"first", author=b"t <t@t>", committer=b"t <t@t>")
    (tmp_path / "reports").mkdir()
    commit, branch = index.git_commit(tmp_path / "reports")
    assert commit == (sha if isinstance(sha, bytes) else sha.id).decode() and branch in ("master", "main")
    assert index.git_commit("/") == (None, None)


def test_index_without_results_says_what_to_run(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    assert main(["report-index", "profile=smoke", f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results",
                 f"+reports_dir={tmp_path / 'out'}"]) == 0
    page = (tmp_path / "out" / "index.html").read_text()
    assert "No verdict yet" in page and "verdict.json does not exist" in page and "not found: run `kdrepro calibrate`" in page


def test_index_shows_verdict_table1_pages_and_provenance(tmp_path):
    fixtures.make_repository(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "cost.html").write_text("<html></html>")
    page = index.write_index(readers.locate(start=tmp_path)).read_text()
    assert page.index('id="verdict"') < page.index('id="table1"') < page.index("Provenance")
    assert '<a href="cost.html"><b>Cost per iteration</b></a>' in page and "<b>Training curves</b> <i>(not rendered yet)</i>" in page
    assert "2.0 s = 40 iterations of kd (reference method)" in page and "git commit" in page
