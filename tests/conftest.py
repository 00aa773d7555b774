"""Shared fixtures: one nbgrader course per test session, the class graded once per assignment."""
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Graded inputs are drawn with the course's secret salt; the tests grade under a fixed one, so that a run is
# reproducible (tests/test_salt.py runs the solutions under others).
os.environ.setdefault("BNGRADE_SALT", "20261208")

from bngrade.pipeline import device  # noqa: E402
from bngrade.pipeline.course import REPO, Course, assignments  # noqa: E402
from bngrade.sandbox import Limits  # noqa: E402
from bngrade.pipeline.grading import grade_class  # noqa: E402
from class_roster import ROSTER, write_class  # noqa: E402
from emulated_gpu import gpu_for  # noqa: E402


def pytest_configure(config):
    """``--dist loadgroup`` sends each ``xdist_group`` (grading, book) to one worker by setting ``item._nodeid``;
    a pytest whose ``nodeid`` no longer reads it (pytest 9 with xdist 3.8) silently spreads a group over the
    workers, and each of them grades every class and builds the book again."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    try:
        honoured = pytest.Item.nodeid.fget(types.SimpleNamespace(_nodeid="probe@group")) == "probe@group"
    except AttributeError:
        honoured = False
    if not honoured:
        raise pytest.UsageError("this pytest ignores pytest-xdist's xdist_group marks: every worker would grade "
                                "every class; install the versions pinned in requirements.txt")


@pytest.fixture(autouse=True)
def torch_default_dtype_restored():
    """Exercise code run in-process may call torch.set_default_dtype(float64); no test sees another's choice."""
    import torch

    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)


@pytest.fixture(scope="session")
def course(tmp_path_factory):
    """A fresh course directory with every assignment released (not copied into the book)."""
    c = Course(tmp_path_factory.mktemp("course"))
    for assignment in assignments():
        c.release(assignment, publish=False)
    return c


class GradedClasses(dict):
    """{assignment: (report, grades.csv path)}; each seeded class is graded on first use."""

    def __init__(self, course, tmp_path_factory):
        super().__init__()
        self.course, self.tmp = course, tmp_path_factory

    def __missing__(self, assignment):
        folder = write_class(self.course, assignment, self.tmp.mktemp(f"subs_{assignment}"))
        emulated = assignment in device.GPU_ASSIGNMENTS and not device.gpu_available()
        # The emulator runs kernels ~1000x slower than a GPU: limits meant for a GPU would depend on the load.
        limits = Limits(wall=1800) if emulated else None
        with gpu_for(assignment):   # without a GPU, the GPU assignment runs on the CPU emulator
            self[assignment] = grade_class(self.course, assignment, folder, progress=False,
                                           cell_timeout=300 if emulated else 15, jobs=2, limits=limits)
        return self[assignment]


@pytest.fixture(scope="session")
def graded(course, tmp_path_factory):
    return GradedClasses(course, tmp_path_factory)


@pytest.fixture(scope="session")
def book(tmp_path_factory):
    """The book built from a copy of the repository, as the README's build command does."""
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(REPO), "-W", "-n", "--keep-going", "--path-output", str(out)],
                          capture_output=True, text=True)
    return proc, out / "_build" / "html"


@pytest.fixture(scope="session")
def published(book, tmp_path_factory):
    """The student tree ``make publish`` writes (``bnpublish``), from the session's book."""
    from bnpublish import publish

    proc, site = book
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return publish(site, tmp_path_factory.mktemp("publish") / "publish")
