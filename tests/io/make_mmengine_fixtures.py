"""Write the checkpoint fixtures of ``tests/io/test_mmengine_checkpoints.py`` with real OpenMMLab code.

The fixtures are files that mmsegmentation 1.x users actually hold:

* ``mmengine_runner_iter2.pth``: what an mmengine 0.10.7 ``Runner`` (the engine mmsegmentation 1.x trains with)
  writes through its ``CheckpointHook``: ``meta``, ``state_dict``, ``message_hub`` (``HistoryBuffer`` objects whose
  ``statistics_methods`` pickle as ``getattr(HistoryBuffer, 'min')``), ``optimizer`` and ``param_schedulers``.
* ``mmseg1_published.pth``: that file passed through mmsegmentation 1.2.2's ``tools/misc/publish_model.py``
  (``process_checkpoint``, loaded from the file the mmsegmentation wheel ships as ``mmseg/.mim/tools/...``).
* ``expected_state.pt``: the trained weights as a plain tensor dict, and ``fixtures.json`` the model they belong to.

The model is kdrepro's own segmentor (width 4, so the files stay small) inside an mmengine ``BaseModel``, so the
state-dict keys are the mmseg ``EncoderDecoder`` names kdrepro imports. Regenerate (only needed when the fixture
format changes) in any environment with mmengine; nothing in it is needed by the tests themselves::

    pip install --target /tmp/mm mmengine==0.10.7 opencv-python-headless addict yapf termcolor rich
    pip download --no-deps mmsegmentation==1.2.2 -d /tmp/mmseg && unzip -o /tmp/mmseg/*.whl 'mmseg/.mim/*' -d /tmp/mmseg
    PYTHONPATH=/tmp/mm:. python tests/io/make_mmengine_fixtures.py /tmp/mmseg/mmseg/.mim/tools/misc/publish_model.py
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_CFG = {"name": "pspnet_r18", "arch": "pspnet", "depth": 18, "base_width": 4, "stem": "deep",
             "head_channels": 128, "aux_channels": 64, "dropout": 0.1, "pretrained": None}  # fmt: skip
NUM_CLASSES = 7


def segmentor_model() -> torch.nn.Module:
    """An mmengine ``BaseModel`` whose children are kdrepro's segmentor's (mmseg key names)."""
    from mmengine.model import BaseModel

    from kdrepro.models import build_segmentor

    class TinySegmentor(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            segmentor = build_segmentor(dict(MODEL_CFG), NUM_CLASSES)
            for name, child in segmentor.named_children():  # the same modules: mmseg's state-dict keys
                self.add_module(name, child)
            object.__setattr__(self, "segmentor", segmentor)

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor, mode: str = "loss") -> dict[str, torch.Tensor]:
            logits = self.segmentor(inputs).logits
            logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
            return {"loss": torch.nn.functional.cross_entropy(logits, labels)}

    return TinySegmentor()


def _dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"inputs": torch.randn(3, 32, 32, generator=generator),
             "labels": torch.randint(0, NUM_CLASSES, (32, 32), generator=generator)} for _ in range(4)]  # fmt: skip


def train_runner(work_dir: Path) -> Path:
    """Two SGD iterations (mmsegmentation's optimiser and poly schedule) with mmengine's Runner; its checkpoint."""
    from mmengine.runner import Runner

    runner = Runner(
        model=segmentor_model(), work_dir=str(work_dir), experiment_name="fixture",
        train_dataloader={"dataset": _dataset(), "sampler": {"type": "DefaultSampler", "shuffle": False},
                          "batch_size": 2, "collate_fn": {"type": "default_collate"}},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}},
        param_scheduler=[{"type": "PolyLR", "eta_min": 1e-4, "power": 0.9, "begin": 0, "end": 2, "by_epoch": False}],
        train_cfg={"type": "IterBasedTrainLoop", "max_iters": 2},
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 2, "by_epoch": False},
                       "logger": {"type": "LoggerHook", "interval": 1}},
        default_scope="mmengine", randomness={"seed": 0},
    )  # fmt: skip
    runner.train()
    return work_dir / "iter_2.pth"


def publish(publish_model: Path, checkpoint: Path, work_dir: Path) -> Path:
    """mmsegmentation's ``process_checkpoint`` on ``checkpoint`` (torch.load as the torch < 2.6 it was written for)."""
    spec = importlib.util.spec_from_file_location("mmseg_publish_model", publish_model)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.torch = type(sys)("torch_for_publish")
    module.torch.load = functools.partial(torch.load, weights_only=False)  # the default before torch 2.6
    module.torch.save = torch.save
    module.process_checkpoint(str(checkpoint), str(work_dir / "published.pth"))
    for _ in range(100):  # process_checkpoint renames the file with `mv` in the background
        found = sorted(work_dir.glob("published-*.pth"))
        if found:
            return found[0]
        time.sleep(0.1)
    raise RuntimeError("publish_model wrote no published-<sha>.pth")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("publish_model", type=Path, help="mmseg/.mim/tools/misc/publish_model.py of mmsegmentation 1.x")
    arguments = parser.parse_args()
    import mmengine

    FIXTURES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work_dir = Path(folder)
        runner_file = train_runner(work_dir)
        published = publish(arguments.publish_model, runner_file, work_dir)
        shutil.copy(runner_file, FIXTURES / "mmengine_runner_iter2.pth")
        shutil.copy(published, FIXTURES / "mmseg1_published.pth")
        state = torch.load(runner_file, weights_only=False)["state_dict"]
    torch.save({key: value.clone() for key, value in state.items()}, FIXTURES / "expected_state.pt")
    info = {"mmengine": mmengine.__version__, "mmsegmentation_publish_model": "1.2.2", "torch": torch.__version__,
            "model_cfg": MODEL_CFG, "num_classes": NUM_CLASSES}  # fmt: skip
    (FIXTURES / "fixtures.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"fixtures written to {FIXTURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
