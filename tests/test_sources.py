"""Authored sources stay diffable: text notebooks, no stored outputs or execution counts."""
import subprocess

import nbformat

from bngrade.pipeline.course import REPO, SOURCES, assignments, chapter_dir


def test_every_assignment_has_a_text_source_a_chapter_and_a_toc_entry():
    toc = (REPO / "_toc.yml").read_text()
    assert len(assignments()) >= 2
    for assignment in assignments():
        folder = chapter_dir(assignment).relative_to(REPO).as_posix()
        assert f"file: {folder}/index" in toc and f"file: {folder}/{assignment}" in toc
        assert (SOURCES / f"{assignment}.md").exists()
        assert (chapter_dir(assignment) / "index.md").exists()


def test_tracked_notebooks_have_no_outputs_or_execution_counts():
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked, "the student notebooks are tracked"
    for name in tracked:
        nb = nbformat.read(REPO / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


def test_every_test_cell_is_judged_outside_the_sandbox():
    """A test cell without a hidden block would be scored from the sandbox's own outputs alone: none may exist.
    Every check it names has a public probe that reads a student's name, and a trusted verdict. And the static
    scan passes every solution: nothing banned, nothing flagged."""
    import jupytext

    from bngrade.judge.check import names_of, verdict_of
    from bngrade.judge.hidden import check_keys, is_test_cell
    from bngrade.judge.scan import scan

    for assignment in assignments():
        nb = jupytext.read(SOURCES / f"{assignment}.md")
        tests = [c for c in nb.cells if is_test_cell(c)]
        assert tests, assignment
        for cell in tests:
            keys = check_keys(cell)
            assert keys, f"{assignment}: {cell.metadata['nbgrader']['grade_id']} has no hidden check"
            for key in keys:
                assert names_of(key) and callable(verdict_of(key)), f"{assignment}: {key}"
        answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("solution")}
        banned, flags = scan(assignment, answers)
        assert banned == {} and flags == [], f"{assignment}: the solution itself is banned or flagged: {banned} {flags}"
