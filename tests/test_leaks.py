"""No solution line and no hidden test may reach a student: released notebooks,
the book's HTML (``_sources`` included) or the feedback HTML."""
import html
import json
import re

import jupytext
import nbformat
import pytest

from bngrade.course import SOURCES, assignments, chapter_dir
from class_roster import ROSTER

REGION = re.compile(r"### BEGIN (SOLUTION|HIDDEN TESTS)\n(.*?)### END \1", re.S)
MIN_CHARS = 10  # shorter lines (``return out``) say nothing about the solution


def secret_lines():
    """{line: assignment} of every solution or hidden-test line, and the markers themselves."""
    secrets = {"### BEGIN SOLUTION": "marker", "### BEGIN HIDDEN TESTS": "marker"}
    public = set()  # scaffolding any student is given (``return out``) is no secret
    for assignment in assignments():
        released = nbformat.read(chapter_dir(assignment) / f"{assignment}.ipynb", as_version=4)
        public |= {line.strip() for cell in released.cells for line in cell.source.splitlines()}
    for assignment in assignments():
        for cell in jupytext.read(SOURCES / f"{assignment}.md").cells:
            for _, body in REGION.findall(cell.source + "\n"):
                for line in body.splitlines():
                    line = line.strip()
                    if len(line) >= MIN_CHARS and not line.startswith("#") and line not in public:
                        secrets[line] = assignment
    return secrets


def _strings(obj):
    """Every string inside a JSON document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def lines_of(path):
    """The stripped lines a reader sees in a file: every string of a notebook, or the text of HTML."""
    if path.suffix == ".ipynb":
        text = "\n".join(_strings(json.loads(path.read_text())))
    else:
        text = path.read_text(errors="replace")
        if path.suffix in (".html", ".htm"):
            text = html.unescape(re.sub(r"<[^>]+>", "", text))
    return {line.strip() for line in text.splitlines()}


def assert_no_secret(paths, own_lines=lambda path: set()):
    """Fail if a path shows a secret line; ``own_lines(path)`` are lines its student wrote."""
    secrets = secret_lines()
    assert len(secrets) > 20, "the leak check must know the solution lines"
    for path in paths:
        leaked = sorted((lines_of(path) & set(secrets)) - own_lines(path))
        assert not leaked, f"{path} contains solution or hidden-test lines: {leaked[:3]}"


def test_released_notebooks_hold_no_solution_or_hidden_test():
    assert_no_secret([chapter_dir(a) / f"{a}.ipynb" for a in assignments()])


@pytest.mark.xdist_group("grading")
def test_feedback_holds_no_solution_or_hidden_test(graded, course):
    """A student's feedback may show the student's own code, even where it equals the solution."""

    def own_lines(page):
        student, assignment = page.parts[-3], page.parts[-2]
        submitted = nbformat.read(course.path("submitted", student, assignment, page.with_suffix(".ipynb").name), 4)
        return {line.strip() for cell in submitted.cells for line in cell.source.splitlines()}

    for assignment in ROSTER:
        graded[assignment]
    pages = sorted(course.path("feedback").rglob("*.html"))
    assert len(pages) >= 6
    assert_no_secret(pages, own_lines)


@pytest.mark.xdist_group("book")
def test_book_html_holds_no_solution_or_hidden_test(book):
    _, site = book
    assert not (site / "_sources").exists(), "html_copy_source must be off"
    files = [p for p in site.rglob("*") if p.is_file() and p.suffix in (".html", ".ipynb", ".md", ".txt", ".js")]
    assert_no_secret(files)


def test_the_leak_check_catches_a_leak(tmp_path):
    line = next(s for s, a in secret_lines().items() if a != "marker")
    page = tmp_path / "page.html"
    page.write_text(f"<pre><span>{html.escape(line)}</span></pre>")
    with pytest.raises(AssertionError, match="contains solution"):
        assert_no_secret([page])
