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
