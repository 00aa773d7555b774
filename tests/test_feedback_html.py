"""A hostile student's feedback page runs no script when the instructor opens it.

The student's HTML (markdown cells, raw cells, ``text/html`` / ``text/markdown`` / JavaScript outputs) tries
every usual way to run a script. The page must come out with none of it executable (checked on the HTML
text, fast) and with a Content-Security-Policy first in ``<head>``; headless Chromium then opens the feedback
that nbgrader wrote for that student, and sees nothing run (skipped without chromium and chromedriver).
"""
import time
from pathlib import Path

import nbformat
import pytest
from bs4 import BeautifulSoup
from nbgrader.coursedir import CourseDirectory
from nbgrader.converters import GenerateFeedback
from traitlets.config.loader import PyFileConfigLoader

from bngrade.pipeline.course import CONFIG
from bngrade.pipeline.feedback import CSP, SafeFeedbackExporter
from bngrade.pipeline.intake import collect
from test_browser import browser  # noqa: F401  (the fixture: headless Chromium, or a skip)
from test_intake import mini_course, submission

PWN = "document.body.setAttribute('data-pwned', '{}')"
MARKDOWN = f"""# My answer

<img src=x onerror="{PWN.format('img')}"> <script>{PWN.format('script')}</script>
<svg onload="{PWN.format('svg')}"><circle r="4"/></svg>
<iframe srcdoc="<script>parent.{PWN.format('iframe')}</script>"></iframe>
<a href="javascript:{PWN.format('link')}">click</a> [also](javascript:{PWN.format('mdlink')})
<form action="https://evil.example/"><button formaction="javascript:{PWN.format('form')}">go</button></form>
<base href="https://evil.example/"><style>body {{ background: url(https://evil.example/x.png) }}</style>
<details open ontoggle="{PWN.format('details')}">x</details>
"""
OUTPUTS = f"""from IPython.display import HTML, Javascript, Markdown, display
display(HTML('<img src=y onerror="{PWN.format('html-output')}">'))
display(Markdown('<img src=z onerror="{PWN.format('md-output')}">'))
display(Javascript("{PWN.format('js-output')}"))
"""


def hostile_cells():
    raw = nbformat.v4.new_raw_cell(f'<img src=r onerror="{PWN.format("raw")}">')
    raw.metadata["raw_mimetype"] = "text/html"
    return [nbformat.v4.new_markdown_cell(MARKDOWN), raw, nbformat.v4.new_code_cell(OUTPUTS)]


def assert_harmless(html):
    """No event handler, no javascript: URL, no frame, form or base, no script but the template's MathJax tags
    (which the CSP blocks), and the CSP as the first element of <head>."""
    soup = BeautifulSoup(html, "html.parser")
    first = soup.head.find(True)
    assert first.name == "meta" and first.get("http-equiv") == "Content-Security-Policy" and first["content"] == CSP
    for element in soup.find_all(True):
        assert not [name for name in element.attrs if name.lower().startswith("on")], element
        for name in ("href", "src", "action", "formaction", "srcdoc"):
            assert not str(element.get(name, "")).strip().lower().startswith("javascript:"), element
        assert element.name not in ("iframe", "object", "embed", "form", "base", "svg"), element
    for script in soup.find_all("script"):
        assert "mathjax" in (script.get("src", "") + script.get("type", "")).lower(), script
    assert "data-pwned" not in "".join(str(tag.attrs) for tag in soup.find_all(True))
    assert "evil.example" not in "".join(str(tag) for tag in soup.find_all(["style", "link", "base"]))


def test_the_feedback_exporter_leaves_nothing_executable():
    """Fast: the project's GenerateFeedback configuration, its exporter, on a notebook with the outputs made."""
    config = PyFileConfigLoader(CONFIG.name, path=str(CONFIG.parent)).load_config()
    converter = GenerateFeedback(coursedir=CourseDirectory(config=config), config=config)
    exporter = converter.exporter_class(parent=converter, config=converter.config)
    assert isinstance(exporter, SafeFeedbackExporter)
    nb = nbformat.v4.new_notebook(cells=hostile_cells())
    nb.cells[-1].outputs = [
        nbformat.v4.new_output("display_data", {"text/html": f'<img src=y onerror="{PWN.format("html-output")}">'}),
        nbformat.v4.new_output("display_data", {"text/markdown": f'<img src=z onerror="{PWN.format("md")}">'}),
        nbformat.v4.new_output("display_data", {"application/javascript": PWN.format("js-output")})]
    html, _ = exporter.from_notebook_node(nb, resources={"nbgrader": {"notebook": "hw", "score": 0, "max_score": 1,
                                                                      "late_penalty": 0}})
    assert_harmless(html)
    assert "My answer" in html and "click" in html   # the student's text is still shown


@pytest.fixture(scope="module")
def hostile_feedback(tmp_path_factory):
    """The feedback HTML that nbgrader writes, with the project's configuration, for a hostile student."""
    root = tmp_path_factory.mktemp("feedback")
    course = mini_course(root / "course")
    submission(course, root / "class" / "Mallory", extra=hostile_cells())
    assert collect(root / "class", "hw", course) == (["Mallory"], {})
    course.check("autograde", "hw", "--student", "Mallory", "--force")
    course.check("generate_feedback", "hw", "--student", "Mallory", "--force")
    return course.path("feedback", "Mallory", "hw", "hw.html")


def _pwned(browser, url, wait=1.5):
    """What the page's scripts managed to mark, ``wait`` seconds after it loaded."""
    browser.get(url)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        mark = browser.execute_script("return document.body && document.body.getAttribute('data-pwned')")
        if mark:
            return mark
        time.sleep(0.1)
    return None


def test_a_browser_opening_a_hostile_feedback_runs_no_script(browser, hostile_feedback, tmp_path):  # noqa: F811
    html = hostile_feedback.read_text()
    assert_harmless(html)
    control = tmp_path / "control.html"   # the same payload, undefended: it runs, so the check can see it
    control.write_text(f'<html><head></head><body><img src=x onerror="{PWN.format("control")}"></body></html>')
    assert _pwned(browser, control.as_uri()) == "control"
    csp_only = tmp_path / "csp-only.html"   # not sanitized: the CSP alone stops it
    csp_only.write_text(f'<html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head><body>'
                        f'<img src=x onerror="{PWN.format("csp")}"><script>{PWN.format("csp-script")}</script>'
                        '</body></html>')
    assert _pwned(browser, csp_only.as_uri()) is None
    assert _pwned(browser, Path(hostile_feedback).as_uri()) is None
    assert "My answer" in browser.find_element("tag name", "body").text
    assert browser.execute_script("return typeof window.MathJax") == "undefined"
