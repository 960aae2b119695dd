"""``kdrepro plan``: the pipeline's cost from a calibration, on a constructed table and on a real smoke calibration."""

from __future__ import annotations

import json

import pytest
from smoke_pipeline import UNGUARDED

from kdrepro.cli import main
from kdrepro.config import load_config
from kdrepro.plan import build_plan, write_plan

GIB = 2**30


def _table(tmp_path, world_size: int = 4):
    def entry(seconds, pretrain=0.0, flops=None, peak=None):
        return {"seconds_per_iteration": seconds, "pretrain_seconds": pretrain, "flops_per_iteration": flops,
                "peak_memory_bytes": peak}  # fmt: skip

    table = {
        "dataset": "cityscapes", "world_size": world_size, "device_memory_bytes": 80 * GIB,
        "hardware": {"device": "cuda", "gpu": "a GPU"},
        "methods": {"none": entry(0.2, flops=1e12, peak=10 * GIB), "kd": entry(0.3, flops=2.5e12, peak=20 * GIB),
                    "fitnet": entry(0.31, peak=21 * GIB), "cirkd": entry(0.5, peak=90 * GIB),
                    "maskd": entry(0.32, pretrain=100.0, peak=22 * GIB)},
    }  # fmt: skip
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(table))
    return path


def _cfg(tmp_path, *extra: str):
    return load_config(["profile=cityscapes", "seeds=[0,1,2]", "calibrate.methods=[none,kd,fitnet,cirkd,maskd]",
                        "reference_iterations=1000", "plan.multipliers=[2,4]", f"plan.calibration={_table(tmp_path)}",
                        f"plan.output={tmp_path / 'out' / 'plan.json'}", *extra], config_name="plan")  # fmt: skip


def _row(plan, stage, method):
    return next(r for r in plan["stages"] if r["stage"] == stage and r["method"] == method)


def test_plan_prices_every_stage_per_seed_and_for_all_seeds(tmp_path):
    plan, text, output = write_plan(_cfg(tmp_path))
    # the slowest method is the reference: 1000 x 0.5 s; maskd pays its 100 s pre-training from the budget
    assert plan["reference_method"] == "cirkd" and plan["budget_seconds"] == pytest.approx(500.0)
    assert _row(plan, "compute_matched", "kd")["iterations"] == 1666
    assert _row(plan, "compute_matched", "maskd")["iterations"] == 1250
    assert _row(plan, "iter_matched", "maskd")["seconds"] == pytest.approx(1000 * 0.32 + 100)
    iter_matched = 1000 * (0.2 + 0.3 + 0.31 + 0.5 + 0.32) + 100
    compute_matched = sum(_row(plan, "compute_matched", m)["seconds"] for m in ("none", "kd", "fitnet", "cirkd", "maskd"))
    assert compute_matched == pytest.approx(2500, rel=1e-3)
    # extended: none, kd, fitnet and the most expensive segmentation-specific method (cirkd), at 2x and 4x the budget
    extended = [r for r in plan["stages"] if r["stage"].startswith("extended")]
    assert sorted({r["method"] for r in extended}) == ["cirkd", "fitnet", "kd", "none"] and len(extended) == 8
    assert plan["extended_best_specific"] == "cirkd" and any("priced as cirkd" in n for n in plan["notes"])
    assert _row(plan, "extended ×4", "none")["iterations"] == 10000
    extended_seconds = sum(r["seconds"] for r in extended)
    # teacher trained (no teacher_import): 1000 iterations x 0.2 s x 3 (2.5e12 - 1e12) / 1e12 FLOPs; calibration:
    # (3 warm-up + 5 rounds x 4 + 1 FLOP step) x the sum of seconds per iteration
    teacher, calibration = 1000 * 0.2 * 4.5, 24 * 1.63
    assert _row(plan, "teacher", "pspnet_r101")["seconds"] == pytest.approx(teacher)
    assert _row(plan, "calibrate", "5 methods")["seconds"] == pytest.approx(calibration)
    totals = plan["totals"]
    assert totals["per_seed_without_extended"]["seconds"] == pytest.approx(iter_matched + compute_matched)
    assert totals["all_seeds_with_extended"]["seconds"] == pytest.approx(
        teacher + calibration + 3 * (iter_matched + compute_matched + extended_seconds))
    assert totals["all_seeds_with_extended"]["gpu_hours"] == pytest.approx(4 * totals["all_seeds_with_extended"]["hours"])
    # the paper's iteration-matched protocol: 80k iterations for every method, beside the compute-matched one
    paper = plan["protocols"]["paper"]
    assert paper["iteration_matched_seconds"] == pytest.approx(80000 * 1.63 + 100)
    assert paper["compute_matched_seconds"] == pytest.approx(5 * 80000 * 0.5, rel=1e-3)
    assert paper["iteration_matched_gpu_hours_all_seeds"] == pytest.approx((80000 * 1.63 + 100) * 3 / 3600 * 4)
    memory = {row["method"]: row for row in plan["memory"]}
    assert memory["cirkd"]["fits"] is False and memory["kd"]["fits"] is True
    assert json.loads(output.read_text())["totals"] == json.loads(json.dumps(totals))
    assert output.with_suffix(".md").read_text() == text
    assert "| compute-matched, paper schedule |" in text and "**no**" in text and "× 4 processes" in text
    # as jobs (kdrepro launch): 1 GPU cannot hold a 4-process run; 8 GPUs run 2 of them at once
    cluster = {row["gpus"]: row for row in plan["cluster"]}
    assert cluster[1]["seconds"] is None and cluster[8]["parallel_runs"] == 2
    assert teacher + calibration < cluster[8]["seconds"] < totals["all_seeds_with_extended"]["seconds"]
    assert "| 8 | 2 |" in text and "needs 4 GPUs per run" in text


def test_imported_teacher_is_free_and_extended_follows_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("profile: cityscapes\nmethods: [kd, fitnet, cirkd, maskd]\nextended:\n  multipliers: ['8']\n")
    cfg = _cfg(tmp_path, "teacher_import=pspnet.pth", "plan.multipliers=null", f"plan.params={params}")
    plan, _, _ = write_plan(cfg)
    assert _row(plan, "teacher", "pspnet_r101")["seconds"] == 0
    assert {r["stage"] for r in plan["stages"] if r["stage"].startswith("extended")} == {"extended ×8"}
    plan = build_plan(_cfg(tmp_path, "calibrate.methods=[none,kd,fitnet]"), json.loads(_table(tmp_path).read_text()), [])
    assert plan["extended_best_specific"] is None and not [r for r in plan["stages"] if r["stage"].startswith("extended")]


def test_plan_prices_the_backbone_pretraining_of_the_embedded_profile(tmp_path):
    # the embedded profile pre-trains both backbones (2000 student, 1000 teacher iterations); the real profiles copy
    # ImageNet weights (free), and an imported teacher needs no backbone
    plan, text, _ = write_plan(_cfg(tmp_path, "profile=synthetic", "seeds=[0,1,2]", "reference_iterations=1000"))
    student, teacher = _row(plan, "pretrain", "pspnet_r18 backbone"), _row(plan, "pretrain", "pspnet_r101 backbone")
    assert student["seconds"] == pytest.approx(2000 * 0.2) and teacher["seconds"] == pytest.approx(1000 * 0.2 * 4.5)
    assert plan["totals"]["once"]["seconds"] == pytest.approx(
        sum(r["seconds"] for r in plan["stages"] if r["per"] == "pipeline"))
    assert "| pretrain | pspnet_r101 backbone" in text and "once per pipeline (pre-training, teacher, calibration)" in text
    imported, _, _ = write_plan(_cfg(tmp_path, "profile=synthetic", "teacher_import=pspnet.pth"))
    assert [r["method"] for r in imported["stages"] if r["stage"] == "pretrain"] == ["pspnet_r18 backbone"]
    real, _, _ = write_plan(_cfg(tmp_path))
    assert not [r for r in real["stages"] if r["stage"] == "pretrain"]


def test_plan_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", "profile=cityscapes", f"plan.calibration={tmp_path / 'missing.json'}"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: calibration {tmp_path / 'missing.json'} does not exist")
    path = _table(tmp_path)
    assert main(["plan", "profile=cityscapes", "calibrate.methods=[none,kd,cwd]", f"plan.calibration={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the calibration has no entry for ['cwd']") and "\n" not in err


@pytest.mark.slow
def test_plan_of_a_real_smoke_calibration(tiny_teacher, tmp_path, capsys):
    output = tmp_path / "calibration.json"
    calibrate = [*tiny_teacher, "calibrate.methods=[none,kd,fitnet,cwd]", "calibrate.warmup=1", "calibrate.rounds=1",
                 "calibrate.iterations_per_round=2", f"calibrate.output={output}", *UNGUARDED]  # fmt: skip
    assert main(["calibrate", *calibrate]) == 0
    table = json.loads(output.read_text())
    assert table["world_size"] == 1 and table["device_memory_bytes"] > 0 and table["process_peak_rss_bytes"] > 0
    capsys.readouterr()
    assert main(["plan", *calibrate, "seeds=[0,1]", "plan.multipliers=[2]", f"plan.calibration={output}"]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    # the same reference and budget as the calibration (the synthetic profile's reference is kd)
    assert plan["reference_method"] == table["matched"]["reference_method"] == "kd"
    assert plan["budget_seconds"] == pytest.approx(table["matched"]["budget_seconds"])
    assert plan["extended_best_specific"] == "cwd" and "protocols" in plan and "paper" not in plan["protocols"]
    assert _row(plan, "iter_matched", "kd")["iterations"] == 4
    assert "| iter_matched | kd | 2 | 4 |" in printed and "no per-method peak memory on this device (CPU)" in printed


def test_resident_bytes_counts_weights_gradients_and_optimizer_state():
    """What a method keeps between iterations (calibration's per-method GPU peak subtracts the others' models)."""
    import torch

    from kdrepro.train.calibrate_ranks import resident_bytes
    from kdrepro.train.trainer import Trainer

    trainer = Trainer(load_config(["method=none", "student.base_width=8", "student.pretrained=null", "precision=fp32", "channels_last=false"]), torch.device("cpu"))
    weights = sum(p.numel() * 4 for p in trainer.student.parameters())
    buffers = sum(b.numel() * b.element_size() for b in trainer.student.buffers())
    assert resident_bytes(trainer) == 2 * weights + buffers  # weights + gradients
    trainer.step(torch.randn(2, 3, 32, 64), torch.randint(0, 7, (2, 32, 64)), progress=0.0)  # the 7 categories
    assert resident_bytes(trainer) == 3 * weights + buffers  # + SGD momentum
