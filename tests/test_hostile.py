"""A hostile class: each submission tries one way to cheat or to do harm, and must gain nothing and hurt no one.

Every attack is built on the blank released notebook (nothing implemented), so an honest wrong answer scores 0:
an attack that works shows up as points. The class also holds an honest solution graded after the attacks, whose
marks must survive. Grading runs with small limits so that the bombs are cheap.
"""
import csv
import hashlib
import subprocess
import time

import nbformat
import pytest
from nbgrader.api import Gradebook

from bngrade import sandbox
from bngrade.pipeline.course import REPO, Course
from bngrade.pipeline.grading import grade_class
from submissions import make_submission

pytestmark = [pytest.mark.xdist_group("grading"),
              pytest.mark.skipif(sandbox.available() is not None, reason=f"no sandbox here: {sandbox.available()}")]

ASSIGNMENT = "ch02_batchnorm_forward"
MARKER = "4242.5"   # argv of the processes an attack tries to leave behind
LIMITS = sandbox.Limits(memory=1 * sandbox.GiB, processes=64, disk=64 * sandbox.MiB, tmp=32 * sandbox.MiB,
                        output=32 * sandbox.MiB, wall=120)


def attacks(course, home):
    """{student: (answer-cell source put in the first answer cell, words the report or flags must hold)}."""
    c, repo = str(course.root), str(REPO)
    return {
        # cheats: full marks with nothing implemented
        "skip-hidden": ("get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])",
                        "IPython internals"),
        "swallow-errors": ("ip = get_ipython()\nip.set_custom_exc((BaseException,), lambda *a, **k: None)",
                           "IPython internals"),
        "fake-capture": ("import sys, types\nfake = types.ModuleType('bncapture')\nfake.capture = lambda *a: None\n"
                         "sys.modules['bncapture'] = fake", "sys.modules"),
        "forged-records": ("import io, json, os, zipfile\nbuf = io.BytesIO()\n"
                           "with zipfile.ZipFile(buf, 'w') as zf:\n"
                           "    zf.writestr('status.json', json.dumps({'ended': 'ok', 'cells': {}}))\n"
                           "    for cell in ['test_forward', 'test_bad_input', 'test_batchnorm1d']:\n"
                           "        zf.writestr('out/' + cell + '.json', json.dumps({}))\n"
                           "for fd in range(3, 64):\n    try:\n        os.write(fd, buf.getvalue())\n"
                           "    except OSError:\n        pass\nos._exit(0)", "accesses files"),
        "solved-notebook": (f"import glob\nfor p in glob.glob('/**/*.ipynb', recursive=True) + "
                            f"glob.glob({c!r} + '/**/*.ipynb', recursive=True):\n"
                            "    if 'BEGIN SOLUTION' in open(p, errors='ignore').read():\n"
                            "        exec(open(p).read())", "accesses files"),
        "reference-import": ("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    import bnref\n"
                             "    return bnref.batchnorm_forward(x, gamma, beta, eps)", "reference or grading"),
        "read-keys": ("from bngrade.verdicts.questions import QUESTIONS\nanswer_bias = QUESTIONS['ch02_bias_before_bn']['answer']",
                      "reference or grading"),
        "torch-batch-norm": ("import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                             "    if x.ndim != 2 or x.shape[0] < 2 or gamma.shape != (x.shape[1],):\n"
                             "        raise ValueError('shape')\n"
                             "    t = lambda a: torch.from_numpy(a)\n"
                             "    out = torch.nn.functional.batch_norm(t(x), None, None, t(gamma), t(beta), True, 0.1, eps)\n"
                             "    return out.numpy(), None", "framework op batch_norm"),
        "torch-alias": ("import torch\nEPS = 1e-5\ndef _bn(x, gamma, beta, eps=EPS):\n"
                        "    if x.ndim != 2 or x.shape[0] < 2 or gamma.shape != (x.shape[1],):\n"
                        "        raise ValueError('shape')\n"
                        "    t = lambda a: torch.from_numpy(a)\n"
                        "    return torch.nn.functional.batch_norm(t(x), None, None, t(gamma), t(beta), True, 0.1,\n"
                        "                                          eps).numpy(), None\n"
                        "batchnorm_forward = _bn", "framework op batch_norm"),
        # the framework under other names, and a results bomb against the judge's memory
        "star-import": ("from torch.nn.functional import *\nimport torch\n"
                        "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                        "    t = torch.from_numpy\n"
                        "    return batch_norm(t(x), None, None, t(gamma), t(beta), True, 0.1, eps).numpy(), None",
                        "framework op batch_norm"),
        "native-op": ("import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                      "    t = torch.from_numpy\n"
                      "    return torch.native_batch_norm(t(x), t(gamma), t(beta), None, None, True, 0.1, eps)[0]"
                      ".numpy(), None", "framework op native_batch_norm"),
        "attrgetter": ("import operator\nimport torch\nimport torch.nn.functional as F\n"
                       "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                       "    t = torch.from_numpy\n"
                       "    return operator.attrgetter('batch_norm')(F)(t(x), None, None, t(gamma), t(beta), True,"
                       " 0.1, eps).numpy(), None", "framework op batch_norm"),
        "huge-result": ("import numpy as np\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                        "    return np.zeros((8_000_000, 1, 1)), None", "shape (8000000, 1, 1), expected"),
        # a layer that computes nothing but shows the judge what it reads back (in the layer's own cell)
        "lazy-layer": ("import numpy as np\nclass BatchNorm1d:\n    def __init__(self, d, eps=1e-5, momentum=0.1):\n"
                       "        self.d = d\n"
                       "    gamma = property(lambda s: np.zeros(s.d), lambda s, v: None)\n"
                       "    beta = property(lambda s: np.zeros(s.d), lambda s, v: None)\n"
                       "    running_mean = property(lambda s: np.zeros((0, s.d)))\n"
                       "    running_var = running_mean\n"
                       "    def train(self):\n        return self\n    def eval(self):\n        return self\n"
                       "    def forward(self, x):\n        return np.zeros_like(x)", "differs from torch",
                       "batchnorm1d"),
        # damage to classmates, the course, the grader's code and HOME
        "overwrite-classmates": (f"import glob\nfor p in glob.glob({c!r} + '/submitted/*/*/*.ipynb'):\n"
                                 "    open(p, 'w').write('{}')", "accesses files"),
        "corrupt-gradebook": (f"open({c + '/gradebook.db'!r}, 'wb').write(b'junk' * 1000)", "accesses files"),
        "plant-startup": (f"import os\nfor h in ({home!r}, os.path.expanduser('~')):\n"
                          "    d = os.path.join(h, '.ipython/profile_default/startup')\n"
                          "    os.makedirs(d, exist_ok=True)\n"
                          "    open(os.path.join(d, '00-cheat.py'), 'w').write('CHEATED = True')", "accesses files"),
        "rewrite-grader": (f"open({repo + '/autograder/bngrade/judge/compare.py'!r}, 'a').write('\\nCHEATED = True\\n')",
                           "accesses files"),
        "network": ("import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\ns.sendall(b'leak')",
                    "network"),
        # bombs
        "orphans": (f"import subprocess\nfor _ in range(3):\n"
                    f"    subprocess.Popen(['sleep', '{MARKER}'], start_new_session=True)", "processes"),
        "fork-bomb": ("import os, time\nkids = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
                      "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n"
                      "    kids += 1", "processes"),
        "memory-bomb": ("import numpy as np\nhog = np.ones(2 * 1024**3 // 8)", "memory"),
        "disk-bomb": ("chunk = b'x' * (1 << 20)\nwith open('junk.bin', 'wb') as fh:\n    for _ in range(200):\n"
                      "        fh.write(chunk)", "disk"),
        "output-bomb": ("import sys\nfor _ in range(80):\n    sys.stdout.write('y' * (1 << 20))", "output"),
        "segfault": ("import ctypes\nctypes.string_at(0)", "Kernel died"),
    }


#: a cell added by the student (no nbgrader metadata) that redefines the graded function with the framework
EXTRA_CELL = ("import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
              "    t = torch.from_numpy\n"
              "    return torch.nn.functional.batch_norm(t(x), None, None, t(gamma), t(beta), True, 0.1, eps)"
              ".numpy(), None")
#: correct answers written differently from the solution: full marks, no flag
CS231N_FORWARD = ("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                  "    if x.ndim != 2 or x.shape[0] < 2 or gamma.shape != (x.shape[1],) or beta.shape != gamma.shape:\n"
                  "        raise ValueError('x must be (N, D) with N >= 2, gamma and beta (D,)')\n"
                  "    mu = x.mean(axis=0, keepdims=True)\n    var = ((x - mu) ** 2).mean(axis=0, keepdims=True)\n"
                  "    x_hat = (x - mu) / np.sqrt(var + eps)\n"
                  "    return (gamma * x_hat + beta).astype(x.dtype), (x, x_hat, mu, var, gamma, beta, eps)\n")


def _answer_cell(nb, grade_id=None):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")
                and grade_id in (None, c.metadata["nbgrader"].get("grade_id")))


def _digest(paths):
    """{file: sha256} of every file below ``paths``."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for root in paths
            for path in sorted(root.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course of its own, so that a successful attack could not spoil the other grading tests."""
    own = Course(tmp_path_factory.mktemp("hostile-course"))
    own.release(ASSIGNMENT, publish=False)
    return own


@pytest.fixture(scope="module")
def hostile(course, tmp_path_factory, monkeypatch_module):
    import socket

    home = tmp_path_factory.mktemp("grader-home")
    monkeypatch_module.setenv("HOME", str(home))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    folder = tmp_path_factory.mktemp("hostile")
    released = course.path("release", ASSIGNMENT, f"{ASSIGNMENT}.ipynb")
    plan = attacks(course, str(home))
    for student, (source, _, *cell) in plan.items():
        nb = nbformat.read(released, as_version=4)
        _answer_cell(nb, *cell).source = source.replace("PORT", str(port))
        target = folder / student / f"{ASSIGNMENT}.ipynb"
        target.parent.mkdir(parents=True)
        nbformat.write(nb, target)
    extra = nbformat.read(released, as_version=4)   # blank answers, and a framework forward in a cell of its own
    extra.cells.insert(extra.cells.index(_answer_cell(extra)) + 1, nbformat.v4.new_code_cell(EXTRA_CELL))
    (folder / "extra-cell").mkdir()
    nbformat.write(extra, folder / "extra-cell" / f"{ASSIGNMENT}.ipynb")
    tamper = nbformat.read(released, as_version=4)
    for cell in tamper.cells:  # test cells emptied and given 100 points: nbgrader restores them
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            cell.source, meta["points"] = "pass", 100
    (folder / "tamper").mkdir()
    nbformat.write(tamper, folder / "tamper" / f"{ASSIGNMENT}.ipynb")
    empty = nbformat.v4.new_notebook()
    (folder / "empty").mkdir()
    nbformat.write(empty, folder / "empty" / f"{ASSIGNMENT}.ipynb")
    (folder / "zz-honest").mkdir()
    make_submission(released, ASSIGNMENT, folder / "zz-honest" / f"{ASSIGNMENT}.ipynb")
    (folder / "zz-cs231n").mkdir()
    make_submission(released, ASSIGNMENT, folder / "zz-cs231n" / f"{ASSIGNMENT}.ipynb",
                    cell_override={"batchnorm_forward": CS231N_FORWARD})
    (folder / "old-format").mkdir()
    old = nbformat.convert(nbformat.read(released, as_version=4), 3)
    (folder / "old-format" / f"{ASSIGNMENT}.ipynb").write_text(nbformat.writes(old, version=3))
    protected = [REPO / "autograder", REPO / "solutions"]
    before = _digest(protected)
    start = time.monotonic()
    report, grades = grade_class(course, ASSIGNMENT, folder, progress=False, cell_timeout=20, jobs=2, limits=LIMITS)
    seconds = time.monotonic() - start
    try:
        conn, _ = listener.accept()
        leaked = conn.recv(10)
    except OSError:
        leaked = b""
    listener.close()
    return {"report": report, "grades": grades, "plan": plan, "home": home, "seconds": seconds, "leaked": leaked,
            "repo_changed": sorted(set(_digest(protected).items()) ^ set(before.items())), "folder": folder}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _scores(course):
    with Gradebook(f"sqlite:///{course.path('gradebook.db')}") as gb:
        return {s.student.id: s.score for s in gb.assignment_submissions(ASSIGNMENT)}


def test_no_attack_gains_a_point(hostile, course):
    scores = _scores(course)
    for student in [*hostile["plan"], "tamper", "extra-cell"]:
        assert scores[student] == 0, f"{student} scored {scores[student]}: {hostile['report'][student]}"


def _flags(course):
    flags = {}
    with course.path("flags.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["assignment"] == ASSIGNMENT:
                flags.setdefault(row["student_id"], []).append(f"{row['cell']}: {row['flag']}")
    return flags


@pytest.mark.parametrize("student", ["zz-honest", "zz-cs231n"])
def test_honest_students_graded_after_them_keep_full_marks_and_raise_no_flag(hostile, course, student):
    """The solution, and a CS231n forward with another cache (which the old judge scored 0 and flagged)."""
    with Gradebook(f"sqlite:///{course.path('gradebook.db')}") as gb:
        sub = gb.find_submission(ASSIGNMENT, student)
        assert sub.score == sub.max_score > 0
    assert hostile["report"][student] == []
    assert _flags(course).get(student) is None


def test_repository_home_and_network_are_untouched(hostile):
    assert not hostile["repo_changed"], f"changed during grading: {hostile['repo_changed'][:6]}"
    assert not list(hostile["home"].rglob("00-cheat.py")), "a startup file was planted in the grader's HOME"
    assert hostile["leaked"] == b"", "a submission reached the grader's machine over the network"


def test_nothing_is_left_running(hostile):
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"sleep {MARKER}"], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes left behind: {left}"


def test_every_attack_is_reported_or_flagged_by_name(hostile, course):
    """In the report, in flags.csv, or in the student's feedback (where a verdict's message goes)."""
    flags = _flags(course)
    for student, (_, words, *_) in hostile["plan"].items():
        feedback = course.path("feedback", student, ASSIGNMENT, f"{ASSIGNMENT}.html")
        said = " | ".join(hostile["report"].get(student, []) + flags.get(student, []))
        said += feedback.read_text() if feedback.exists() else ""
        assert words in said, f"{student}: {words!r} not in {said[:3000]!r}"
    assert any("cell" in flag and "framework op batch_norm" in flag for flag in flags["extra-cell"])
    assert "none of the assignment's cells" in hostile["report"]["empty"][0]
    assert "nbformat 3" in hostile["report"]["old-format"][0]


def test_feedback_holds_no_junk_and_the_class_finished_in_bounded_time(hostile, course):
    feedback = course.path("feedback")
    sizes = sum(p.stat().st_size for p in feedback.rglob("*") if p.is_file())
    assert sizes < 50 * sandbox.MiB, f"feedback/ holds {sizes / sandbox.MiB:.0f} MB"
    assert not list(feedback.rglob("junk.bin"))
    assert hostile["seconds"] < 30 * 60
