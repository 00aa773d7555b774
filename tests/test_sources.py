"""Authored sources stay diffable: text notebooks, no stored outputs or execution counts."""
import subprocess

import nbformat

from bngrade.course import REPO, SOURCES, assignments, chapter_dir


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
