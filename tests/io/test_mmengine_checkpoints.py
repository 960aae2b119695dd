"""Files written by real OpenMMLab code import safely: an mmengine 0.10.7 runner checkpoint (the format
mmsegmentation 1.x trains into) and its mmsegmentation 1.2.2 ``publish_model`` output. The fixtures and the script
that wrote them (``make_mmengine_fixtures.py``) live beside this file; mmengine itself is not needed here."""

from __future__ import annotations

import json
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from kdrepro.errors import WeightsError
from kdrepro.io import Opaque, read_torch_file
from kdrepro.models import build_segmentor
from kdrepro.models.weights import import_mmseg_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
INFO = json.loads((FIXTURES / "fixtures.json").read_text())
REAL_FILES = ("mmengine_runner_iter2.pth", "mmseg1_published.pth")


def fixture_model() -> torch.nn.Module:
    return build_segmentor(dict(INFO["model_cfg"]), INFO["num_classes"])


def test_fixtures_were_written_by_real_openmmlab_code():
    assert INFO["mmengine"] == "0.10.7" and INFO["mmsegmentation_publish_model"].startswith("1.")
    runner = read_torch_file(FIXTURES / REAL_FILES[0])
    assert {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"} <= set(runner)
    assert "optimizer" not in read_torch_file(FIXTURES / REAL_FILES[1])  # what publish_model removes


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_mmengine_files_import_bit_exact_without_importing_mmengine(name):
    expected = torch.load(FIXTURES / "expected_state.pt", weights_only=True)
    model = fixture_model()
    import_mmseg_checkpoint(FIXTURES / name, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert "mmengine" not in sys.modules


@pytest.mark.parametrize("name", REAL_FILES)
def test_message_hub_statistics_methods_become_placeholders(name):
    """``statistics_methods = {'min': HistoryBuffer.min, ...}`` pickles as ``getattr(HistoryBuffer, 'min')``."""
    hub = read_torch_file(FIXTURES / name)["message_hub"]
    buffer = hub["log_scalars"]["train/loss"]
    assert isinstance(buffer, Opaque) and type(buffer).__qualname__ == "HistoryBuffer"
    methods = buffer.state["statistics_methods"]
    assert set(methods) == {"min", "max", "current", "mean"}
    assert issubclass(methods["min"], Opaque) and methods["min"].__qualname__ == "HistoryBuffer.min"
    assert len(buffer.state["_log_history"]) == 2  # two logged iterations


class GetattrOf:
    """Pickles as ``getattr(owner, name)``: how a protocol-2 pickle spells a nested name."""

    def __init__(self, owner: object, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


@pytest.mark.parametrize("owner, name", [(OrderedDict, "fromkeys"), (torch.Tensor, "__setstate__"), ("text", "upper")])
def test_getattr_of_anything_but_a_placeholder_is_refused_with_the_resave_line(tmp_path, owner, name):
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": {}, "meta": {"x": GetattrOf(owner, name)}}, path, pickle_protocol=2)
    with pytest.raises(WeightsError) as caught:
        read_torch_file(path)
    message = str(caught.value)
    assert "refused: it would call builtins.getattr" in message and "\n" not in message
    assert "re-save its weights alone" in message and "torch.save(c.get('state_dict', c), 'weights.pth')" in message


def test_refused_file_names_how_to_resave_its_weights(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": pickle.loads(pickle.dumps(print))}, path)  # a global: builtins.print
    with pytest.raises(WeightsError, match=r"refused: it would call builtins\.print.*re-save its weights alone"):
        read_torch_file(path)
