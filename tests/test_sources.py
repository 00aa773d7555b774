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
    And the static scan passes every solution: no framework op banned, nothing flagged but what the solution does."""
    import jupytext

    from bngrade.judge.hidden import hidden_code, is_test_cell, student_names
    from bngrade.judge.scan import scan

    for assignment in assignments():
        nb = jupytext.read(SOURCES / f"{assignment}.md")
        tests = [c for c in nb.cells if is_test_cell(c)]
        assert tests, assignment
        for cell in tests:
            code = hidden_code(cell)
            assert code and student_names(code), f"{assignment}: {cell.metadata['nbgrader']['grade_id']} has no " \
                                                 "hidden block that judges a student's name"
        answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
                   if c.metadata.get("nbgrader", {}).get("solution")}
        banned, _ = scan(assignment, answers)
        assert banned == {}, f"{assignment}: the solution itself is banned: {banned}"
