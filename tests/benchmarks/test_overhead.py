"""``benchmarks/overhead.py`` can fail: its verdict follows the interval, and it runs (briefly) on a fresh clone."""

from __future__ import annotations

import pytest
from interleaved import Interval, median_interval, paired


def interval(low: float, median: float, high: float) -> Interval:
    return Interval(median, low, high, 30, 0.95)


def test_verdict_states_the_overhead_only_where_the_interval_allows(overhead):
    assert overhead.verdict(interval(3.0, 5.0, 7.0), 2.0) == ("OVER the 2 % goal: 5.00 % (95 % interval +3.00 to +7.00 %)", 1)
    message, status = overhead.verdict(interval(-0.4, 0.3, 0.9), 2.0)
    assert status == 0 and message.startswith("not distinguishable from zero; at most 0.90 %")
    assert overhead.verdict(interval(0.5, 1.0, 1.5), 2.0)[0].startswith("1.00 %, within")
    message, status = overhead.verdict(interval(-18.6, 2.4, 21.4), 2.0)  # an earlier run's noise: no claim either way
    assert status == 0 and message.startswith("cannot tell at this noise")


def test_a_harness_ten_percent_slower_fails(overhead):
    bare = [0.100 + 0.01 * (i % 5) for i in range(30)]
    slower = [b * 1.10 for b in bare]
    percent = median_interval(paired(bare, slower)).scaled(100 / 0.12)
    assert overhead.verdict(percent, 2.0)[1] == 1


@pytest.mark.slow
def test_overhead_runs_briefly_on_a_fresh_clone(overhead, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/ here: random-init backbones
    status = overhead.main(["--rounds", "6", "--warmup", "1", "profile=smoke"])
    out = capsys.readouterr().out
    assert status in (0, 1) and "95 % interval" in out and out.splitlines()[-1].startswith("overhead: ")


def test_bare_step_runs_at_the_harness_precision(overhead, monkeypatch):
    """An fp32 bare step against a bf16 harness step once read as a 226 % "overhead"."""
    import torch

    from kdrepro.config import load_config
    from kdrepro.models import build_segmentor
    from kdrepro.train.trainer import Trainer, autocast_context

    # precision fixed to bf16 (what is tested) and the layout fixed too: the profile's `auto` is refused by Trainer
    cfg = load_config(["profile=smoke", "method=kd", "precision=bf16", "channels_last=false", "student.pretrained=null",
                       "teacher.pretrained=null"])
    trainer = Trainer(cfg, torch.device("cpu"), teacher=build_segmentor(cfg.teacher, 7).eval())
    precisions = []
    monkeypatch.setattr(overhead, "autocast_context", lambda device, precision: precisions.append(precision) or autocast_context(device, precision))
    bare, _ = overhead.step_functions(trainer, torch.randn(2, 3, 32, 64), torch.randint(0, 7, (2, 32, 64)), overhead.time.process_time)
    bare()
    assert precisions == ["bf16"]
