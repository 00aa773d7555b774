"""No solution line and no hidden test may reach a student: released notebooks,
the book's HTML (``_sources`` included), the feedback HTML, or the published tree
(``make publish``), which must not hold the hidden checks, the reference package or the keys either."""
import functools
import hashlib
import html
import json
import re
import shutil

import jupytext
import nbformat
import pytest

from bngrade.pipeline.course import REPO, SOURCES, assignments, chapter_dir
from bnpublish import check as check_tree
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


def assert_no_secret(paths, own_lines=lambda path: set(), secrets=None):
    """Fail if a path shows a secret line; ``own_lines(path)`` are lines its student wrote."""
    secrets = secret_lines() if secrets is None else secrets
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



# What the instructor repository keeps to itself, besides the solution and hidden-test regions:
# the reference package (Python; chapter 5's page shows its CUDA kernels on purpose), the hidden
# checks and the keys of the conceptual questions.
PRIVATE_SOURCES = [*sorted((REPO / "solutions" / "bnref").rglob("*.py")),
                   *sorted((REPO / "autograder" / "bngrade" / "verdicts").glob("ch*.py")),
                   REPO / "autograder" / "bngrade" / "verdicts" / "questions.py"]
PUBLISHED_TEXT = {".html", ".ipynb", ".md", ".txt", ".js", ".json", ".css", ".svg", ""}


@functools.lru_cache(maxsize=1)
def published_secrets():
    """secret_lines() plus every line of PRIVATE_SOURCES that no reading page or released notebook shows."""
    public = set()
    for page in [*REPO.glob("chapters/*/*.md"), *REPO.glob("chapters/*/ch*.ipynb"), REPO / "intro.md"]:
        public |= lines_of(page)
    secrets = secret_lines()
    for path in PRIVATE_SOURCES:
        for line in path.read_text().splitlines():
            line = line.strip()
            if len(line) >= MIN_CHARS and not line.startswith("#") and line not in public:
                secrets.setdefault(line, path.relative_to(REPO).as_posix())
    return secrets


def assert_publishable(tree):
    """Fail if the published ``tree`` holds a file of the instructor repository or shows a secret line."""
    problems = check_tree(tree)
    assert not problems, f"{tree}: {problems[:3]}"
    files = [p for p in sorted(tree.rglob("*")) if p.is_file()]
    private = {hashlib.sha256(p.read_bytes()).hexdigest(): p for top in ("solutions", "autograder")
               for p in (REPO / top).rglob("*")
               if p.is_file() and p.stat().st_size >= 64 and "course" not in p.relative_to(REPO).parts}
    copied = [(f, private[h]) for f in files if (h := hashlib.sha256(f.read_bytes()).hexdigest()) in private]
    assert not copied, f"{copied[0][0]} is a copy of {copied[0][1]}"
    assert_no_secret([p for p in files if p.suffix in PUBLISHED_TEXT], secrets=published_secrets())


@pytest.mark.xdist_group("book")
def test_published_tree_holds_no_solution_hidden_check_or_key(published):
    assert (published / "index.html").is_file() and (published / "notebooks").is_dir()
    assert_publishable(published)


@pytest.mark.xdist_group("book")
def test_the_published_tree_check_catches_a_planted_leak(published, tmp_path):
    """A copy of the tree passes; each copy with one leak planted in it fails."""
    secrets = published_secrets()
    solution = next(s for s, a in secret_lines().items() if a != "marker")
    check = next(s for s, a in secrets.items() if a.startswith("autograder/bngrade/verdicts/ch"))
    key = next(s for s, a in secrets.items() if a.endswith("questions.py") and '"answer"' in s)
    reference = next(s for s, a in secrets.items() if a.startswith("solutions/bnref/"))
    grader_file = REPO / "autograder" / "bngrade" / "verdicts" / "questions.py"

    def add_cell(text, source):
        nb = json.loads(text)
        nb["cells"].append({"cell_type": "markdown", "metadata": {}, "source": [source]})
        return json.dumps(nb)

    plants = {
        "no leak": None,
        "solution line in a page": ("chapters/02_batchnorm_forward/index.html", lambda t: t.replace(
            "</body>", f"<pre><span>{html.escape(solution)}</span></pre></body>")),
        "hidden check in a notebook": ("notebooks/ch02_batchnorm_forward.ipynb", lambda t: add_cell(t, check)),
        "key in a script": ("_static/leak.js", lambda t: f"var keys = {{\n{key}\n}};\n"),
        "reference code in the search index": ("searchindex.js", lambda t: t + "\n" + reference + "\n"),
        "a copied grader file": ("_static/blob.bin", lambda t: grader_file.read_text()),
        "an nbgrader marker": ("intro.html", lambda t: t + "### BEGIN SOLUTION\n"),
        "a page source": ("_sources/intro.md.txt", lambda t: "# intro\n"),
    }
    for what, plant in plants.items():
        copy = tmp_path / what.replace(" ", "_")
        shutil.copytree(published, copy, ignore=shutil.ignore_patterns("mathjax"))
        if plant is None:
            assert_publishable(copy)
        else:
            target = copy / plant[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(plant[1](target.read_text() if target.exists() else ""))
            try:
                assert_publishable(copy)
            except AssertionError:
                pass
            else:
                pytest.fail(f"the check misses {what}")
        shutil.rmtree(copy)
