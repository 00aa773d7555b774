"""The book builds with -W -n --keep-going, and shows each chapter with its computed figures."""
import json

import pytest
import nbformat

from bngrade.pipeline.course import Course, assignments, chapter_dir

pytestmark = pytest.mark.xdist_group("book")


def test_book_builds_without_warnings(book):
    proc, site = book
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "index.html").exists()


@pytest.mark.parametrize("assignment", assignments())
def test_chapter_page_has_computed_figures_and_links_the_exercise(book, assignment):
    _, site = book
    page = (site / chapter_dir(assignment).relative_to(chapter_dir(assignment).parents[1]) / "index.html")
    text = page.read_text()
    assert text.count("<img") >= 2, f"{page} should show figures computed at build time"
    assert f"{assignment}.ipynb" in text, "the chapter links its exercise notebook for download"
    exercise = page.with_name(f"{assignment}.html").read_text()
    assert "colab.research.google.com" in exercise, "exercise pages get a Colab launch button"
    assert "YOUR CODE HERE" in exercise


def test_math_and_citations_render(book):
    _, site = book
    text = (site / "chapters" / "02_batchnorm_forward" / "index.html").read_text()
    assert "Ioffe" in text and "math" in text


def test_committed_student_notebooks_are_what_nbgrader_generates(tmp_path):
    """The notebooks in chapters/ (used by the book and Colab) are nbgrader's output for the current sources."""
    fresh = Course(tmp_path)
    for assignment in assignments():
        generated = nbformat.read(fresh.release(assignment, publish=False), as_version=4)
        committed = nbformat.read(chapter_dir(assignment) / f"{assignment}.ipynb", as_version=4)
        assert [(c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in committed.cells] == \
            [(c.cell_type, c.source, json.dumps(c.metadata, sort_keys=True)) for c in generated.cells], \
            f"chapters/.../{assignment}.ipynb is stale: run `python -m bngrade release`"
