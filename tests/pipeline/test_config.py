"""One name per method: the config file's name is the method's name; your own methods from outside the package."""

from __future__ import annotations

import pytest

from kdrepro.config import CONF_DIR, load_config, options
from kdrepro.errors import ConfigError


@pytest.mark.parametrize("name", options("method"))
def test_method_name_is_the_config_file_name(name):
    method = load_config([f"method={name}"]).method
    assert method.name == name
    assert method.family in ("student", "canonical", "segmentation_specific")
    assert method.display_name
    assert (method.reproduces is None) == (name == "none")


def test_a_copied_config_takes_its_own_name(tmp_path):
    folder = tmp_path / "mine"
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "mymethod.yaml").write_text((CONF_DIR / "method" / "kd.yaml").read_text())
    cfg = load_config([f"plugins=[{folder}]", "method=mymethod"])
    assert cfg.method.name == "mymethod"
    assert "mymethod" in options("method", [folder])


def test_a_config_naming_another_method_is_refused(tmp_path):
    folder = tmp_path / "mine"
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "mymethod.yaml").write_text("name: kd\nfamily: canonical\nterms: {}\n")
    with pytest.raises(ConfigError, match="delete the name: line"):
        load_config([f"plugins=[{folder}]", "method=mymethod"])


def test_missing_plugin_folder_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([f"plugins=[{tmp_path / 'nope'}]"])


def test_unknown_method_lists_plugin_methods(tmp_path):
    folder = tmp_path / "mine"
    (folder / "method").mkdir(parents=True)
    (folder / "method" / "mymethod.yaml").write_text("family: canonical\nterms: {}\n")
    with pytest.raises(ConfigError, match="mymethod"):
        load_config([f"plugins=[{folder}]", "method=nonexistent"])


def _old_flatten(tree, prefix):
    items = []
    for key, value in tree.items():
        items += _old_flatten(value, f"{prefix}.{key}") if isinstance(value, dict) else [(f"{prefix}.{key}", value)]
    return items


def _hydra(value):
    return "[" + ",".join(map(_hydra, value)) + "]" if isinstance(value, list) else "null" if value is None else str(value)


def _without_schedule(cfg) -> str:
    from omegaconf import OmegaConf

    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    resolved.reference_iterations = None
    return OmegaConf.to_yaml(resolved)


@pytest.mark.parametrize("profile", ["smoke", "synthetic", "synthetic_study", "cityscapes", "ade20k"])
def test_derived_runs_equal_the_configs_once_composed_from_override_strings(profile, tmp_path):
    """The teacher's and the pre-training runs, built with open_dict by trained_alone, are exactly the configs the
    teacher and pretrain commands used to compose again from override strings (so their runs are unchanged), but for
    the methods' schedule, which is no part of a derived run (``reference_iterations: null``)."""
    from omegaconf import OmegaConf

    from kdrepro.config import trained_alone
    from kdrepro.train.pretrain import iterations, pretraining_run

    base = [f"profile={profile}"]
    cfg = load_config(base)
    teacher = trained_alone(cfg, cfg.teacher, int(cfg.teacher_iterations), int(cfg.teacher_seed))
    composed = load_config([*base, "seeds=null", f"seed={int(cfg.teacher_seed)}", "method=none", f"model@student={cfg.teacher.name}",
                            f"student.base_width={cfg.teacher.base_width}", f"student.pretrained={cfg.teacher.get('pretrained') or 'null'}",
                            "budget=iterations", f"budget.iterations={int(cfg.teacher_iterations)}"])  # fmt: skip
    assert OmegaConf.to_yaml(teacher, resolve=True) == _without_schedule(composed)
    for which in ("student", "teacher"):
        model = cfg[which]
        old = [*base, "method=none", "seeds=null", f"seed={int(cfg.pretrain.seed)}", f"model@student={model.name}",
               f"student.base_width={model.base_width}", "student.pretrained=null", "teacher.pretrained=null",
               "budget=iterations", f"budget.iterations={iterations(cfg, which)}", f"optim.lr={float(cfg.pretrain.lr)}",
               "eval_points=0", f"out_dir={tmp_path}", f"progress.stage='pretrain {which}'", f"speed.role={which}"]  # fmt: skip
        old += [f"{k}={_hydra(v)}" for k, v in _old_flatten(OmegaConf.to_container(cfg.pretrain.dataset, resolve=True) or {}, "dataset")]
        assert OmegaConf.to_yaml(pretraining_run(cfg, which, tmp_path), resolve=True) == _without_schedule(load_config(old))
