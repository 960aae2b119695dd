"""``benchmarks/throughput.py`` compares two different loops, on a fresh clone, at the profile's classes."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_one_round_on_a_fresh_clone_compares_fp32_nchw_with_kdrepros_loop(throughput, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ (no pre-trained backbones) here
    output = tmp_path / "throughput.json"
    # the profile asks for bf16 + channels_last: the reference must not inherit them
    results = throughput.main(["--methods", "kd", "--rounds", "1", "--warmup", "0", "--precision", "bf16",
                               "--channels-last", "true", "--json", str(output), "profile=smoke",
                               "precision=bf16", "channels_last=true"])
    assert results["reference"] == {"precision": "fp32", "channels_last": False, "compile": False}
    (row,) = results["rows"]
    assert row["precision"] == "bf16" and row["channels_last"] and row["chosen"]
    assert row["precision"] != results["reference"]["precision"]
    assert row["reference_seconds"] > 0 and row["kdrepro_seconds"] > 0 and row["flops_per_iteration"] > 0
    assert json.loads(output.read_text())["rows"][0]["method"] == "kd"


def test_reference_settings_ignore_the_profile(throughput):
    cfg = throughput.base_config(["profile=smoke", "precision=bf16", "channels_last=true"], paper=False)
    reference = throughput.with_settings(throughput.load_config_for(cfg, "kd"), **throughput.REFERENCE)
    assert (reference.precision, reference.channels_last, reference.method.name) == ("fp32", False, "kd")
    assert cfg.student.pretrained is None and int(cfg.dataset.num_classes) == 7  # the profile's classes
