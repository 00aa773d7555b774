"""Grade a class with nbgrader, one student at a time, and report what went wrong for whom.

Each student's ``nbgrader autograde`` runs in its own process group under a
hard wall-clock limit, so an infinite loop, a crashed or hung kernel, or a
broken notebook costs that student only: it is reported by name and the rest
of the class is graded.
"""
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from .intake import STUDENT_ID, Problem, collect

# Per-cell limits are nbgrader's (Execute.timeout); this caps a whole notebook.
NOTEBOOK_WALL_SECONDS = 600


def _cell_errors(notebook):
    """Problems visible in an autograded notebook: timeouts and dead kernels, by cell."""
    found = []
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "?")
        for output in cell.get("outputs", []):
            if output.output_type == "error" and output.ename in ("CellTimeoutError", "DeadKernelError"):
                found.append(f"{output.ename} in cell {grade_id!r}")
    return found


def _summarize_failure(log):
    """The most telling line of a failed nbgrader run."""
    for key in ("DeadKernelError", "Kernel died", "CellTimeoutError", "Timeout", "NotJSONError", "Error"):
        for line in log.splitlines():
            if key in line:
                return line.strip()[:300]
    return log.strip().splitlines()[-1][:300] if log.strip() else "no output"


def autograde_student(course, assignment, student, cell_timeout=None, wall_seconds=NOTEBOOK_WALL_SECONDS):
    """Autograde one submission; returns a list of problems (empty when all went well).

    ``cell_timeout`` (seconds) overrides the configured per-cell limit.
    """
    extra = [f"--Execute.timeout={cell_timeout}"] if cell_timeout else []
    code, log = course.nbgrader("autograde", assignment, "--student", student, "--force", *extra,
                                timeout=wall_seconds)
    if code is None:
        return [f"killed after {wall_seconds} s of wall-clock time (hung kernel or endless output)"]
    graded = course.path("autograded", student, assignment, f"{assignment}.ipynb")
    problems = _cell_errors(graded) if graded.exists() else []
    if code != 0:
        problems.append(f"nbgrader autograde failed: {_summarize_failure(log)}")
    return problems


def ensure_students(course, students):
    """Add students to the gradebook so that they appear in grades.csv even without a grade."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course.path('gradebook.db')}", "bn-course") as gb:
        for student in students:
            gb.update_or_create_student(student)


def grade_class(course, assignment, submissions, progress=True, cell_timeout=None):
    """Collect, autograde, export and generate feedback for a whole class.

    Args:
        course: :class:`bngrade.course.Course` with the assignment released.
        assignment: assignment id.
        submissions: folder of per-student folders, or an LMS zip.
        cell_timeout: seconds per cell, instead of the configured Execute.timeout.

    Returns:
        {student: [problems]} for every student found, and the path of grades.csv.
    """
    students, intake_problems = collect(submissions, assignment, course)
    report = {who: [msg] for who, msg in intake_problems.items()}
    for student in tqdm(students, desc=f"grading {assignment}", unit="student", disable=not progress):
        report[student] = autograde_student(course, assignment, student, cell_timeout)
    ensure_students(course, [s for s in report if STUDENT_ID.match(s)])
    grades = export_grades(course)
    course.check("generate_feedback", assignment, "--force")
    return report, grades


def export_grades(course, to=None):
    """Write nbgrader's CSV export of the gradebook; returns its path."""
    to = Path(to or course.path("grades.csv")).resolve()
    course.check("export", "--to", str(to))
    return to


def format_report(report):
    """A plain-text table: one line per student, OK or the problems found."""
    width = max([len(s) for s in report] + [7])
    lines = [f"{'student':<{width}}  status"]
    for student in sorted(report):
        problems = report[student]
        lines.append(f"{student:<{width}}  {'OK' if not problems else '; '.join(problems)}")
    return "\n".join(lines)


__all__ = ["Problem", "autograde_student", "grade_class", "export_grades", "format_report"]
