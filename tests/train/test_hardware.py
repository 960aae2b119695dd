"""`precision: auto` / `channels_last: auto`: capability first, then a measurement, decided once per pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.config import load_config
from kdrepro.errors import ConfigError
from kdrepro.train import hardware
from kdrepro.train.hardware import apply_speed, choose, decide, measure_steps, write_decision
from kdrepro.train.speed_choice import runs_speed_choice, speed_sentence

AUTO = ["precision=auto", "channels_last=auto"]


def _cfg(tiny_dataset, *extra: str):
    return load_config([*tiny_dataset, *AUTO, *extra])


def _fake_measure(seconds: dict[tuple[str, bool], float], asked: list | None = None):
    """A measurement whose every workload of a candidate takes ``seconds[candidate]``."""

    def measure(options):
        if asked is not None:
            asked.extend(options)
        return {c: {w: [seconds[c]] * 3 for w in hardware.WORKLOADS} for c in options}

    return measure


@pytest.fixture
def bf16_native(monkeypatch):
    def set_native(value: bool) -> None:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: value)

    return set_native


FAST_BF16 = {("fp32", False): 1.0, ("fp32", True): 1.0, ("bf16", False): 0.5, ("bf16", True): 0.5}
SLOW_BF16 = {("fp32", False): 1.0, ("fp32", True): 1.0, ("bf16", False): 7.0, ("bf16", True): 7.0}


def test_without_native_bf16_auto_picks_fp32_and_never_measures_bf16(tiny_dataset, bf16_native):
    bf16_native(False)
    asked: list = []
    decision, _ = decide(_cfg(tiny_dataset), "cpu", _fake_measure(FAST_BF16, asked))
    assert decision["precision"] == "fp32"
    assert "no native bf16" in decision["reason"]["precision"]
    assert asked and all(precision == "fp32" for precision, _ in asked)  # only the layout was measured


def test_native_bf16_measured_faster_picks_bf16(tiny_dataset, bf16_native):
    bf16_native(True)
    decision, measurements = decide(_cfg(tiny_dataset), "cpu", _fake_measure(FAST_BF16))
    assert decision["precision"] == "bf16" and decision["channels_last"] is False
    assert decision["reason"]["precision"].startswith("bf16: native")
    assert measurements["chosen"] == "bf16/nchw" and measurements["margin"] == hardware.MARGIN


def test_native_bf16_measured_slower_picks_fp32(tiny_dataset, bf16_native):
    bf16_native(True)
    decision, _ = decide(_cfg(tiny_dataset), "cpu", _fake_measure(SLOW_BF16))
    assert decision["precision"] == "fp32"
    assert "not measured" in decision["reason"]["precision"]


def test_channels_last_only_when_it_pays_more_than_the_margin():
    scores = {("fp32", False): 1.0, ("fp32", True): 0.97}  # 3 % faster: within the margin, the plain layout stays
    assert choose(scores) == ("fp32", False)
    assert choose({("fp32", False): 1.0, ("fp32", True): 0.8}) == ("fp32", True)


def test_previous_choice_is_kept_while_within_the_margin():
    scores = {("fp32", False): 1.0, ("bf16", True): 1.03}
    assert choose(scores, previous=("bf16", True)) == ("bf16", True)
    assert choose({("fp32", False): 1.0, ("bf16", True): 1.2}, previous=("bf16", True)) == ("fp32", False)


def test_explicit_settings_are_not_measured(tiny_dataset):
    cfg = load_config([*tiny_dataset, "precision=bf16", "channels_last=true", "threads=1"])
    decision, measurements = decide(cfg, "cpu", measure=lambda options: pytest.fail("measured an explicit setting"))
    assert (decision["precision"], decision["channels_last"], decision["threads"]) == ("bf16", True, 1)
    assert decision["reason"]["precision"] == "bf16: set in the config" and measurements == {}


def test_threads_auto_is_the_cores_this_process_may_use(tiny_dataset):
    decision, _ = decide(load_config([*tiny_dataset, "threads=auto"]), "cpu")
    assert decision["threads"] == hardware.available_cores() >= 1


def test_real_measurement_times_every_workload_of_every_candidate(tiny_dataset):
    cfg = load_config([*tiny_dataset, "precision=fp32", "channels_last=auto", "teacher.base_width=8"])
    options = hardware.candidates(cfg, "cpu")
    assert options == [("fp32", False), ("fp32", True)]
    times = measure_steps(cfg, "cpu", options, rounds=2, warmup=0)
    assert set(times) == set(options)
    for candidate in options:
        assert set(times[candidate]) == set(hardware.WORKLOADS)
        assert all(len(values) == 2 and all(v > 0 for v in values) for values in times[candidate].values())
    assert torch.get_num_threads() == 2  # restored after measuring on one thread


def test_decision_file_is_byte_identical_when_the_choice_holds(tiny_dataset, tmp_path, monkeypatch, bf16_native):
    bf16_native(True)
    path = tmp_path / "hardware.json"
    cfg = _cfg(tiny_dataset, f"speed.file={path}")

    def measuring(seconds):
        monkeypatch.setattr(hardware, "measure_steps", lambda cfg, device, options: _fake_measure(seconds)(options))

    measuring(FAST_BF16)
    write_decision(cfg)
    first = path.read_bytes()
    measurements = json.loads(hardware.measurements_path(path).read_text())
    assert measurements["machine"]["cpu"] and "seconds" in measurements  # the raw numbers live beside it
    monkeypatch.setattr(hardware, "measure_steps", lambda *args: pytest.fail("re-measured a decision of this machine"))
    assert write_decision(cfg)[0]["precision"] == "bf16"  # the next `dvc repro`: kept, not measured
    measuring({**FAST_BF16, ("fp32", False): 0.51})  # measured again, bf16 now only 2 % faster: the choice stays
    write_decision(_cfg(tiny_dataset, f"speed.file={path}", "speed.remeasure=true"))
    assert path.read_bytes() == first and json.loads(first)["precision"] == "bf16"
    measuring(SLOW_BF16)  # another config (here: the batch) is decided afresh
    assert write_decision(_cfg(tiny_dataset, f"speed.file={path}", "loader.batch_size=4"))[0]["precision"] == "fp32"


def test_apply_speed_reads_the_pipeline_decision(tiny_dataset, tmp_path):
    path = tmp_path / "hardware.json"
    decision = {"precision": "bf16", "channels_last": True, "threads": 2,
                "reason": {"precision": "bf16: native", "channels_last": "channels_last: faster", "threads": "cores"}}
    path.write_text(json.dumps(decision))
    cfg = apply_speed(_cfg(tiny_dataset, f"speed.file={path}"))
    assert (cfg.precision, cfg.channels_last) == ("bf16", True)
    choice = OmegaConf.to_container(cfg.speed.choice)
    assert choice["reason"]["precision"] == "bf16: native" and choice["reason"]["threads"] == "set in the config"  # the profile's threads: 2


def test_a_missing_decision_file_is_one_line_naming_the_stage(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="kdrepro hardware") as error:
        apply_speed(_cfg(tiny_dataset, f"speed.file={tmp_path / 'missing.json'}"))
    assert "\n" not in str(error.value)


def test_training_records_the_choice(tiny_dataset, tmp_path):
    from kdrepro.train.run import train

    path = tmp_path / "hardware.json"
    path.write_text(json.dumps({"precision": "fp32", "channels_last": False, "threads": None,
                                "reason": {"precision": "fp32: no native bf16", "channels_last": "NCHW: not faster",
                                           "threads": "torch's default"}}))  # fmt: skip
    out = tmp_path / "run"
    metrics = train(_cfg(tiny_dataset, "method=none", "budget.iterations=2", f"speed.file={path}", f"out_dir={out}"))
    assert metrics["speed"]["reason"]["precision"] == "fp32: no native bf16"
    assert json.loads((out / "metrics.json").read_text())["speed"]["precision"] == "fp32"
    assert "precision: fp32" in (out / "config.yaml").read_text()  # the folder's config holds the setting used


def test_speed_sentence_states_settings_and_reasons():
    choice = {"precision": "fp32", "channels_last": False, "threads": 2,
              "reason": {"precision": "fp32: this machine has no native bf16", "channels_last": "NCHW: set in the config",
                         "threads": "set in the config"}}  # fmt: skip
    assert speed_sentence(choice) == ("Speed settings: fp32 (this machine has no native bf16), NCHW (set in the config), "
                                      "2 threads (set in the config).")  # fmt: skip
    assert speed_sentence({**choice, "threads": 1}).endswith("NCHW (set in the config), 1 thread (set in the config).")
    assert speed_sentence(None) == ""
    mixed = runs_speed_choice([choice, {**choice, "precision": "bf16"}, None])
    assert mixed["mixed"] and "differ between" in speed_sentence(mixed)
    assert runs_speed_choice([choice, dict(choice)]) == choice


def test_auto_is_decided_in_the_process_once_and_never_reaches_a_trainer(tiny_dataset, monkeypatch, bf16_native):
    from kdrepro.train.trainer import Trainer

    bf16_native(True)
    calls: list = []
    monkeypatch.setattr(hardware, "measure_steps", lambda cfg, device, options: _fake_measure(FAST_BF16, calls)(options))
    hardware._decided_here.cache_clear()
    first = apply_speed(load_config([*tiny_dataset, *AUTO, "method=none"]))
    second = apply_speed(load_config([*tiny_dataset, *AUTO, "method=kd", "seed=5"]))
    hardware._decided_here.cache_clear()
    assert first.precision == second.precision == "bf16" and first.channels_last is second.channels_last is False
    assert len(calls) == 4  # one measurement of the four candidates, shared (another seed or method: the same cost)
    assert apply_speed(first) is first  # applying twice changes nothing
    with pytest.raises(ConfigError, match=r"precision, channels_last=auto is not decided yet; call .*apply_speed"):
        Trainer(load_config([*tiny_dataset, *AUTO, "method=none"]), torch.device("cpu"))


def test_reports_state_the_choice_in_the_regime_line_and_table_1_caption():
    from kdrepro.report.matched import regime_line, table1_caption

    choice = {"precision": "bf16", "channels_last": True, "threads": 2,
              "reason": {"precision": "bf16: native on this machine and measured faster than fp32 here",
                         "channels_last": "channels_last: measured faster than NCHW here", "threads": "set in the config"}}  # fmt: skip
    sentence = speed_sentence(choice)
    assert sentence.startswith("Speed settings: bf16 autocast (native on this machine and measured faster than fp32")
    assert sentence in regime_line({"regime": {"profile": "synthetic", "seeds": [0], "speed": choice}})
    assert "Speed settings: bf16 autocast" in table1_caption("synthetic", 3, choice)
    assert "Speed settings" not in table1_caption("synthetic", 3)


#: the workloads disagree, as measured on the 2-core Xeon (width-8 student, width-16 teacher): the student's own step
#: is fastest in fp32 / channels_last, the kd and teacher steps in bf16 / channels_last
DISAGREE = {
    ("fp32", False): {"student": 60.6, "teacher": 357.2, "kd": 159.9},
    ("fp32", True): {"student": 51.6, "teacher": 362.1, "kd": 145.8},
    ("bf16", False): {"student": 59.8, "teacher": 352.0, "kd": 170.2},
    ("bf16", True): {"student": 56.2, "teacher": 293.2, "kd": 130.3},
}


def _measure_by_workload(seconds):
    return lambda options: {c: {w: [seconds[c][w]] * 3 for w in hardware.WORKLOADS} for c in options}


def test_each_role_takes_the_fastest_choice_of_its_own_workload(tiny_dataset, bf16_native):
    bf16_native(True)
    decision, measurements = decide(_cfg(tiny_dataset), "cpu", _measure_by_workload(DISAGREE))
    assert hardware.role_of(decision, "methods") == ("bf16", True) == (decision["precision"], decision["channels_last"])
    assert hardware.role_of(decision, "teacher") == ("bf16", True)
    assert hardware.role_of(decision, "student") == ("fp32", True)  # bf16 / channels_last is 9 % slower here
    assert "the student's training step" in decision["roles"]["student"]["reason"]["channels_last"]
    assert measurements["chosen_by_role"] == {"methods": "bf16/channels_last", "teacher": "bf16/channels_last",
                                              "student": "fp32/channels_last"}  # fmt: skip
    # every role's choice is within the margin of the fastest fixed choice on its workload
    for role, workload in hardware.ROLES.items():
        best = min(values[workload] for values in DISAGREE.values())
        assert DISAGREE[hardware.role_of(decision, role)][workload] <= best * (1 + hardware.MARGIN)


def test_a_role_keeps_the_methods_choice_unless_another_is_more_than_the_margin_faster(tiny_dataset, bf16_native):
    """Two clean runs here measured the student's step with bf16 1 % and 8 % faster than fp32: a role decided on its
    own flipped between them and changed the pre-trained backbone. Within the margin it now keeps the methods'."""
    bf16_native(True)
    close = {c: dict(times) for c, times in DISAGREE.items()}
    close[("bf16", True)]["student"] = close[("fp32", True)]["student"] * 1.03  # 3 % slower: inside the margin
    decision, measurements = decide(_cfg(tiny_dataset), "cpu", _measure_by_workload(close))
    assert hardware.role_of(decision, "student") == hardware.role_of(decision, "methods") == ("bf16", True)
    reason = decision["roles"]["student"]["reason"]["precision"]
    assert reason == "bf16/channels_last: the methods' choice; no other measured more than 5% faster here on the student's training step"
    assert measurements["chosen_by_role"]["student"] == "bf16/channels_last"
    # bf16 3 % faster: the same choice and the same reason (the decision file's bytes depend on the choices only)
    close[("bf16", True)]["student"] = close[("fp32", True)]["student"] * 0.97
    again, _ = decide(_cfg(tiny_dataset), "cpu", _measure_by_workload(close))
    assert again["roles"] == decision["roles"]


def test_a_run_takes_its_roles_choice_and_only_method_runs_make_the_pipelines_choice(tiny_dataset, tmp_path, bf16_native):
    bf16_native(True)
    path = tmp_path / "hardware.json"
    decision, _ = decide(_cfg(tiny_dataset), "cpu", _measure_by_workload(DISAGREE))
    path.write_text(json.dumps(decision))
    method = apply_speed(_cfg(tiny_dataset, f"speed.file={path}"))
    student = apply_speed(_cfg(tiny_dataset, f"speed.file={path}", "speed.role=student"))
    assert (method.precision, method.channels_last) == ("bf16", True) and "role" not in method.speed.choice
    assert (student.precision, student.channels_last) == ("fp32", True) and student.speed.choice.role == "student"
    assert "student's training step" in student.speed.choice.reason.precision
    choices = [OmegaConf.to_container(c.speed.choice) for c in (method, student)]
    assert runs_speed_choice(choices) == choices[0]  # the student backbone's pre-training is not a mix
    with pytest.raises(ConfigError, match="speed.role='nobody' is not a role") as error:
        apply_speed(_cfg(tiny_dataset, f"speed.file={path}", "speed.role=nobody"))
    assert "\n" not in str(error.value)


def test_the_teacher_and_the_backbones_pre_training_name_their_role(tiny_dataset, tmp_path, monkeypatch):
    from kdrepro.train import teacher as teacher_stage
    from kdrepro.train.pretrain import pretraining_run

    cfg = _cfg(tiny_dataset)
    assert pretraining_run(cfg, "student", tmp_path).speed.role == "student"
    assert pretraining_run(cfg, "teacher", tmp_path).speed.role == "teacher"
    trained = []
    monkeypatch.setattr(teacher_stage, "train_seeds", lambda run: trained.append(run) or [{}])
    teacher_stage.teacher([*tiny_dataset, *AUTO, f"out_dir={tmp_path / 'teacher'}"])
    assert trained[0].speed.role == "teacher" and cfg.speed.role is None  # the methods' runs: the default role


def test_a_decision_from_before_the_roles_is_made_again(tiny_dataset, tmp_path, monkeypatch, bf16_native):
    bf16_native(True)
    path = tmp_path / "hardware.json"
    cfg = _cfg(tiny_dataset, f"speed.file={path}")
    monkeypatch.setattr(hardware, "measure_steps", lambda cfg, device, options: _measure_by_workload(DISAGREE)(options))
    decision, _ = write_decision(cfg)
    old = {key: decision[key] for key in ("precision", "channels_last", "threads", "reason")}  # no roles
    path.write_text(json.dumps(old))
    again, _ = write_decision(cfg)  # same machine, same config: kept only when it holds the roles
    assert hardware.role_of(again, "student") == ("fp32", True) and "roles" in json.loads(path.read_text())
