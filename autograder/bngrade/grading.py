"""Grade a class with nbgrader, one student at a time, and report what went wrong for whom.

Each student's ``nbgrader autograde`` runs in its own process group under a
hard wall-clock limit, so an infinite loop, a crashed or hung kernel, or a
broken notebook costs that student only: it is reported by name and the rest
of the class is graded.
"""
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from .device import GPU_ASSIGNMENTS, GPU_NOTEBOOK_WALL_SECONDS, require_device
from .intake import STUDENT_ID, Problem, collect

# Per-cell limits are nbgrader's (Execute.timeout); this caps a whole notebook.
NOTEBOOK_WALL_SECONDS = 600
# Parallel jobs share the SQLite gradebook; a job that finds it locked retries.
LOCK_RETRIES = 3


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


def feedback_student(course, assignment, student):
    """Generate one student's feedback HTML; returns a list of problems."""
    code, log = course.nbgrader("generate_feedback", assignment, "--student", student, "--force",
                                timeout=NOTEBOOK_WALL_SECONDS)
    return [] if code == 0 else [f"feedback not generated: {_summarize_failure(log)}"]


def write_feedback(course, assignment, students, report):
    """Feedback HTML for every graded student, adding any failure to ``report``.

    One nbgrader run serves the whole class (a process start per student costs
    more than the feedback itself); if it fails, each student is retried alone
    so that one bad notebook costs only its own feedback.
    """
    graded = [s for s in students if course.path("autograded", s, assignment).exists()]
    if not graded:
        return
    code, _ = course.nbgrader("generate_feedback", assignment, "--force", timeout=NOTEBOOK_WALL_SECONDS)
    if code == 0:
        return
    for student in graded:
        report[student] += feedback_student(course, assignment, student)


def autograde_student(course, assignment, student, cell_timeout=None, wall_seconds=None):
    """Autograde one submission; returns a list of problems (empty when all went well).

    ``cell_timeout`` (seconds) overrides the configured per-cell limit. ``wall_seconds`` caps
    the whole notebook (default: NOTEBOOK_WALL_SECONDS, or GPU_NOTEBOOK_WALL_SECONDS for a
    GPU assignment, whose hung kernel cannot be interrupted, only killed).
    """
    if wall_seconds is None:
        wall_seconds = GPU_NOTEBOOK_WALL_SECONDS if assignment in GPU_ASSIGNMENTS else NOTEBOOK_WALL_SECONDS
    extra = [f"--Execute.timeout={cell_timeout}"] if cell_timeout else []
    for attempt in range(LOCK_RETRIES + 1):
        code, log = course.nbgrader("autograde", assignment, "--student", student, "--force", *extra,
                                    timeout=wall_seconds)
        if code == 0 or "database is locked" not in (log or ""):
            break
        time.sleep(1 + attempt)  # another job held the SQLite gradebook: try again
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


def grade_class(course, assignment, submissions, progress=True, cell_timeout=None, jobs=1):
    """Collect, autograde, export and generate feedback for a whole class.

    Args:
        course: :class:`bngrade.course.Course` with the assignment released.
        assignment: assignment id.
        submissions: folder of per-student folders, or an LMS zip.
        cell_timeout: seconds per cell, instead of the configured Execute.timeout.
        jobs: students graded at the same time, each in its own nbgrader process.

    Returns:
        {student: [problems]} for every student found, and the path of grades.csv.

    Raises:
        Problem: before anything is collected, for a GPU assignment on a machine without a GPU.
    """
    require_device(assignment)
    students, intake_problems = collect(submissions, assignment, course)
    report = {who: [msg] for who, msg in intake_problems.items()}
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(autograde_student, course, assignment, s, cell_timeout): s for s in students}
        done = as_completed(futures)
        for future in tqdm(done, total=len(futures), desc=f"grading {assignment}", unit="student",
                           disable=not progress):
            report[futures[future]] = future.result()
    write_feedback(course, assignment, students, report)
    ensure_students(course, [s for s in report if STUDENT_ID.match(s)])
    return report, export_grades(course)


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
