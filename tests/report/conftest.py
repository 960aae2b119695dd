"""A miniature repository with the results of a pipeline run (constructed tables, tiny real checkpoints), every
notebook executed from ``notebooks/`` with its default parameters, and every page rendered as the DVC stages do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helpers beside this file (tests use --import-mode=importlib)

import report_fixtures as fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rendered(tiny_teacher, tmp_path_factory) -> Path:
    """The repository with every page rendered (reports/*.html, reports/index.html)."""
    from kdrepro.report.index import write_index
    from kdrepro.report.pages import PAGES
    from kdrepro.report.readers import locate

    teacher_dir = Path(next(o for o in tiny_teacher if o.startswith("teacher_checkpoint=")).split("=", 1)[1]).parent
    repository = fixtures.make_repository(tmp_path_factory.mktemp("repo"), teacher_dir)
    for name in PAGES:
        fixtures.execute(repository, name)
    write_index(locate(start=repository))
    return repository
