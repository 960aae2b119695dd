"""Every rendered page opened in a real headless browser (Debian's chromium, network closed): no request may leave
the file system, no console error, every image loads and has alt text, and the verdict and Table 1 are where a
reader looks for them. CI (.ci/run) installs chromium and sets KDREPRO_REQUIRE_BROWSER=1, so there it cannot skip."""

from __future__ import annotations

import pytest
import report_browser

from kdrepro.report.pages import PAGES

REQUIRED = report_browser.REQUIRED_IDS


@pytest.fixture(scope="module")
def browser():
    if report_browser.chromium() is None:
        if report_browser.require_browser():
            pytest.fail("chromium is missing; install it with: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    with report_browser.Browser() as instance:
        yield instance


def test_the_checker_catches_what_it_is_for(browser, tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><head><script src="https://cdn.example.org/require.js"></script></head><body>'
                    '<img src="missing.png" alt="a"><img src="data:image/png;base64,iVBORw0KGgo=">'
                    '<script>console.error("boom")</script></body></html>')
    report = browser.check(page, ("verdict",))
    problems = " | ".join(report.problems(("verdict",)))
    assert "remote request https://cdn.example.org/require.js" in problems and "console error boom" in problems
    assert len(report.broken_images) == 2 and "missing element #verdict" in problems


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 1024, 390])
@pytest.mark.parametrize("name", ["index", *PAGES])
def test_rendered_page_is_clean_in_a_browser(browser, rendered, name, width):
    """Clean at a desktop, a laptop and a phone width; the page never scrolls sideways (scrollWidth ≤ viewport:
    wide tables scroll inside their own box)."""
    report = browser.check(rendered / "reports" / f"{name}.html", REQUIRED.get(name, ()), width=width)
    assert report.problems(REQUIRED.get(name, ())) == []
    assert width - 20 <= report.viewport_width <= width and report.scroll_width <= report.viewport_width  # less a scrollbar
    assert report.images >= (0 if name == "index" else 1)


def test_the_checker_catches_a_page_that_scrolls_sideways(browser, tmp_path):
    page = tmp_path / "wide.html"
    page.write_text('<html><head><meta name="viewport" content="width=device-width, initial-scale=1.0"></head>'
                    '<body><table id="wide"><tr><td style="min-width:900px">x</td></tr></table></body></html>')
    report = browser.check(page, width=390)
    assert report.scroll_width > 390 and "scrolls sideways at 390 px" in " | ".join(report.problems())
    assert "table#wide" in " | ".join(report.problems())
