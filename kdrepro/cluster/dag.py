"""The stages of ``dvc.yaml`` that a launch must run, in dependency order, read through DVC's own index."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

#: kdrepro commands that train or time models: their jobs get the profile's GPUs (torchrun inside for several).
ACCELERATED_COMMANDS = frozenset({"train", "teacher", "calibrate"})
#: commands that use one accelerator at most (backbone pre-training of the embedded profiles, ImageNet copies).
SINGLE_DEVICE_COMMANDS = frozenset({"pretrain"})


@dataclass(frozen=True)
class Stage:
    """One DVC stage as a job: its name (``compute_matched@kd``), command and the stages it waits for."""

    name: str
    command: str
    upstream: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``train`` (the profile's GPUs), ``single`` (one GPU at most) or ``light`` (CPU only)."""
        words = shlex.split(self.command)
        subcommand = words[1] if len(words) > 1 and Path(words[0]).name == "kdrepro" else ""
        if subcommand in ACCELERATED_COMMANDS:
            return "train"
        return "single" if subcommand in SINGLE_DEVICE_COMMANDS else "light"

    @property
    def exclusive(self) -> bool:
        """The calibration times methods against each other: nothing else may load the machine meanwhile."""
        return shlex.split(self.command)[1:2] == ["calibrate"]


def stages_to_run(root: Path, force: bool = False, targets: list[str] | tuple[str, ...] = ()) -> list[Stage]:
    """Every stage that is out of date and every stage downstream of one, upstream first (DVC's order); with
    ``targets`` (stage names, as ``dvc repro <targets>``) only those and what they depend on.

    A downstream stage whose inputs turn out unchanged after its upstream ran is a no-op job: ``dvc repro`` inside it
    says "didn't change, skipping", exactly as a sequential ``dvc repro`` would."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            graph = graph.subgraph(_with_upstream(graph, targets))
        order = list(reversed(list(nx.topological_sort(graph))))
        changed = {stage for stage in order if force or stage.changed()}
        selected = set(changed)
        for stage in changed:
            selected |= nx.ancestors(graph, stage)
        return [
            Stage(stage.addressing, stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                  tuple(sorted(dep.addressing for dep in graph.successors(stage) if dep in selected)))
            for stage in order if stage in selected and getattr(stage, "cmd", None)
        ]


def _with_upstream(graph, targets: list[str] | tuple[str, ...]) -> set:
    import networkx as nx

    from kdrepro.errors import ConfigError

    by_name = {stage.addressing: stage for stage in graph.nodes}
    unknown = [name for name in targets if name not in by_name]
    if unknown:
        raise ConfigError(f"no stage named {', '.join(unknown)} in dvc.yaml; `dvc stage list` shows the names")
    chosen = set()
    for name in targets:
        chosen |= {by_name[name], *nx.descendants(graph, by_name[name])}
    return chosen


def downstream(stages: list[Stage], failed: str) -> set[str]:
    """The stages that (transitively) depend on ``failed``."""
    waiting, found = [failed], set()
    while waiting:
        name = waiting.pop()
        for stage in stages:
            if name in stage.upstream and stage.name not in found:
                found.add(stage.name)
                waiting.append(stage.name)
    return found
