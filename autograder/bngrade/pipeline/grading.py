"""Grade a class with nbgrader, one student at a time, and report what went wrong for whom.

Each student's ``nbgrader autograde`` runs the notebook and the probes once each, in their own
sandboxes (:mod:`bngrade.judge.autograde`, :mod:`bngrade.sandbox`), and judges them outside, so an infinite loop,
a crashed or hung kernel, a limit gone past or a broken notebook costs that student only: it is
reported by name and the rest of the class is graded. Flags for the instructor's review go to
``flags.csv`` next to ``grades.csv``.
"""
import csv
import json
import time
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from bngrade import sandbox
from bngrade.pipeline import executors
from bngrade.pipeline.device import GPU_ASSIGNMENTS, GPU_NOTEBOOK_WALL_SECONDS, require_device
from bngrade.pipeline.intake import STUDENT_ID, Problem, collect

# Per-cell limits are nbgrader's (Execute.timeout); this caps a whole notebook in its sandbox.
NOTEBOOK_WALL_SECONDS = 600
# On top of the sandbox's wall clock: nbgrader's own steps and the judge, for one student.
JUDGE_SECONDS = 120
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
    for key in ("EnvironmentMismatchError:", "DeadKernelError", "Kernel died", "CellTimeoutError", "Timeout", "NotJSONError", "Error"):
        for line in log.splitlines():
            if key in line:
                return line.strip()[:300]
    return log.strip().splitlines()[-1][:300] if log.strip() else "no output"


def feedback_student(course, assignment, student):
    """Generate one student's feedback HTML; returns a list of problems."""
    code, log = course.nbgrader("generate_feedback", assignment, "--student", student, "--force",
                                timeout=NOTEBOOK_WALL_SECONDS)
    return [] if code == 0 else [f"feedback not generated: {_summarize_failure(log)}"]


def write_feedback(course, assignment, students, report, others=()):
    """Feedback HTML for the graded ones among ``students``, adding any failure to ``report``.

    One nbgrader run serves them all (a process start per student costs more than the feedback itself),
    with ``others`` (students it must leave alone: another job's share) excluded; if it fails, each student
    is retried alone so that one bad notebook costs only its own feedback.
    """
    graded = [s for s in students if course.path("autograded", s, assignment).exists()]
    if not graded:
        return
    exclude = sorted(set(others) - set(graded))
    extra = [f"--CourseDirectory.student_id_exclude={','.join(exclude)}"] if exclude else []
    code, _ = course.nbgrader("generate_feedback", assignment, "--force", *extra, timeout=NOTEBOOK_WALL_SECONDS)
    if code == 0:
        return
    for student in graded:
        report[student] += feedback_student(course, assignment, student)


def shares(students, jobs):
    """``students`` dealt into at most ``jobs`` non-empty lists, one per parallel job."""
    return [share for share in (students[k::jobs] for k in range(max(1, jobs))) if share]


def default_limits(assignment):
    """The sandbox limits of an assignment: a GPU notebook's hung kernel cannot be interrupted, only killed,
    so its wall clock is shorter."""
    wall = GPU_NOTEBOOK_WALL_SECONDS if assignment in GPU_ASSIGNMENTS else NOTEBOOK_WALL_SECONDS
    return sandbox.Limits(wall=wall)


def run_env(course, assignment, limits, sandboxed=True, cluster=None, cache=True):
    """Environment of one grading run's nbgrader processes: where the reports go, the limits, the GPU, the
    executor (:func:`bngrade.pipeline.executors.from_env`) and the execution cache (``cache=False``: run
    everyone again, and keep the new results)."""
    env = {"BNGRADE_WORK": str(course.path(".bngrade", assignment)), "BNGRADE_SALT": str(course.salt()),
           "BNGRADE_LIMITS": json.dumps(asdict(limits)),
           "BNGRADE_GPU": "1" if assignment in GPU_ASSIGNMENTS else "0",
           "BNGRADE_CACHE": str(course.path(".bngrade", "cache")), "BNGRADE_NO_CACHE": "0" if cache else "1",
           "BNGRADE_CLUSTER": cluster or ""}
    if not sandboxed:
        env["BNGRADE_NO_SANDBOX"] = "1"
    return env


def cluster_slots(assignment, address):
    """Task slots of the Dask cluster at ``address``, checked before anything is collected.

    Raises:
        Problem: when the scheduler cannot be reached, has no worker, or (for a GPU assignment) has no worker
        that declares a GPU resource.
    """
    try:
        client = executors.connect(address)
    except (OSError, TimeoutError) as exc:
        raise Problem(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    with client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise Problem(f"the Dask scheduler at {address} has no worker")
        if assignment in GPU_ASSIGNMENTS and not executors.gpu_workers(client):
            raise Problem(f"{assignment} needs a GPU, and no worker of {address} declares one: start a worker "
                          "on a GPU machine with `dask worker --resources GPU=1`")
        return sum(info.get("nthreads", 1) for info in workers.values())


def read_report(course, assignment, student):
    """(problems, flags) that the judge wrote for one student; nothing if it did not get that far."""
    path = course.path(".bngrade", assignment, "reports", f"{student}.json")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], []
    return list(report.get("problems", [])), [tuple(f) for f in report.get("flags", [])]


def autograde_student(course, assignment, student, cell_timeout=None, limits=None, env=None):
    """Autograde one submission; returns a list of problems (empty when all went well).

    ``cell_timeout`` (seconds) overrides the configured per-cell limit; ``limits`` are the sandbox's
    (default: :func:`default_limits`). nbgrader itself gets a wall clock above the sandbox's, so that the
    sandbox's limit is the one that names the problem.
    """
    limits = limits or default_limits(assignment)
    env = env or run_env(course, assignment, limits)
    wall_seconds = limits.wall + JUDGE_SECONDS
    extra = [f"--Execute.timeout={cell_timeout}"] if cell_timeout else []
    report = course.path(".bngrade", assignment, "reports", f"{student}.json")
    report.unlink(missing_ok=True)
    for attempt in range(LOCK_RETRIES + 1):
        code, log = course.nbgrader("autograde", assignment, "--student", student, "--force", *extra,
                                    timeout=wall_seconds, env=env)
        if code == 0 or "database is locked" not in (log or ""):
            break
        time.sleep(1 + attempt)  # another job held the SQLite gradebook: try again
    if code is None:
        return [f"killed at the grader's wall-clock limit ({wall_seconds} s)"]
    graded = course.path("autograded", student, assignment, f"{assignment}.ipynb")
    problems = _cell_errors(graded) if graded.exists() else []
    judged, _ = read_report(course, assignment, student)
    problems += [p for p in judged if p not in problems]
    if code != 0:
        problems.append(f"nbgrader autograde failed: {_summarize_failure(log)}")
    return problems


def from_cache(course, assignment, students):
    """Those of ``students`` whose last grading reused the execution cache instead of running."""
    found = set()
    for student in students:
        try:
            report = json.loads(course.path(".bngrade", assignment, "reports", f"{student}.json").read_text())
        except (OSError, ValueError):
            continue
        if report.get("cached"):
            found.add(student)
    return found


def write_flags(course, assignment, students):
    """``flags.csv`` next to grades.csv: one row per flag (student, assignment, cell, what); returns its path."""
    path = course.path("flags.csv")
    rows = []
    if path.exists():
        with path.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("assignment") != assignment]
    for student in sorted(students):
        for cell, what in read_report(course, assignment, student)[1]:
            rows.append({"student_id": student, "assignment": assignment, "cell": cell, "flag": what})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["student_id", "assignment", "cell", "flag"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def ensure_students(course, students):
    """Add students to the gradebook so that they appear in grades.csv even without a grade."""
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course.path('gradebook.db')}", "bn-course") as gb:
        for student in students:
            gb.update_or_create_student(student)


def grade_class(course, assignment, submissions, progress=True, cell_timeout=None, jobs=None, limits=None,
                sandboxed=True, cluster=None, cache=True):
    """Collect, autograde, export and generate feedback for a whole class.

    Args:
        course: :class:`bngrade.pipeline.course.Course` with the assignment released.
        assignment: assignment id.
        submissions: folder of per-student folders, or an LMS zip.
        cell_timeout: seconds per cell, instead of the configured Execute.timeout.
        jobs: students graded at the same time, each in its own nbgrader process and sandbox.
        limits: :class:`bngrade.sandbox.Limits` (default: :func:`default_limits`).
        sandboxed: False only for ``--no-sandbox``: every row is then marked as graded without one.
        cluster: address of a Dask scheduler (``tcp://HOST:8786``) whose workers run the sandboxed step; each
            student still has a local nbgrader process, ``jobs`` of them at once (default: the cluster's slots).
        cache: False runs every student again instead of reusing the execution cache (``.bngrade/cache/``).

    Returns:
        {student: [problems]} for every student found, and the path of grades.csv.

    Raises:
        Problem: before anything is collected, for a GPU assignment on a machine (or cluster) without a GPU,
        when no sandbox can be made here and ``sandboxed`` is True, or when the cluster cannot be reached.
    """
    if cluster:
        slots = cluster_slots(assignment, cluster)
        jobs = jobs or slots
    else:
        require_device(assignment)
    if sandboxed and not cluster:
        why = sandbox.available()
        if why:
            raise Problem(f"cannot grade in a sandbox on this machine: {why}. Student code would run with your "
                          "rights; grade on Linux with user namespaces, or pass --no-sandbox to accept that risk")
    limits = limits or default_limits(assignment)
    students, intake_problems = collect(submissions, assignment, course)
    course.path(".bngrade", assignment, "reports").mkdir(parents=True, exist_ok=True)
    report = {who: [msg] for who, msg in intake_problems.items()}
    env = run_env(course, assignment, limits, sandboxed, cluster, cache)
    jobs = max(1, jobs or 1)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(autograde_student, course, assignment, s, cell_timeout, limits, env): s
                   for s in students}
        done = as_completed(futures)
        for future in tqdm(done, total=len(futures), desc=f"grading {assignment}", unit="student",
                           disable=not progress):
            report[futures[future]] = future.result()
        ensure_students(course, [s for s in report if STUDENT_ID.match(s)])
        write_flags(course, assignment, students)
        # feedback and the CSV export only read the gradebook: each job writes its share's feedback while
        # this thread exports
        everyone = {p.parent.name for p in course.path("autograded").glob(f"*/{assignment}")} | set(students)
        feedback = [pool.submit(write_feedback, course, assignment, share, report, everyone)
                    for share in shares(list(students), jobs)]
        grades = export_grades(course)
        for job in feedback:
            job.result()
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
