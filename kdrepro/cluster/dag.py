"""The stages of ``dvc.yaml`` that a launch must run, in dependency order, read through DVC's own index.

An **always-changed** stage (``always_changed: true``, the ``hardware`` stage: it re-decides precision and layout on
the machine at hand) is out of date for DVC on every run, so taken at its word it would make every launch submit the
whole pipeline. ``dvc repro`` instead runs it and then judges the stages after it by their dependencies' hashes: they
rerun only if its output changed. A launch does the same in two rounds: an always-changed stage runs only as the
upstream of stages that are out of date anyway (never because of its own flag), alone with whatever out-of-date
stages it waits for; then the launch plans again, and DVC decides from the new hashes what is out of date.
"""

from __future__ import annotations

import shlex
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: kdrepro commands that train or time models: their jobs get the profile's GPUs (torchrun inside for several).
ACCELERATED_COMMANDS = frozenset({"train", "teacher", "calibrate"})
#: commands that use one accelerator at most: backbone pre-training of the embedded profiles, and the hardware
#: decision, which must be made on the device type the training jobs get (the same GPU constraint).
SINGLE_DEVICE_COMMANDS = frozenset({"pretrain", "hardware"})


@dataclass(frozen=True)
class Stage:
    """One DVC stage as a job: its name (``compute_matched@kd``), command and the stages it waits for."""

    name: str
    command: str
    upstream: tuple[str, ...]
    always_changed: bool = False

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


@dataclass(frozen=True)
class Plan:
    """The stages to run now, upstream first; ``replan``: after they finished, plan again (they include an
    always-changed stage, whose new output decides what else is out of date)."""

    stages: list[Stage]
    replan: bool = False


def select(graph: Any, stale: Iterable[Hashable], always: Iterable[Hashable], ran: Iterable[Hashable] = (),
           force: bool = False) -> tuple[set, bool]:
    """Which nodes of ``graph`` to run now, and whether to plan again after them.

    ``graph``: a networkx DiGraph whose edges point from a stage to the stages it depends on (DVC's index graph);
    ``stale``: the stages DVC finds changed; ``always``: the always-changed stages (stale by their flag alone, so
    never a reason to run anything); ``ran``: always-changed stages this launch already ran (their outputs are now
    what DVC compares against). Out-of-date stages and everything downstream of them run; if an always-changed stage
    that has not run is among them or upstream of them, only it and the out-of-date stages it waits for run first.
    """
    import networkx as nx

    if force:
        return set(graph.nodes), False
    always, ran = set(always), set(ran)
    chosen = set(stale) - always
    for stage in list(chosen):
        chosen |= nx.ancestors(graph, stage)  # ancestors: the stages that depend on it
    upstream = set().union(*(nx.descendants(graph, stage) for stage in chosen)) if chosen else set()
    first = (always - ran) & (chosen | upstream)
    if not first:
        return chosen - ran, False
    waited_for = set().union(*(nx.descendants(graph, stage) for stage in first))
    return first | (chosen & waited_for), True


def stages_to_run(root: Path, force: bool = False, targets: list[str] | tuple[str, ...] = (),
                  ran: Iterable[str] = ()) -> Plan:
    """The stages a launch runs now (of ``targets`` and what they depend on, if given, as ``dvc repro <targets>``):
    see :func:`select`; ``ran`` names the always-changed stages this launch has already run.

    A downstream stage whose inputs turn out unchanged after its upstream ran is a no-op job: ``dvc repro`` inside it
    says "didn't change, skipping", exactly as a sequential ``dvc repro`` would."""
    import contextlib

    import networkx as nx
    from dvc.repo import Repo

    # DVC names a stage relative to the working directory: the jobs run in ``root``, so plan from there
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        if targets:
            graph = graph.subgraph(_with_upstream(graph, targets))
        order = list(reversed(list(nx.topological_sort(graph))))
        always = {stage for stage in order if stage.always_changed}
        stale = set() if force else {stage for stage in order if stage not in always and stage.changed()}
        chosen, replan = select(graph, stale, always, {s for s in order if s.addressing in set(ran)}, force)
        stages = [
            Stage(stage.addressing, stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                  tuple(sorted(dep.addressing for dep in graph.successors(stage) if dep in chosen)),
                  bool(stage.always_changed))
            for stage in order if stage in chosen and getattr(stage, "cmd", None)
        ]
        return Plan(stages, replan)


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
