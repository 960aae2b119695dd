"""Seeds as an axis of the experiment: one run per seed, with common random numbers across methods.

``kdrepro train seeds=[0,1,2] out_dir=<folder>`` trains ``<folder>/seed0``, ``seed1``, ``seed2`` one after the other
in one process (a DVC stage pays its imports once). Seed ``s`` fixes the student's initialisation (the student is
built first, right after ``torch.manual_seed(s)``) and the data stream (a pure function of ``(s, epoch, index)``), so
every method sees the same initial student and the same batches and method differences are *paired* by seed. Each
seed's run is an ordinary resumable run: an interrupted stage continues with the seed it stopped in, and finished
seeds are no-ops. Without ``seeds`` the command trains one run with ``seed`` into ``out_dir``, as before.

``eval_points=n`` evaluates validation mIoU at ``n`` evenly spaced points of the run's iteration budget (besides the
final evaluation, :func:`kdrepro.train.run.evaluation_steps`), so the reports can draw learning curves.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, open_dict

from kdrepro.errors import ConfigError
from kdrepro.pipeline.layout import seed_dir


def seed_list(cfg: DictConfig) -> list[int] | None:
    """``cfg.seeds`` as a list of distinct non-negative ints (None when not set)."""
    seeds = cfg.get("seeds")
    if seeds is None:
        return None
    if not isinstance(seeds, (list, ListConfig)) or not seeds:
        raise ConfigError(f"seeds must be a non-empty list such as seeds=[0,1,2], got {seeds!r}")
    values = []
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seeds must be whole numbers >= 0, got {seed!r}; e.g. seeds=[0,1,2]")
        values.append(int(seed))
    if len(set(values)) != len(values):
        raise ConfigError(f"seeds lists a seed twice: {values}; list each seed once")
    return values


def check_eval_points(cfg: DictConfig) -> None:
    """Refuse an ``eval_points`` that cannot be placed: negative, or without an iteration budget (the points are
    fractions of the run's iterations). A run keeps ``eval_points`` in its config: it is part of the run's identity,
    so changing it retrains the run (its learning curve changes)."""
    points = int(cfg.get("eval_points") or 0)
    if points < 0:
        raise ConfigError(f"eval_points must be >= 0, got {points}")
    if points > 0 and str(cfg.budget.get("kind")) == "seconds":
        raise ConfigError("eval_points needs an iteration budget (budget=iterations or budget=calibrated); use eval_every")


def per_seed_configs(cfg: DictConfig) -> list[DictConfig]:
    """One config per seed: ``seed=s``, ``out_dir=<out_dir>/seed<s>`` (or ``[cfg]`` when ``seeds`` is not set)."""
    check_eval_points(cfg)
    seeds = seed_list(cfg)
    if seeds is None:
        return [cfg.copy()]
    configs = []
    for seed in seeds:
        run_cfg = cfg.copy()
        with open_dict(run_cfg):
            run_cfg.seed = seed
            run_cfg.seeds = None
            run_cfg.out_dir = str(seed_dir(cfg.out_dir, seed))
        configs.append(run_cfg)
    return configs


def train_seeds(cfg: DictConfig) -> list[dict[str, Any]]:
    """Train (or resume, or skip when finished) every seed's run of ``cfg``; their final metrics, in seed order.

    Each run resolves its budget on the device it trains on (a calibration measured on another device type is
    refused there); :func:`kdrepro.train.budget.resolve_budget` says what it has to say about a budget once per
    process, not once per seed."""
    from kdrepro.train.run import train

    return [train(run_cfg) for run_cfg in per_seed_configs(cfg)]
