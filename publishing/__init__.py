"""``python -m bnpublish`` (``make publish``): the tree that readers and students get.

Writes ``_build/publish/`` from the built book (run ``make book`` first)::

    index.html, intro.html, chapters/, _static/ ...   the book (``_build/html``), MathJax included
    notebooks/chNN_name.ipynb                         the released student notebooks (nbgrader's output)
    README.md                                         for students: where to start
    .nojekyll                                         serve ``_static/`` as it is

That tree is what GitHub Pages serves (``.github/workflows/pages.yml``) and what goes to the
public student repository named by ``repository.url`` in ``_config.yml``. The instructor
repository, with ``solutions/`` and ``autograder/``, stays private. :func:`check` refuses a tree
that holds a page source, Python or grader file, a build's error report, or an nbgrader marker;
``tests/test_leaks.py`` checks the tree line by line against every solution and hidden check.

This module is also a Sphinx extension (``sphinx.extra_extensions`` in ``_config.yml``) that makes
the book's buttons point into that tree:

* the build copies each exercise notebook to ``notebooks/`` in the site;
* on an exercise page, the download button offers that file and the Colab button opens it on the
  student repository's branch (``repository.url``, ``repository.branch``, and ``path_to_book``,
  the folder of the student repository that holds the tree);
* every other link of the download button goes to ``_sources/``, which is never built
  (``html_copy_source: false``): it is dropped, and so is the Colab button of the reading pages,
  whose text notebooks the student tree does not hold.
"""
import argparse
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = "notebooks"
EXERCISE = re.compile(r"chapters/\d\d_\w+/(ch\d\d_\w+)")   # docname of an exercise page
FORBIDDEN_SUFFIXES = {".md", ".py", ".pyc", ".db", ".cu", ".cuh", ".hpp", ".csv", ".zip", ".npz", ".yml", ".yaml",
                      ".log"}   # a .log: the report of a cell that failed, so the book did not build cleanly
FORBIDDEN_NAMES = {"_sources", "solutions", "autograder", "bnref", "bngrade", "bncapture", "jupyter_execute", ".git"}
MARKERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
TEXT_SUFFIXES = {".html", ".ipynb", ".js", ".json", ".txt", ".md", ".css", ".svg", ""}

README = """\
# Batch Normalization, from scratch to GPU: the student edition

This is the published course: the book (open `index.html`, or read it online on this
repository's GitHub Pages site) and its exercise notebooks.

## Exercises

{notebooks}

Each notebook is a graded exercise. Open it in Google Colab (the *Launch → Colab* button on its
page of the book, or *File → Open notebook → GitHub* with this repository) or run it locally
(`pip install numpy torch scikit-learn tqdm jupyterlab`, then `jupyter lab notebooks/`).
Chapter 5's notebook needs an NVIDIA GPU (Colab: *Runtime → Change runtime type → GPU*).

1. Fill in each cell that says `YOUR CODE HERE` (delete its `raise NotImplementedError()`);
   keep the function names and signatures.
2. Run all cells: the cells that start with `# Visible tests` check your work against PyTorch.
3. Submit the `.ipynb` file as your course says. The grader runs more (hidden) tests on fresh
   random inputs; its feedback names the mistake it finds.

This tree holds no solutions and no hidden tests; it is generated, so changes to it are lost.
"""


def exercise_of(docname):
    """``chapters/02_x/ch02_x`` -> ``ch02_x``; None for a page that is not an exercise notebook."""
    match = EXERCISE.fullmatch(docname)
    return match.group(1) if match else None


# --- the Sphinx extension ---------------------------------------------------------------

def _colab_url(app, name):
    opts = app.config.html_theme_options
    colab = opts.get("launch_buttons", {}).get("colab_url", "").rstrip("/")
    repo = opts.get("repository_url", "").rstrip("/").split("github.com/")[-1]
    folder = opts.get("path_to_docs", "").strip("/")
    path = "/".join(p for p in (folder, NOTEBOOKS, f"{name}.ipynb") if p)
    return f"{colab}/github/{repo}/blob/{opts.get('repository_branch') or 'main'}/{path}"


def _point_buttons_into_the_tree(app, pagename, templatename, context, doctree):
    name = exercise_of(pagename)
    buttons = context.get("header_buttons", [])
    for group in list(buttons):
        if group.get("label") == "download-buttons":
            group["buttons"] = [b for b in group["buttons"] if b.get("type") != "link"]   # all to _sources/
            if name:
                group["buttons"].insert(0, {
                    "type": "link", "url": context["pathto"](f"{NOTEBOOKS}/{name}.ipynb", 1), "text": ".ipynb",
                    "icon": "fas fa-code", "tooltip": "Download the exercise notebook", "label": "download-notebook-button",
                })
        elif group.get("label") == "launch-buttons":
            if not name:
                buttons.remove(group)
                continue
            for button in group["buttons"]:
                if button.get("text") == "Colab":
                    button.update(url=_colab_url(app, name), label="launch-colab-button")


def _copy_notebooks(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    for docname in sorted(app.env.found_docs):
        source = Path(app.env.doc2path(docname))
        name = exercise_of(docname)
        if name and source.suffix == ".ipynb":
            target = Path(app.outdir, NOTEBOOKS, f"{name}.ipynb")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def setup(app):
    app.connect("html-page-context", _point_buttons_into_the_tree, priority=900)   # after the theme's (501)
    app.connect("build-finished", _copy_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# --- the published tree -----------------------------------------------------------------

def check(tree):
    """Problems of a published tree, as a list of strings (empty when it may be published)."""
    from bngrade.pipeline.course import assignments

    tree = Path(tree)
    problems = [f"missing {NOTEBOOKS}/{a}.ipynb" for a in assignments()
                if not (tree / NOTEBOOKS / f"{a}.ipynb").is_file()]
    if not (tree / "index.html").is_file():
        problems.append("missing index.html")
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree)
        if FORBIDDEN_NAMES & set(rel.parts):
            problems.append(f"{rel}: not for students")
        elif path.is_file() and path.suffix in FORBIDDEN_SUFFIXES and rel != Path("README.md"):
            problems.append(f"{rel}: a source or build file")
        elif path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_text(errors="replace")
            problems += [f"{rel}: holds the nbgrader marker {m!r}" for m in MARKERS if m in text]
    return problems


def publish(site=REPO / "_build" / "html", out=REPO / "_build" / "publish"):
    """Copy the built book ``site`` to ``out`` with the student README; raise ValueError if unfit."""
    site, out = Path(site), Path(out)
    if not (site / "index.html").is_file():
        raise ValueError(f"no book in {site}: run `make book` first")
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(site, staging, ignore=shutil.ignore_patterns(".buildinfo"))
    names = sorted(p.name for p in (staging / NOTEBOOKS).glob("*.ipynb"))
    (staging / "README.md").write_text(README.format(notebooks="\n".join(f"* [`{n}`]({NOTEBOOKS}/{n})" for n in names)))
    (staging / ".nojekyll").write_text("")
    problems = check(staging)
    if problems:
        shutil.rmtree(staging)
        raise ValueError("refusing to publish:\n  " + "\n  ".join(problems[:20]))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bnpublish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default=str(REPO / "_build" / "html"), help="built book (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "_build" / "publish"), help="student tree (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = publish(args.site, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sum(1 for p in out.rglob("*") if p.is_file())
    print(f"published {files} files to {out} ({len(list((out / NOTEBOOKS).glob('*.ipynb')))} notebooks)")
    return 0

