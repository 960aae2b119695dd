"""Every checkpoint format mmsegmentation writes imports without executing anything; other files are refused."""

from __future__ import annotations

import os
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrepro.cli import main
from kdrepro.errors import WeightsError
from kdrepro.io import Opaque, load_checkpoint, read_torch_file, save_checkpoint
from kdrepro.models import build_segmentor
from kdrepro.models.weights import import_mmseg_checkpoint

CONF = Path(__file__).resolve().parents[2] / "kdrepro" / "conf"

FAKE_MODULES = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")
MODEL_CFG = {**OmegaConf.to_container(OmegaConf.load(CONF / "model" / "pspnet_r18.yaml")), "base_width": 8}


def tiny_model() -> torch.nn.Module:
    return build_segmentor(dict(MODEL_CFG), num_classes=19)


def mmseg_state(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (key, torch.randn(value.shape, generator=generator) if value.is_floating_point() else value + 5)
        for key, value in tiny_model().state_dict().items()
    )


def optimizer_state(state: dict[str, torch.Tensor]) -> dict:
    return {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.01, "params": [0]}]}


def mmseg0_full(state: dict) -> dict:
    """mmcv 1.x ``save_checkpoint`` of mmseg 0.x, with the best-checkpoint hook's NumPy score in ``meta``."""
    meta = {"mmseg_version": "0.30.0", "CLASSES": ("road", "sidewalk"), "PALETTE": [[128, 64, 128]], "iter": 80000,
            "hook_msgs": {"best_score": np.float64(0.7976), "best_ckpt": "best_mIoU_iter_80000.pth",
                          "history": np.array([0.5, 0.7], dtype=np.float32)}}
    return {"meta": meta, "state_dict": state, "optimizer": optimizer_state(state)}


def mmseg0_published(state: dict) -> dict:
    """mmseg's ``publish_model``: the optimizer dropped."""
    return {"meta": {"CLASSES": ("road",), "mmseg_version": "0.11.0"}, "state_dict": state}


def mmseg1_runner(state: dict) -> dict:
    """An mmengine runner checkpoint: ``message_hub`` holds ``HistoryBuffer`` objects (mmengine is not installed)."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self) -> None:
            self.max_length = 1000000
            self._log_history = np.array([1.2, 0.9])
            self._count_history = np.array([1, 1])

    HistoryBuffer.__module__ = module.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in FAKE_MODULES[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    hub = {"log_scalars": {"train/loss": HistoryBuffer()}, "runtime_info": {"iter": 160000, "best_score": np.float32(0.44)},
           "resumed_keys": {"iter": True}}
    data_preprocessor = {"data_preprocessor.mean": torch.zeros(3, 1, 1), "data_preprocessor.std": torch.ones(3, 1, 1)}
    return {"meta": {"epoch": 0, "iter": 160000, "dataset_meta": {"classes": ("wall",)}},
            "state_dict": OrderedDict({**data_preprocessor, **state}), "message_hub": hub,
            "optimizer": optimizer_state(state), "param_schedulers": [{"eta_min": 1e-4, "power": 0.9}]}


def save(obj: dict, path: Path, legacy: bool) -> Path:
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)
    return path


@pytest.mark.parametrize("build", [mmseg0_full, mmseg0_published, mmseg1_runner])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_mmseg_formats_import_bit_exact(tmp_path, build, legacy):
    state = mmseg_state()
    path = save(build(state), tmp_path / "teacher.pth", legacy)
    model = tiny_model()
    import_mmseg_checkpoint(path, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert "mmengine" not in sys.modules  # nothing imported it while reading


def test_placeholders_keep_data_and_numpy_values_are_real(tmp_path):
    loaded = read_torch_file(save(mmseg1_runner(mmseg_state()), tmp_path / "runner.pth", legacy=False))
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, Opaque) and type(buffer).__qualname__ == "HistoryBuffer"
    assert np.array_equal(buffer.state["_log_history"], [1.2, 0.9])
    assert loaded["message_hub"]["runtime_info"]["best_score"] == np.float32(0.44)
    meta = read_torch_file(save(mmseg0_full(mmseg_state()), tmp_path / "full.pth", legacy=True))["meta"]
    assert meta["hook_msgs"]["best_score"] == np.float64(0.7976)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": mmseg_state(), "meta": {"x": Exploit(marker)}}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match=r"refused: it would call (os|posix)\.system"):
        read_torch_file(path)
    with pytest.raises(WeightsError, match="refused"):
        import_mmseg_checkpoint(path, tiny_model())
    assert not marker.exists()


def test_garbage_and_missing_files_are_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "random.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint"):
        read_torch_file(garbage)
    truncated = tmp_path / "truncated.pth"
    torch.save(mmseg_state(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint|not a PyTorch checkpoint"):
        read_torch_file(truncated)
    code = main(["import-teacher", str(garbage), f"import_teacher.output={tmp_path / 'out.pt'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a PyTorch checkpoint" in err
    assert not (tmp_path / "out.pt").exists()


def test_kdrepro_checkpoints_load_with_weights_only(tmp_path):
    from kdrepro.train.checkpoint import rng_state

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": tiny_model().state_dict(), "rng": rng_state(), "num_classes": 19}, path)
    plain = torch.load(path, weights_only=True)
    assert plain["num_classes"] == 19
    assert load_checkpoint(path)["rng"]["numpy"][0] == "MT19937"


def test_import_teacher_cli_writes_a_loadable_teacher(tmp_path, capsys):
    source = save(mmseg1_runner(mmseg_state(3)), tmp_path / "runner.pth", legacy=False)
    output = tmp_path / "teacher" / "checkpoint.pt"
    overrides = ["model@teacher=pspnet_r18", "teacher.base_width=8", "dataset.label_set=classes", "dataset.num_classes=19",
                 f"import_teacher.output={output}"]  # fmt: skip
    assert main(["import-teacher", str(source), *overrides]) == 0, capsys.readouterr().err
    teacher = torch.load(output, weights_only=True)
    assert torch.equal(teacher["model"]["decode_head.conv_seg.weight"], mmseg_state(3)["decode_head.conv_seg.weight"])
