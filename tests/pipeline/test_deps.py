"""dvc.yaml lists exactly the code and configs each stage's command can read (kdrepro/pipeline/deps.py is the definition)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdrepro.config import options
from kdrepro.pipeline.deps import (
    ROOT,
    code_files,
    compact,
    config_files,
    notebook_code_files,
    stage_commands,
    update_dvc_yaml,
)

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
KIND = stage_commands()


def _stage_bodies(name: str) -> list[tuple[dict, dict[str, str]]]:
    """(stage body, variables) for every expansion of a stage (foreach/matrix items of the default params)."""
    stage = DVC_YAML["stages"][name]
    base = {"profile": PARAMS["profile"]}
    if "foreach" in stage:
        items = stage["foreach"]
        if isinstance(items, str):  # ${methods} / ${extended.multipliers}
            key = items.strip("${}")
            items = PARAMS[key] if "." not in key else PARAMS[key.split(".")[0]][key.split(".")[1]]
        pairs = items.items() if isinstance(items, dict) else [(item, item) for item in items]
        return [(stage["do"], {**base, "key": str(k), "item": str(v) if not isinstance(v, dict) else ""}) for k, v in pairs]
    if "matrix" in stage:
        methods = stage["matrix"]["method"]
        return [(stage, {**base, "item.method": m, "item.multiplier": str(k)}) for m in methods
                for k in PARAMS["extended"]["multipliers"]]  # fmt: skip
    return [(stage, base)]


def _deps(body: dict, variables: dict[str, str]) -> list[str]:
    deps = []
    for dep in body.get("deps", []):
        dep = dep if isinstance(dep, str) else next(iter(dep))
        deps.append(re.sub(r"\$\{([^}]+)\}", lambda m: variables.get(m.group(1), m.group(0)), dep))
    return deps


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(KIND))
def test_code_deps_are_exactly_what_the_command_imports(stage):
    for body, variables in _stage_bodies(stage):
        deps = _deps(body, variables)
        needed = set(code_files(KIND[stage]))
        missing = sorted(str(p) for p in needed if not _covered(p, deps))
        listed = [d for d in deps if d.startswith("kdrepro/") and not d.startswith("kdrepro/conf/")]
        extra = [d for d in listed if ((ROOT / d).is_dir() and not all(p.relative_to(ROOT) in needed for p in (ROOT / d).rglob("*.py")))
                 or ((ROOT / d).is_file() and Path(d) not in needed) or not (ROOT / d).exists()]  # fmt: skip
        expected = "\n".join(f"- {d}" for d in compact(needed))
        fix = "run `python -m kdrepro.pipeline.deps --update` to rewrite dvc.yaml's code deps"
        assert not missing, f"{stage}: dvc.yaml misses {missing} ({fix}); its code deps are:\n{expected}"
        assert not extra, f"{stage}: dvc.yaml lists {extra}, which its command never imports ({fix}):\n{expected}"


def test_report_stages_cover_their_notebooks_code():
    body = DVC_YAML["stages"]["report"]
    for notebook in body["foreach"]:
        deps = _deps(body["do"], {"item": notebook, "profile": PARAMS["profile"]})
        missing = [str(p) for p in notebook_code_files(ROOT / "notebooks" / f"{notebook}.ipynb") if not _covered(p, deps)]
        assert not missing, f"report@{notebook}: dvc.yaml misses {missing}"


def _overrides(stage: str, variables: dict[str, str]) -> list[str]:
    cmd = " ".join(_stage_bodies(stage)[0][0]["cmd"].split()) if stage else ""
    method = re.search(r"method=(\S+)", cmd)
    budget = re.search(r"budget=(\S+)", cmd)
    overrides = [f"profile={variables['profile']}"]
    if method and "${" not in method.group(1):
        overrides.append(f"method={method.group(1)}")
    elif method:
        overrides.append(f"method={variables.get('item.method') or variables['item']}")
    if budget and "${" not in budget.group(1):
        overrides.append(f"budget={budget.group(1)}")
    return overrides


@pytest.mark.parametrize("profile", options("profile"))
@pytest.mark.parametrize("stage", ["data", "teacher", "calibrate", "iter_matched", "compute_matched", "extended",
                                   "student_extended", "select", "results"])  # fmt: skip
def test_config_deps_cover_every_composed_file(stage, profile):
    for body, variables in _stage_bodies(stage):
        variables = {**variables, "profile": profile}
        deps = _deps(body, variables)
        files = config_files(_overrides(stage, variables))
        missing = sorted(str(p) for p in files if not _covered(p, deps) and not _through_card(p, deps, profile))
        assert not missing, f"{stage}: dvc.yaml misses the config files {missing}"


def _through_card(path: Path, deps: list[str], profile: str) -> bool:
    """A method stage reads its method config through the method's card, which calibration writes from it (and the
    calibrate stage depends on every method config and the plugins folder)."""
    if path.parent != Path("kdrepro/conf/method"):
        return False
    card = f"runs/{profile}/calibration/{path.stem}.json"
    return card in deps or f"runs/{profile}/calibration" in deps


def test_calibration_cards_stand_for_method_configs_and_plugins():
    calibrate, variables = _stage_bodies("calibrate")[0]
    deps = _deps(calibrate, variables)
    assert "kdrepro/conf/method" in deps and "${plugins}" in calibrate["deps"]
    body, variables = _stage_bodies("extended_best")[0]
    assert f"runs/{variables['profile']}/calibration" in _deps(body, variables)  # any method may be chosen


def test_calibration_fingerprint_hashes_the_training_step_code():
    from kdrepro.train import calibrate

    assert calibrate.code_digest_stage == "calibrate"
    assert set(code_files("calibrate")) >= {Path("kdrepro/train/trainer.py"), Path("kdrepro/distill/kd.py")}


def test_update_rewrites_stale_code_deps(tmp_path):
    stale = (ROOT / "dvc.yaml").read_text().replace("      - kdrepro/pipeline/layout.py\n", "", 1)
    target = tmp_path / "dvc.yaml"
    target.write_text(stale)
    assert update_dvc_yaml(target)
    assert not update_dvc_yaml(target)  # idempotent
    assert target.read_text() == (ROOT / "dvc.yaml").read_text()


def test_analysis_code_is_not_a_dependency_of_training_or_calibration():
    """Editing the statistics, the verdict or the plan must not re-calibrate and re-train every method (the dynamic
    submodule rule once matched kdrepro/pipeline/deps.py's own source text and pulled every top-level module into calibrate)."""
    analysis = {Path("kdrepro/analysis/results.py"), Path("kdrepro/analysis/stats.py"), Path("kdrepro/analysis/verdict.py"), Path("kdrepro/plan.py")}
    for stage in ("pretrain", "teacher", "train", "calibrate"):
        assert not analysis & set(code_files(stage)), stage
    assert analysis - {Path("kdrepro/plan.py")} <= set(code_files("results"))


def test_stage_commands_are_read_from_dvc_yaml(tmp_path):
    """Adding a stage is one place less: which command a stage runs comes from its cmd, not a hand-kept table."""
    assert KIND["data"] == "prepare" and KIND["index"] == "report-index" and KIND["extended"] == "train"
    assert "report" not in KIND and set(DVC_YAML["stages"]) - set(KIND) == {"report"}
    target = tmp_path / "dvc.yaml"
    target.write_text("stages:\n  mine:\n    cmd: kdrepro train --params params.yaml method=kd\n    deps:\n"
                      "      - kdrepro/cli.py\n")
    assert stage_commands(target) == {"mine": "train"}
    assert update_dvc_yaml(target) and "      - kdrepro/train/run.py\n" in target.read_text()


def test_data_stage_does_not_depend_on_models_or_training():
    """Editing a model head must not rerun `prepare` (it did while io.py imported the models)."""
    files = set(code_files("prepare"))
    assert not [f for f in files if f.parts[1] in ("models", "train", "distill")]
