"""The nbgrader course directory and the commands run in it.

The course directory (default ``autograder/course/``, not tracked by git) is
nbgrader's standard layout: ``source/``, ``release/``, ``submitted/``,
``autograded/``, ``feedback/`` and the SQLite ``gradebook.db``. Its
``nbgrader_config.py`` loads the course configuration in ``autograder/``.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jupytext

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "solutions" / "notebooks"
CHAPTERS = REPO / "chapters"
CONFIG = REPO / "autograder" / "nbgrader_config.py"
DEFAULT_COURSE = REPO / "autograder" / "course"


def assignments():
    """Assignment ids, one per solved source ``solutions/notebooks/chNN_name.md``, in order."""
    return sorted(p.stem for p in SOURCES.glob("ch*_*.md"))


def chapter_dir(assignment):
    """The book folder of an assignment: ``ch02_batchnorm_forward`` -> ``chapters/02_batchnorm_forward``."""
    return CHAPTERS / assignment[2:]


class Course:
    """An nbgrader course directory rooted at ``root``."""

    def __init__(self, root=DEFAULT_COURSE):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "nbgrader_config.py").write_text(
            f"c = get_config()\nload_subconfig({str(CONFIG)!r})\nc.CourseDirectory.root = {str(self.root)!r}\n"
        )

    def path(self, *parts):
        return self.root.joinpath(*parts)

    def salt(self):
        """The course's secret input salt (``.bngrade/salt``, made once; ``BNGRADE_SALT`` overrides it): graded
        inputs are drawn with it, so that the public probes' inputs cannot be answered ahead."""
        if os.environ.get("BNGRADE_SALT"):
            return int(os.environ["BNGRADE_SALT"])
        path = self.path(".bngrade", "salt")
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(secrets.randbits(62)))
            path.chmod(0o600)
        return int(path.read_text())

    def nbgrader(self, *args, timeout=None, env=None):
        """Run ``nbgrader ARGS`` in the course directory.

        The command runs in its own process group, so that on ``timeout`` the
        whole group, kernels included, is killed (a hung kernel cannot be
        interrupted from inside).

        ``env`` adds environment variables (the grading run's settings for the sandboxed steps).

        Returns:
            (returncode, output); returncode is None after a timeout.
        """
        env = dict(os.environ, **(env or {}))
        # nbgrader shells out to `alembic` when it creates a gradebook: use this environment's.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("PYTHONWARNINGS", "ignore")
        env.setdefault("BNREF_PROGRESS", "0")  # no progress bars from the notebooks' training loops
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbgrader", *args], cwd=self.root, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return None, out

    def check(self, *args, timeout=None):
        """Run ``nbgrader ARGS``; raise RuntimeError with its output when it fails."""
        code, out = self.nbgrader(*args, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"nbgrader {' '.join(args)} failed ({'timeout' if code is None else code}):\n{out}")
        return out

    def write_source(self, assignment):
        """Convert the solved text source to ``source/<id>/<id>.ipynb`` (no outputs)."""
        nb = jupytext.read(SOURCES / f"{assignment}.md")
        nb.metadata.pop("jupytext", None)
        for index, cell in enumerate(nb.cells):  # stable ids keep the generated notebooks diffable
            cell.id = cell.metadata.get("nbgrader", {}).get("grade_id", f"cell-{index}")
        target = self.path("source", assignment, f"{assignment}.ipynb")
        target.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(nb, target, fmt="ipynb")
        return target

    def release(self, assignment, publish=True):
        """Generate the student version with nbgrader; copy it into the book when ``publish``."""
        self.write_source(assignment)
        self.check("generate_assignment", assignment, "--force")
        released = self.path("release", assignment, f"{assignment}.ipynb")
        if publish:
            shutil.copyfile(released, chapter_dir(assignment) / released.name)
        return released
