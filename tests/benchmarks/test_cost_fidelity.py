"""``benchmarks/cost_fidelity.py``: every pipeline method counted at the paper's size (on ``meta``) and in a
miniature, the ratios to kd and their quotients printed, and the ``meta`` counts equal to real ones."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kdrepro.config import roles

MINIATURE = "smoke"  # the smallest profile


@pytest.fixture
def fidelity(cost_fidelity):
    return cost_fidelity


def table_rows(out: str, header: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of the markdown table whose header starts with ``header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_every_method_gets_its_ratios_at_both_sizes_and_meta_counts_equal_real_ones(fidelity, tmp_path, capsys):
    output = tmp_path / "cost_fidelity.json"
    status = fidelity.main(["--profiles", "cityscapes", MINIATURE, "--output", str(output), "--check-real", MINIATURE])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"meta against real tensors at {MINIATURE}: identical" in out
    rows = table_rows(out, "| method | cityscapes ratio to kd |")
    methods = fidelity.pipeline_methods()
    assert roles().control in methods and roles().logit_kd in methods and len(methods) >= 10
    assert sorted(rows) == sorted(methods)
    number = re.compile(r"^\d+\.\d+( \*\*FLAGGED\*\*)?$")
    for method, cells in rows.items():
        assert len(cells) == 3 and all(number.match(cell) for cell in cells), (method, cells)
        paper, miniature, quotient = (float(cell.split()[0]) for cell in cells)
        assert paper > 0 and miniature > 0
        assert quotient == pytest.approx(miniature / paper, abs=0.01)
        assert cells[2].endswith("**FLAGGED**") == (not 0.67 <= quotient <= 1.5)
    assert rows["kd"] == ["1.000", "1.000", "1.00"]
    assert float(rows["none"][0]) < 1  # the student alone skips the teacher
    results = json.loads(output.read_text())
    counts = results["counts"]["cityscapes"]
    assert counts["kd"]["by_phase"]["teacher"] > counts["kd"]["by_phase"]["student"] > 0
    assert counts["skd"]["by_phase"]["method_step"] > 0  # the critic's update is counted
    assert counts["maskd"]["pretrain_iterations"] > 0 and counts["maskd"]["pretrain_flops_per_iteration"] > 0
    assert counts["kd"]["batch"] == 2  # the paper's batch 8 over 4 GPUs


def test_quotients_outside_the_band_are_flagged(fidelity):
    result = fidelity.fidelity({"kd": 1.0, "a": 2.0, "b": 1.0}, {"kd": 1.0, "a": 1.0, "b": 1.6})
    assert result["kd"] == {"quotient": 1.0, "flagged": False}
    assert result["a"] == {"quotient": 0.5, "flagged": True}
    assert result["b"]["flagged"] and result["b"]["quotient"] == pytest.approx(1.6)


def test_ratios_need_the_reference(fidelity):
    counts = {"kd": {"flops": 4}, "a": {"flops": 6}}
    assert fidelity.ratios(counts, "kd") == {"kd": 1.0, "a": 1.5}
    with pytest.raises(Exception, match="reference method fitnet was not counted"):
        fidelity.ratios(counts, "fitnet")


def test_the_paper_batch_is_per_gpu(fidelity):
    assert fidelity.process_batch(fidelity.compose("cityscapes", "kd"), "cityscapes") == 2
    assert fidelity.process_batch(fidelity.compose("synthetic", "kd"), "synthetic") == 4


def test_methods_start_their_integer_state_at_zero(fidelity):
    """On ``meta`` a method's integer buffers (queue pointers) are recreated as zeros: true of every method."""
    for method in fidelity.pipeline_methods():
        trainer = fidelity.build_trainer(fidelity.compose(MINIATURE, method), torch.device("cpu"))
        for name, buffer in trainer.distiller.named_buffers():
            if not buffer.dtype.is_floating_point:
                assert not buffer.any(), (method, name)


def test_step_flops_splits_the_step_by_phase(fidelity):
    trainer = fidelity.build_trainer(fidelity.compose(MINIATURE, "skd"), torch.device("cpu"))
    images, labels = fidelity.random_batch(trainer.cfg, 2, torch.device("cpu"))
    timer = trainer.timer
    counter = fidelity.step_flops(trainer, images, labels)
    assert counter.total == sum(counter.by_phase.values()) > 0
    assert set(counter.by_phase) == {"teacher", "student", "distill", "backward", "method_step"}
    assert trainer.timer is timer and not timer.history and trainer.teacher_grad_context is torch.inference_mode


def test_real_integers_meet_meta_tensors_on_meta(fidelity):
    labels = torch.tensor([[0, 2], [2, 5]])
    with fidelity.MetaWithRealIntegers():
        present = torch.unique(labels)  # only real tensors: computed
        scores = torch.zeros(2, 6, device="meta")
        picked = scores[:, present]  # real index into a meta tensor: on meta, with the real index's shape
    assert present.tolist() == [0, 2, 5]
    assert picked.device.type == "meta" and picked.shape == (2, 3)


def test_a_number_read_from_a_meta_tensor_is_zero(fidelity):
    with fidelity.MetaWithRealIntegers():
        loss = torch.ones((), device="meta")
        assert float(loss) == 0.0 and bool(loss > 0) is False
