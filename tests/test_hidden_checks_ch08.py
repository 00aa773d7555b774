"""Chapter 8's notebook with its hidden blocks, in-process: the seeded class loses exactly its cells and is told
why, a blank notebook fails every test cell, each hidden block names a probe and a verdict; and the static scan
bans framework norms and collectives (the verdicts themselves: test_verdicts_ch08.py)."""
import contextlib
import io

import jupytext
import pytest
import torch

from bncapture import ch08 as probes
from bngrade.judge.check import keys_of, verdict_of
from bngrade.judge.hidden import HIDDEN
from bngrade.pipeline.course import SOURCES
from class_roster import ROSTER
from submissions import solution_cells

CH08 = "ch08_beyond_bn"


def _notebook(spec):
    """Run the ch08 source notebook as the roster submission ``spec`` fills it in, hidden blocks included.

    Returns:
        {grade cell: error message} of the grade cells that raised.
    """
    answers = solution_cells(CH08)
    namespace, failures = {}, {}
    default_dtype = torch.get_default_dtype()  # the notebook's setup cell changes it
    try:
        for cell in jupytext.read(SOURCES / f"{CH08}.md").cells:
            meta = cell.metadata.get("nbgrader", {})
            if cell.cell_type != "code":
                continue
            source = cell.source
            if meta.get("solution"):
                source = answers[meta["grade_id"]]
                for old, new in spec.get("replace", {}).get(meta["grade_id"], []):
                    assert old in source, f"mutant text {old!r} not found in cell {meta['grade_id']}"
                    source = source.replace(old, new)
                source = spec.get("override", {}).get(meta["grade_id"], source)
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(source, namespace)
            except Exception as err:  # a failing cell, as nbgrader would record it
                if meta.get("grade"):
                    failures[meta["grade_id"]] = f"{type(err).__name__}: {err}"
    finally:
        torch.set_default_dtype(default_dtype)
    return failures


@pytest.mark.parametrize("student", [s for s, spec in ROSTER[CH08].items() if spec is not None])
def test_ch08_roster_loses_exactly_its_cells_and_is_told_why(student):
    """The seeded class without nbgrader (fast); test_grading grades the same class with it, in the sandbox."""
    spec = ROSTER[CH08][student]
    failures = _notebook(spec)
    assert set(failures) == spec.get("lose", set()), failures
    if "says" in spec:
        assert any(spec["says"] in message for message in failures.values()), failures


def test_ch08_blank_notebook_fails_every_grade_cell():
    blank = {grade_id: "raise NotImplementedError()" for grade_id in solution_cells(CH08)}
    failures = _notebook({"override": blank})
    cells = jupytext.read(SOURCES / f"{CH08}.md").cells
    assert set(failures) == {c.metadata["nbgrader"]["grade_id"] for c in cells
                             if c.metadata.get("nbgrader", {}).get("grade")}


def test_each_hidden_block_checks_a_public_probe_with_a_trusted_verdict():
    cells = jupytext.read(SOURCES / f"{CH08}.md").cells
    keys = [key for cell in cells for key in keys_of("".join(HIDDEN.findall(cell.source)))]
    chapter = [key.split(".", 1)[1] for key in keys if key.startswith("ch08.")]
    assert chapter == ["layernorm_forward", "layernorm_backward", "groupnorm_forward", "groupnorm_rejects_bad_input",
                       "groupnorm_backward", "merge_moments", "syncbn_forward", "syncbn_backward"]
    for name in chapter:
        assert callable(getattr(probes, name)) and callable(verdict_of(f"ch08.{name}"))
    assert all(key.startswith(("ch08.", "questions.ch08_")) for key in keys), keys


@pytest.mark.parametrize("cell,source,banned", [
    ("groupnorm_forward", "def groupnorm_forward(x, gamma, beta, groups, eps=1e-5):\n"
     "    return torch.nn.functional.group_norm(torch.from_numpy(x), groups).numpy(), None\n", "group_norm"),
    ("layernorm_forward", "from torch.nn import LayerNorm\ndef layernorm_forward(x, gamma, beta, eps=1e-5):\n"
     "    return LayerNorm(x.shape[1])(x), None\n", "LayerNorm"),
    ("syncbn", "import torch.distributed as dist\ndef syncbn_forward(x, *args):\n"
     "    dist.all_reduce(x)\n    return x, None\n", "all_reduce"),
])
def test_the_scan_bans_framework_norms_and_collectives_in_chapter_8(cell, source, banned):
    from bngrade.judge import scan

    names, _ = scan.scan("ch08_beyond_bn", {cell: source})
    assert banned in next(iter(names.values()))


def test_the_scan_leaves_numpy_reductions_alone_in_chapter_8():
    from bngrade.judge import scan

    source = ("def merge_moments(parts):\n    counts = np.add.reduce([p[0] for p in parts])\n"
              "    return counts, np.broadcast_to(parts[0][1], (2,)), parts[0][2]\n")
    assert scan.scan("ch08_beyond_bn", {"merge_moments": source})[0] == {}
