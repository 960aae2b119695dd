"""The report pages: one module per notebook, shared style and readers.

========================  ==========================================================================================
module                    what it computes or draws
========================  ==========================================================================================
:mod:`.readers`           where a notebook's inputs are (from ``notebooks/`` or the repository root), the tidy tables
:mod:`.style`             colours, family markers and line styles, 2× PNG figures with alt text, table formatting
:mod:`.matched`           verdict block, Table 1, per-class IoU heatmaps, rank change (``notebooks/matched.ipynb``)
:mod:`.cost`              cost per iteration with its timing spread, cost–accuracy Pareto view (``cost.ipynb``)
:mod:`.extended`          extended budgets with the student-alone control, published numbers (``extended.ipynb``)
:mod:`.curves`            validation mIoU and cross-entropy during training (``curves.ipynb``)
:mod:`.qualitative`       predictions, error maps and per-image mIoU on validation images (``qualitative.ipynb``)
:mod:`.index`             ``reports/index.html`` from a Jinja2 template (``kdrepro report-index``)
:mod:`.pages`             the page list, the Jinja2 templates, executed notebook -> HTML (offline, navigation bar)
:mod:`.published`         published numbers of the paper and the baselines, each with its source
========================  ==========================================================================================

The notebooks stay thin: they call one function per table or figure; everything here is unit tested
(``tests/report/``).
"""
