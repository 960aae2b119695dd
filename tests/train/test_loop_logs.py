"""What a method's extra step and pre-training step return is logged (dvclive), as the Distiller contract promises."""

from __future__ import annotations

from pathlib import Path

from kdrepro.config import load_config
from kdrepro.train.run import train


def rows(out: Path, metric: str) -> list[list[str]]:
    table = out / "dvclive" / "plots" / "metrics" / f"{metric}.tsv"
    return [line.split("\t") for line in table.read_text().splitlines()[1:]]


def test_skd_critic_loss_and_maskd_pretraining_are_logged(tiny_teacher, tmp_path):
    skd = tmp_path / "skd"
    train(load_config([*tiny_teacher, "method=skd", "budget.iterations=2", f"out_dir={skd}"]))
    critic = rows(skd, "train/skd.d_loss")
    assert [row[0] for row in critic] == ["1", "2"] and all(float(row[1]) == float(row[1]) for row in critic)
    assert rows(skd, "train/skd.d_lr")

    maskd = tmp_path / "maskd"
    train(load_config([*tiny_teacher, "method=maskd", "method.terms.maskd.pretrain_iterations=2", "budget.iterations=1",
                       f"out_dir={maskd}"]))
    assert [row[0] for row in rows(maskd, "pretrain/maskd.mask_task_loss")] == ["1", "2"]
    assert rows(maskd, "train/ce")
