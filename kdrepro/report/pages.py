"""The report pages: their names and titles, the Jinja2 templates, and the HTML rendering of executed notebooks.

Every page is rendered by nbconvert through the ``kdrepro`` template (``templates/kdrepro/``, based on JupyterLab's):
no script or font from a CDN (require.js, MathJax and mermaid are left out; the pages need none of them), a
navigation bar to the index and every sibling page, a link to the executed notebook, the page title, and the alt
text each figure was displayed with.

Command line (the DVC ``report`` stage)::

    python -m kdrepro.report.pages reports/cost.ipynb     # writes reports/cost.html
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"

#: name -> (title, what the page shows); the order of the navigation bar.
PAGES: dict[str, tuple[str, str]] = {
    "matched": ("Verdict and Table 1",
                "The paper's claims and this run's verdict; Table 1 (iteration- vs compute-matched, with intervals); "
                "per-class IoU; rank change"),
    "cost": ("Cost per iteration",
             "What one training iteration of each method costs (phases, timing spread, FLOPs) and the cost–accuracy view"),
    "extended": ("Extended training",
                 "multiples of the compute-matched budget with the student-alone control at every budget; % of teacher; published numbers"),
    "curves": ("Training curves",
               "Validation mIoU during training and the plain cross-entropy against training seconds, mean ± sd over seeds"),
    "qualitative": ("Qualitative results",
                    "Validation images: student alone, logit KD, best segmentation-specific, best extended student, "
                    "teacher; per-image mIoU and error maps"),
}


def environment() -> jinja2.Environment:
    """Jinja2 environment over ``kdrepro/report/templates`` with HTML autoescaping."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                              lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def render_template(name: str, **context: Any) -> str:
    """Render ``templates/<name>`` with ``context``."""
    return environment().get_template(name).render(**context)


def nav_links(current: str | None) -> list[dict[str, Any]]:
    """The navigation bar's entries: the index, then every page; ``current`` is marked."""
    entries = [{"href": "index.html", "label": "Overview", "current": current == "index"}]
    entries += [{"href": f"{name}.html", "label": title, "current": current == name} for name, (title, _) in PAGES.items()]
    return entries


def render_html(executed: str | Path, output: str | Path | None = None) -> Path:
    """Render an executed notebook ``reports/<name>.ipynb`` to ``<name>.html`` beside it (inputs hidden)."""
    import nbformat
    from nbconvert import HTMLExporter

    executed = Path(executed)
    name = executed.stem
    if not executed.is_file():
        raise FileNotFoundError(f"{executed} does not exist; execute the notebook with papermill first")
    notebook = nbformat.read(executed, as_version=4)
    title = PAGES.get(name, (name, ""))[0]
    notebook.metadata["title"] = f"kdrepro — {title}"
    exporter = HTMLExporter(template_name="kdrepro", extra_template_basedirs=[str(TEMPLATES)], exclude_input=True,
                            exclude_input_prompt=True, exclude_output_prompt=True)
    resources = {"kdrepro": {"nav": nav_links(name), "notebook": executed.name, "page": name}}
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    output = Path(output) if output else executed.with_suffix(".html")
    output.write_text(body, encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments:
        print("error: no notebook given; usage: python -m kdrepro.report.pages reports/<name>.ipynb", file=sys.stderr)
        return 2
    for path in arguments:
        try:
            print(render_html(path))
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
