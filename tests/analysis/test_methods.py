"""Method metadata and roles (kdrepro.analysis.methods): one function for packaged and plugin methods alike."""

from __future__ import annotations

from kdrepro.analysis.methods import CANONICAL, LOGIT_KD, STUDENT_ALONE, base_method, method_info, method_names
from kdrepro.config import CONF_DIR, options, roles


def test_method_info_reads_packaged_and_plugin_configs(tmp_path):
    assert method_info("cwd")["family"] == "segmentation_specific"
    (tmp_path / "mine" / "method").mkdir(parents=True)
    (tmp_path / "mine" / "method" / "mymethod.yaml").write_text('family: canonical\ndisplay_name: "Mine"\nbase: kd\n')
    (tmp_path / "params.yaml").write_text("plugins: mine\n")
    (tmp_path / "notebooks").mkdir()
    expected = {"family": "canonical", "display_name": "Mine", "base": "kd"}
    assert method_info("mymethod", start=tmp_path / "notebooks") == expected
    assert method_info("mymethod", plugins=[tmp_path / "mine"]) == expected
    assert method_info("nothing", start=tmp_path) == {}


def test_variants_name_their_base_and_methods_of_their_own_are_their_base():
    assert base_method("cwd_published") == base_method("cwd_mmrazor") == "cwd"
    assert base_method("kd_t4") == "kd" and base_method("kd_fitnet") == "kd_fitnet" and base_method("unknown") == "unknown"
    for name in options("method"):  # every variant's base is a method config of its own
        assert base_method(base_method(name)) == base_method(name), name
        assert (CONF_DIR / "method" / f"{base_method(name)}.yaml").is_file(), name


def test_roles_are_declared_in_config():
    assert (STUDENT_ALONE, LOGIT_KD, CANONICAL) == (roles().control, roles().logit_kd, roles().canonical)
    assert (STUDENT_ALONE, LOGIT_KD, CANONICAL) == ("none", "kd", ("kd", "fitnet"))
    assert method_info(STUDENT_ALONE)["family"] == "student"
    assert all(method_info(name)["family"] == "canonical" for name in CANONICAL)
    assert STUDENT_ALONE not in method_names() and set(CANONICAL) <= set(method_names())
