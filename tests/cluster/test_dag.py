"""Which stages a launch runs, with an always-changed stage (the pipeline's `hardware`): on constructed DAGs
(`select`), and on a small real DVC repository launched with local workers (stages that copy text files)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
import yaml

from kdrepro.cluster.dag import select, stages_to_run
from kdrepro.cluster.launch import launch

BIN = Path(sys.executable).parent

# dvc.yaml's shape, edges from a stage to what it depends on; `hardware` is always changed and decides for
# pretrain, teacher and the training stages
EDGES = {
    "data": [], "hardware": [], "pretrain": ["data", "hardware"], "teacher": ["pretrain", "hardware"],
    "calibrate": ["teacher", "hardware"], "student": ["pretrain", "hardware"], "kd": ["calibrate", "teacher"],
    "index": ["data"], "results": ["kd", "student"],
}  # fmt: skip
ALWAYS = {"hardware"}


def _graph(edges: dict[str, list[str]] = EDGES) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(edges)
    graph.add_edges_from((stage, dep) for stage, deps in edges.items() for dep in deps)
    return graph


def test_an_always_changed_stage_alone_runs_nothing():
    assert select(_graph(), stale=set(), always=ALWAYS) == (set(), False)
    # DVC reports it changed on every run; that is its flag, not a reason to run it or anything after it
    assert select(_graph(), stale={"hardware"}, always=ALWAYS) == (set(), False)


def test_it_runs_first_as_the_upstream_of_an_out_of_date_stage_then_dvc_decides():
    assert select(_graph(), stale={"student"}, always=ALWAYS) == ({"hardware"}, True)
    # its decision unchanged: only the out-of-date stage and its downstream
    assert select(_graph(), stale={"student"}, always=ALWAYS, ran={"hardware"}) == ({"student", "results"}, False)
    # its decision changed: DVC now finds every stage reading it out of date, and they all run
    after_change = {"pretrain", "teacher", "calibrate", "student", "kd", "results"}
    assert select(_graph(), stale=after_change, always=ALWAYS, ran={"hardware"}) == (after_change, False)


def test_it_does_not_run_for_a_branch_that_does_not_depend_on_it():
    assert select(_graph(), stale={"index"}, always=ALWAYS) == ({"index"}, False)


def test_it_runs_with_the_out_of_date_stages_it_waits_for_and_not_their_other_downstream():
    edges = {**EDGES, "hardware": ["data"]}  # a decision that reads the data
    assert select(_graph(edges), stale={"data"}, always=ALWAYS) == ({"data", "hardware"}, True)
    downstream_of_data = {"pretrain", "teacher", "calibrate", "student", "kd", "results", "index"}
    assert select(_graph(edges), stale=downstream_of_data, always=ALWAYS, ran={"hardware"}) == (downstream_of_data, False)


def test_force_runs_everything_in_one_round():
    assert select(_graph(), stale=set(), always=ALWAYS, force=True) == (set(EDGES), False)


# -- a real DVC repository, launched with local workers ----------------------------------------------------------------
COPY = f"{sys.executable} copy.py"
DVC_YAML = {
    "stages": {
        "hardware": {"cmd": f"{COPY} machine.txt decision.txt", "always_changed": True, "deps": ["copy.py"],
                     "outs": [{"decision.txt": {"cache": False, "persist": True}}]},
        "data": {"cmd": f"{COPY} data_input.txt data.txt", "deps": ["copy.py", "data_input.txt"], "outs": ["data.txt"]},
        "train": {"cmd": f"{COPY} train_input.txt model.txt data.txt decision.txt",
                  "deps": ["copy.py", "train_input.txt", "data.txt", "decision.txt"], "outs": ["model.txt"]},
        "evaluate": {"cmd": f"{COPY} decision.txt scores.txt", "deps": ["copy.py", "decision.txt"], "outs": ["scores.txt"]},
        "index": {"cmd": f"{COPY} data.txt index.txt", "deps": ["copy.py", "data.txt"], "outs": ["index.txt"]},
    }
}  # fmt: skip
# copy.py SOURCE TARGET [EXTRA...]: TARGET = the files' text; appends the target's name to ran.txt (untracked)
COPY_PY = """
    import sys
    from pathlib import Path
    Path(sys.argv[2]).write_text("".join(Path(name).read_text() for name in [sys.argv[1], *sys.argv[3:]]))
    with open("ran.txt", "a") as ran:
        ran.write(sys.argv[2] + "\\n")
"""


def _ran(repo: Path) -> list[str]:
    """The outputs written since the last call (each stage's command appends its target's name)."""
    path = repo / "ran.txt"
    names = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return sorted(names)


@pytest.fixture
def tiny_repo(tmp_path, monkeypatch) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (repo / "copy.py").write_text(textwrap.dedent(COPY_PY))
    (repo / "params.yaml").write_text("profile: smoke\n")
    for name in ("machine", "data_input", "train_input"):
        (repo / f"{name}.txt").write_text(f"{name} 1\n")
    (repo / ".gitignore").write_text("ran.txt\nlogs/\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, env=env)
    return repo


def _launch(repo: Path) -> str:
    lines: list[str] = []
    assert launch(repo, "local", 2, [], echo=lines.append) == 0, "\n".join(lines)
    return "\n".join(lines)


@pytest.mark.slow
def test_local_launch_runs_the_always_changed_stage_only_for_stages_that_run_and_dvc_decides_after_it(tiny_repo):
    repo = tiny_repo
    first = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert _ran(repo) == ["data.txt", "decision.txt", "index.txt", "model.txt", "scores.txt"]

    nothing = _launch(repo)  # everything recorded in dvc.lock: nothing is submitted, hardware included
    assert "nothing to run" in nothing and " job " not in nothing and _ran(repo) == []

    (repo / "train_input.txt").write_text("train 2\n")  # train is out of date; the decision stays the same
    second = _launch(repo)
    assert "hardware is always changed" in second and second.index("hardware") < second.index("train")
    assert _ran(repo) == ["decision.txt", "model.txt"]  # evaluate reads only the decision: DVC found it unchanged
    assert "nothing to run" in _launch(repo) and _ran(repo) == []

    (repo / "machine.txt").write_text("machine 2\n")  # another decision: DVC finds evaluate out of date after it
    (repo / "train_input.txt").write_text("train 3\n")
    _launch(repo)
    assert _ran(repo) == ["decision.txt", "model.txt", "scores.txt"]
    status = subprocess.run([str(BIN / "dvc"), "status", "train", "evaluate", "index"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

    (repo / "machine.txt").write_text("machine 3\n")  # a new decision alone is seen only when something runs
    assert "nothing to run" in _launch(repo) and _ran(repo) == []


def test_on_a_fresh_repository_the_always_changed_stage_runs_alone_first(tiny_repo):
    plan = stages_to_run(tiny_repo)  # train and evaluate lack its output: they are out of date, it is their upstream
    assert plan.replan and [(s.name, s.always_changed, s.upstream) for s in plan.stages] == [("hardware", True, ())]
    after = stages_to_run(tiny_repo, ran=["hardware"])
    assert not after.replan and {s.name for s in after.stages} == {"data", "train", "evaluate", "index"}
    assert {s.name: s.upstream for s in after.stages}["train"] == ("data",)  # what ran in the first round is done
