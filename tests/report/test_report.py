"""Unit tests of kdrepro.report on constructed tables: Table 1 and its noise marks, the verdict block, path
resolution from notebooks/, label placement, Pareto front, extended control, curves, per-class IoU, error maps,
pages and the index (template, dulwich commit)."""

from __future__ import annotations

import json

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


def test_root_rule_works_in_a_copy_without_dvc_yaml_and_its_errors_name_it(tmp_path, monkeypatch):
    """A copy of the notebooks and the results, without dvc.yaml or params.yaml: the results one folder up are found."""
    fixtures.make_repository(tmp_path)
    (tmp_path / "dvc.yaml").unlink()
    (tmp_path / "params.yaml").unlink()
    inputs = readers.locate(start=tmp_path / "notebooks")
    assert inputs.root == tmp_path.resolve() and inputs.profile == "smoke"  # the only profile with results
    assert readers.read_verdict(inputs.results_dir)["regime"]["profile"] == "smoke"
    (tmp_path / "results" / "other").mkdir()
    (tmp_path / "results" / "other" / "verdict.json").write_text("{}")
    with pytest.raises(ConfigError) as caught:
        readers.locate(start=tmp_path / "notebooks")
    assert "results exist for other, smoke" in str(caught.value) and "nearest folder at or above" in str(caught.value)
    monkeypatch.chdir(tmp_path / "notebooks")
    with pytest.raises(ConfigError, match=r"stats.csv does not exist \(repository root .*nearest folder at or above"):
        readers.read_stats(tmp_path / "results" / "other")


def test_readme_notebook_example_names_methods_every_profile_runs():
    """README's `methods = [...]` example: only methods that params.yaml must list (extended runs, positive control)."""
    from kdrepro.analysis.verdict import DEFAULT_SETTINGS
    from kdrepro.config import roles

    readme = (fixtures.ROOT / "README.md").read_text()
    example = readme[readme.index("## Explore the notebooks"):].split("`methods = [", 1)[1].split("]", 1)[0]
    named = {name.strip().strip('"') for name in example.split(",")}
    assert named and named <= set(roles().canonical) | set(DEFAULT_SETTINGS["positive_control"])


def test_missing_tables_name_the_command_that_writes_them(tmp_path):
    with pytest.raises(ConfigError, match="stats.csv does not exist .*; run `make repro`"):
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
    html = matched.verdict_html(verdict, fixtures.DISPLAY)
    assert 'id="verdict"' in html and html.count("verdict-badge") == 3
    for word in ("supported", "contradicted", "inconclusive"):
        assert f"verdict-{word}" in html
    # one sentence per claim with display names, the figures in a small table, no raw `key = value` dumps
    assert "Compute-matched, KD (the better canonical method) scores +0.8 mIoU points against CWD" in html
    assert "DIST above KD iteration-matched, below it compute-matched" in html
    assert 'class="kdrepro-figures"' in html and "best segmentation-specific</th>" in html
    assert "best_specific" not in html and "canonical =" not in html and "per_class" not in html and "4× the" in html
    assert "no single class (largest share: sky, 35 %)" in html
    # the teacher's schedule wherever its mIoU appears
    assert "40.0 mIoU after 300 iterations (one run)" in html
    assert "Positive control passed" in html and "KD +2.0 [+1.6, +2.4]" in html
    assert "Capacity gap: the teacher leads the student alone at its longest control (4× the budget, 106 iterations) by 3.6 points" in html
    assert "kdrepro-flag" not in html
    assert "86 % of its mIoU at 4x the schedule" in matched.regime_line(verdict)
    verdict["regime"].pop("schedule")
    assert "has 86 % of its mIoU at 4× the schedule" in matched.regime_line(verdict)
    assert "learns" not in matched.regime_line(verdict)
    verdict["regime"]["classes_learned_by_student"] = {"present": 7, "learned": 5, "not_learned": ["object", "human"]}
    assert "learns 5 of the 7 classes present in validation (IoU 0: object, human)." in matched.regime_line(verdict)


def test_failed_positive_control_says_first_that_the_run_cannot_judge():
    html = matched.verdict_html(fixtures.verdict(None, control_passed=False), fixtures.DISPLAY)
    flag = html.index("This run cannot judge the paper&#39;s claims.")
    assert flag < html.index("kdrepro-regime") < html.index("(a)")  # before anything else of the block
    assert html.count("⚠ cannot judge") == 3 and "Positive control FAILED" in html
    assert "Its numbers alone would say supported" in html and "CWD +0.5 [-3.0, +4.0]" in html


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


def test_no_label_sits_on_an_error_bar_and_axes_stay_in_their_range(stats, meta):
    """The slope chart's labels stand in columns outside the axes (a label-repel layout), the extended chart uses a
    legend; neither axis leaves [0, 100] mIoU, so % of teacher never goes negative."""
    _, names, families = readers.method_maps(stats)
    slope = matched.plot_rank_change(stats, meta, "smoke")
    slope.canvas.draw()
    inside = slope.axes[0].get_window_extent()
    labels = [t for t in slope.axes[0].texts if t.get_text().strip()]
    assert len(labels) == 2 * len(set(stats[stats.protocol == "compute_matched"].method))
    assert not [t.get_text() for t in labels if Text.get_window_extent(t).overlaps(inside)]  # the text, not its leader
    wide = stats.copy()
    wide.loc[wide.method == "cwd", "miou_ci_low"] = -40.0  # two seeds: a t-interval can reach below 0
    budget = extended.plot_budget(extended.budget_frame(wide), families, names, 40.0, "smoke", teacher_iterations=300)
    axis = budget.axes[0]
    assert axis.get_ylim()[0] >= 0 and axis.get_ylim()[1] <= 100
    assert [t.get_text() for t in axis.get_legend().get_texts()][0].startswith("Student alone")
    assert {t.get_text().strip() for t in axis.texts} == {"teacher 40.0 after 300 iterations"}  # with its schedule
    assert matched.plot_rank_change(wide, meta).axes[0].get_ylim()[0] >= 0
    plt.close("all")


def test_labels_of_a_figure_do_not_overlap(stats, meta):
    _, names, families = readers.method_maps(stats)
    for fig in (cost.plot_pareto(stats, families, names, {}, "smoke"),
                matched.plot_rank_change(stats, meta, "smoke")):
        fig.canvas.draw()
        boxes = [Text.get_window_extent(t) for t in fig.axes[0].texts if t.get_text().strip()]  # text, not leader line
        assert len(boxes) >= 4
        overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        assert not overlaps
    plt.close("all")


def test_a_method_whose_seeds_collapsed_says_so_in_both_figures(stats, meta):
    _, names, families = readers.method_maps(stats)
    marked = stats.copy()
    rows = (marked.method == "cwd") & (marked.protocol == "compute_matched")
    marked.loc[rows, "n_collapsed"] = 1
    slope = [t.get_text() for t in matched.plot_rank_change(marked, meta, "smoke").axes[0].texts]
    total = int(marked.loc[rows, "n_seeds"].iloc[0] + marked.loc[rows, "n_diverged"].iloc[0])
    assert [t for t in slope if "one class" in t] == [f"{marked.loc[rows, 'miou_mean'].iloc[0]:.1f} {names['cwd']} (1/{total} one class)"]
    pareto = [t.get_text() for t in cost.plot_pareto(marked, families, names, {}, "smoke").axes[0].texts]
    assert [t for t in pareto if "one class" in t] == [f"{names['cwd']} (1/{int(marked.loc[marked.method == 'cwd', 'n_seeds'].sum())} one class)"]
    plain = [t.get_text() for t in matched.plot_rank_change(stats.assign(n_collapsed=0), meta).axes[0].texts]
    assert not [t for t in plain if "one class" in t]
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


def test_disturbed_timing_note_works_where_max_spread_is_null():
    """The smoke profile sets calibrate.max_spread null; the compute check's own limit still finds the disturbance."""
    header = {"matched": {"budget_seconds": 21.4, "reference_method": "kd", "reference_iterations": 4}, "max_spread": None}
    check = {"disturbed": {"fitnet": 1.058, "kd": 1.014}, "disturbed_spread": 0.5}
    text = cost.calibration_header(header, check)
    assert "**Disturbed timing**: IQR / median above 50 % for `fitnet` (106 %), `kd` (101 %)" in text


def test_cost_table_gives_seeds_seconds_against_budget_and_flop_matched_iterations_in_figure_order():
    check = fixtures.compute_check(fixtures.runs_table(), {"compute_matched/dist/seed0": 0.6})
    table = cost.cost_table(fixtures.calibration_table(), fixtures.DISPLAY, check).set_index("method")
    assert table.loc["KD", "seeds"] == 2 and table.loc["KD", "FLOP-matched iterations"] == 40
    assert table.loc["KD", "train s / budget (mean)"] == "2.0 / 2.0 s (100 %)"
    assert table.loc["DIST", "train s / budget (mean)"].startswith("⚠") and "a seed at 60 %" in table.loc["DIST", "train s / budget (mean)"]
    html = cost.off_budget_style(style.styled(table.reset_index())).to_html()
    assert html.count("#c00000") == 1
    figure = cost.plot_cost(fixtures.calibration_table(), fixtures.FAMILY, fixtures.DISPLAY)
    ticks = sorted(figure.axes[0].get_yticklabels(), key=lambda t: -t.get_position()[1])  # top to bottom on screen
    shown = [t.get_text() for t in ticks]
    assert shown == list(table.index) or shown[::-1] == list(table.index)
    top = max(figure.axes[0].get_yticklabels(), key=lambda t: figure.axes[0].transData.transform(t.get_position())[1])
    assert top.get_text() == list(table.index)[0]  # the cheapest on top, as the table's first row
    plt.close(figure)


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


def test_published_table_has_one_row_per_method_no_typos_and_this_runs_columns_first(stats):
    table = extended.published_table(stats, {"kd": "KD (logits)"}, 40.0, "smoke")
    assert table.method.is_unique and list(table.method).count("Teacher (PSPNet-R101)") == 1
    assert "SKDS" not in table.to_string() and "SKD" in set(table.method)
    assert list(table.columns)[:2] == ["method", "this run (smoke): compute-matched mIoU"]
    teacher = table.set_index("method").loc["Teacher (PSPNet-R101)"]
    assert teacher["published Cityscapes"] == "79.74 [bpkd]; 79.76 [mmseg]; 79.80 [paper]"
    kd = table.set_index("method").loc["KD (logits)"]
    assert kd["published ADE20K"] == "92 % of the teacher [paper]" and kd["published Cityscapes"] == "79.00 [paper]"
    assert kd["this run (smoke): best extended mIoU"] == "39.0 (4×)"
    assert (table.schedule != "").all()
    cited = {key for cell in table["published Cityscapes"] for key in SOURCES if f"[{key}]" in cell}
    assert cited == set(SOURCES)


def test_the_published_tables_free_text_columns_wrap_and_the_numbers_stay_on_one_line(stats):
    """The schedules (80 characters and more) kept on one line pushed the table past a 1400-px page."""
    table = extended.published_table(stats, {"kd": "KD (logits)"}, 40.0, "smoke")
    html = style.styled(table, table_id="published-table", wrap=extended.PUBLISHED_WRAP).to_html()
    columns = list(table.columns)
    for column in columns:  # a column rule "#T_x td.colN" outranks the table's "#T_x td" (nowrap); a cell rule would not
        rule = f"#T_published-table td.col{columns.index(column)}"
        wrapped = any(rule in block and "white-space: normal" in block for block in html.split("}"))
        assert wrapped == (column in extended.PUBLISHED_WRAP), column
    assert set(extended.PUBLISHED_WRAP) <= set(columns)
    assert "white-space: nowrap" in html  # every other cell keeps one line


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
    # provenance: repository-relative paths, one date format, the CPU and the precision
    assert str(tmp_path) not in page and "<td>runs/smoke</td>" in page and "<td>results/smoke</td>" in page
    assert "<td>2026-11-30 05:00 UTC</td>" in page and "+00:00" not in page
    assert "CPU AMD EPYC (2 threads)" in page and "<th>precision</th><td>bf16</td>" in page
    assert "family</th>" not in page  # no empty "family / method" header row
    # this run's columns first, the published scale reference last; per-row seeds and budget
    assert page.index("iteration-matched") < page.index("compute-matched") < page.index("published (Cityscapes)")
    assert "train s / budget" in page and "iterations (FLOP-matched)" in page and "kdrepro-off-budget" not in page
    assert "Teacher (one run, 300 iterations)" in page


def test_run_outside_its_budget_is_flagged_red_on_the_page_and_the_verdict(tmp_path):
    """A constructed run table in which one compute-matched run trained 40 % longer than its budget."""
    fixtures.make_repository(tmp_path)
    runs = fixtures.runs_table()
    verdict = fixtures.verdict()
    verdict["compute_check"] = fixtures.compute_check(runs, {"compute_matched/fitnet/seed1": 1.4})
    path = tmp_path / "results" / "smoke" / "verdict.json"
    path.write_text(json.dumps(verdict))
    page = index.write_index(readers.locate(start=tmp_path)).read_text()
    assert "Compute matching did not hold in this run." in page and "cannot be judged" in page
    assert "1 of 26 compute-matched or extended runs (FitNet (features)) trained outside ±15 % of their budget (140 % of the budget)" in page
    flagged = page[page.index("kdrepro-off-budget") - 2500 : page.index("kdrepro-off-budget")]
    assert "FitNet" in flagged and "140 % of budget" in page and page.count("kdrepro-off-budget") == 1


def test_qualitative_column_titles_do_not_run_together():
    from kdrepro.report.qualitative import plot_qualitative

    picture = np.zeros((64, 128, 3), dtype=np.uint8)
    titles = ["student alone:\nStudent alone", "logit KD:\nKD (logits)", "best seg.-specific:\nCWD",
              "best extended KD (4×):\nFitNet (features)", "teacher"]
    panels = {"titles": titles, "present": [0], "names": ["road"], "colours": [[128, 64, 128]],
              "images": [{"index": 0, "image": picture, "truth": picture, "predictions": [picture] * len(titles),
                          "errors": [picture] * len(titles), "miou": [40.0] * len(titles)}]}
    fig = plot_qualitative(panels, "smoke")
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in fig.axes[: 2 + len(titles)] if ax.get_title()]
    assert len(boxes) == 2 + len(titles)
    panel = fig.axes[0].get_window_extent().width
    gaps = [right.x0 - left.x1 for left, right in zip(boxes, boxes[1:], strict=False)]
    assert min(gaps) >= 0.15 * panel, gaps  # a visible gap between neighbouring titles, not just no overlap
    assert all(box.y1 <= fig.bbox.y1 for box in boxes)  # inside the figure
    plt.close(fig)


def test_matched_page_lists_every_methods_hyper_parameters_and_links_every_runs_files(tmp_path):
    from kdrepro.report import links

    fixtures.make_repository(tmp_path)
    inputs = readers.locate(start=tmp_path)
    saved = inputs.runs_dir / "iter_matched" / "kd" / "seed0"
    saved.mkdir(parents=True)
    (saved / "config.yaml").write_text("method:\n  terms:\n    kd:\n      weight: 2.5\n      temperature: 4.0\n")
    (saved / "metrics.json").write_text("{}")
    html = links.method_settings_html(fixtures.runs_table(), inputs, fixtures.DISPLAY)
    assert "kd.weight = 2.5" in html and "kd.temperature = 4.0" in html  # as trained, from the run's config.yaml
    assert "cwd.weight = 3.0" in html and "cwd.temperature = 4.0" in html  # from its config file
    runs = links.runs_html(fixtures.runs_table(), inputs, fixtures.DISPLAY)
    assert '<a href="../runs/smoke/iter_matched/kd/seed0/metrics.json">metrics.json</a>' in runs
    assert 'title="not found">config.yaml' not in runs.split("iter_matched/kd/seed0")[1][:300]
    assert '<a href="../results/smoke/runs.csv">runs.csv</a>' in links.tidy_tables_html(inputs)


# ------------------------------------------------------------------------------------ runs collapsed to one class
COLLAPSED_DIST = {"dist": {"runs": 3, "of": 4, "by_protocol": [
    {"protocol": "iter_matched", "multiplier": 1.0, "collapsed": 1, "seeds": 2},
    {"protocol": "compute_matched", "multiplier": 1.0, "collapsed": 2, "seeds": 2}]}}  # fmt: skip


def _collapsed(stats: pd.DataFrame, protocol: str, method: str, n: int) -> pd.DataFrame:
    stats = stats.copy()
    stats.loc[(stats.protocol == protocol) & (stats.method == method), "n_collapsed"] = n
    return stats


def test_table1_says_how_many_seeds_collapsed_beside_those_that_diverged(stats, meta):
    stats = _collapsed(stats, "compute_matched", "dist", 1)
    stats.loc[(stats.protocol == "compute_matched") & (stats.method == "dist"), ["n_seeds", "n_diverged"]] = [1, 1]
    html = matched.table1_html(matched.table1(stats, fixtures.calibration_table(), meta, 40.0), "caption")
    assert "<small>1 of 2 seeds diverged</small><br><small>1 of 2 seeds collapsed to one class</small>" in html
    assert html.count("collapsed to one class") == 1  # only the row with a collapsed seed
    assert "collapsed to one class (at most one class above 1 % IoU; kept in the mean" in matched.table1_caption("smoke", 2)


def test_extended_table_says_how_many_seeds_collapsed(stats):
    frame = extended.budget_frame(_collapsed(stats, "extended", "kd", 1))
    table = extended.budget_table(frame, {}, 40.0).set_index(["method", "budget"])
    assert table.loc[("kd", "4×"), "mIoU (%) ± 95 % CI"].endswith(" (1 of 2 seeds collapsed to one class)")
    assert "collapsed" not in table.loc[("none", "4×"), "mIoU (%) ± 95 % CI"]


def test_regime_line_and_verdict_block_name_the_methods_that_collapsed():
    verdict = fixtures.verdict(None)
    assert "collapsed" not in matched.regime_line(verdict, fixtures.DISPLAY)
    verdict["regime"]["collapsed"] = {"dist": {"runs": 4, "of": 4, "by_protocol": [
        {"protocol": "iter_matched", "multiplier": 1.0, "collapsed": 2, "seeds": 2},
        {"protocol": "compute_matched", "multiplier": 1.0, "collapsed": 2, "seeds": 2}]}}  # fmt: skip
    sentence = ("DIST collapsed to one class on 2 of 2 seeds iteration-matched and 2 of 2 seeds compute-matched: its "
                "rows describe a broken training, not the method (collapsed: at most one class above 1 % IoU")
    assert sentence in matched.regime_line(verdict, fixtures.DISPLAY)
    assert sentence in matched.verdict_html(verdict, fixtures.DISPLAY)  # the verdict page and the index
    verdict["regime"]["collapsed"] = COLLAPSED_DIST
    assert ("DIST collapsed to one class on 1 of 2 seeds iteration-matched and 2 of 2 seeds compute-matched: its "
            "compute-matched row describes a broken training, not the method") in matched.regime_line(verdict, fixtures.DISPLAY)
    verdict["regime"]["collapsed"] = {"kd": {"runs": 1, "of": 6, "by_protocol": [
        {"protocol": "extended", "multiplier": 4.0, "collapsed": 1, "seeds": 2}]}}  # fmt: skip
    assert ("KD collapsed to one class on 1 of 2 seeds at 4× the budget: those seeds stay in its mean and interval"
            in matched.regime_line(verdict, fixtures.DISPLAY))


def test_index_says_which_method_collapsed(tmp_path):
    fixtures.make_repository(tmp_path)
    verdict = fixtures.verdict()
    verdict["regime"]["collapsed"] = COLLAPSED_DIST
    (tmp_path / "results" / "smoke" / "verdict.json").write_text(json.dumps(verdict))
    page = index.write_index(readers.locate(start=tmp_path)).read_text()
    assert "DIST collapsed to one class on 1 of 2 seeds iteration-matched" in page


def test_run_list_marks_a_collapsed_run(tmp_path):
    from kdrepro.report import links

    fixtures.make_repository(tmp_path)
    runs = fixtures.runs_table()
    runs.loc[runs.run == "iter_matched/dist/seed1", "collapsed"] = True
    html = links.runs_html(runs, readers.locate(start=tmp_path), fixtures.DISPLAY)
    assert html.count("(collapsed to one class)") == 1
    assert "<td>iteration-matched</td><td>DIST</td><td></td><td>1</td><td>33.7 (collapsed to one class)</td>" in html
