"""Grading benchmark: what the sandbox costs per notebook, and how much ``-j 2`` gains on this machine.

Prints two tables measured in this run:

* the same solved notebook executed (the notebook and the probes, at once, as grading does) in bubblewrap
  sandboxes and in plain subprocesses (alternating, median of ``--repeats``): the sandbox's overhead per notebook;
* a class of ``--students`` solved notebooks graded end to end (sandboxed autograde, judge,
  feedback, export) with ``-j 1`` and ``-j 2``: seconds, seconds per notebook, the speed-up (goal: >= 1.8x), and
  the span of each phase (from its first start to its last end).

    python benchmarks/grading.py [--assignment ch02_batchnorm_forward] [--students 8] [--repeats 3]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bngrade.judge import autograde
from bngrade.pipeline import executors, grading
from bngrade import sandbox  # noqa: E402
from bngrade.pipeline.course import Course  # noqa: E402
from submissions import make_submission  # noqa: E402


def overhead(course, assignment, repeats):
    """Median seconds of one notebook's execution in the sandbox and unsandboxed (same runners)."""
    released = course.path("release", assignment, f"{assignment}.ipynb")
    with tempfile.TemporaryDirectory() as tmp:
        solved = nbformat.read(make_submission(released, assignment, Path(tmp) / "nb.ipynb"), as_version=4)
        source = nbformat.read(course.path("source", assignment, f"{assignment}.ipynb"), as_version=4)
        tests = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                 if c.metadata.get("nbgrader", {}).get("grade") and not c.metadata["nbgrader"].get("solution")}
        for cell in solved.cells:   # as nbgrader's OverwriteCells leaves it
            cell.source = tests.get(cell.metadata.get("nbgrader", {}).get("grade_id"), cell.source)
        settings = {"timeout": 120, "interrupt_on_timeout": True}
        times = {True: [], False: []}
        for _ in range(repeats):
            for boxed in (True, False):
                start = time.perf_counter()
                _, status, probed, records, _ = autograde.execute(solved, "nb.ipynb", assignment, settings,
                                                                  sandbox.Limits(), executor=executors.Local(boxed))
                times[boxed].append(time.perf_counter() - start)
                assert status["ended"] == "ok" and probed["ended"] == "ok" and len(records) == len(tests), status
    return statistics.median(times[True]), statistics.median(times[False])


PHASES = {"autograde": "autograde_student", "feedback": "write_feedback",
          "export": "export_grades"}


def class_time(assignment, students, jobs):
    """Seconds to grade ``students`` solved notebooks with ``jobs`` parallel jobs, in a fresh course, and
    {phase: seconds from its first start to its last end} (phases overlap when jobs run at once)."""
    spans = {phase: [] for phase in PHASES}

    def timed(phase, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spans[phase].append((start, time.perf_counter()))
        return run

    with tempfile.TemporaryDirectory() as tmp:
        course = Course(Path(tmp) / "course")
        released = course.release(assignment, publish=False)
        folder = Path(tmp) / "class"
        for i in range(students):
            make_submission(released, assignment, folder / f"s{i}" / f"{assignment}.ipynb")
        originals = {name: getattr(grading, name) for name in PHASES.values()}
        for phase, name in PHASES.items():
            setattr(grading, name, timed(phase, originals[name]))
        try:
            start = time.perf_counter()
            report, _ = grading.grade_class(course, assignment, folder, progress=False, jobs=jobs)
            seconds = time.perf_counter() - start
        finally:
            for name, fn in originals.items():
                setattr(grading, name, fn)
        assert all(not problems for problems in report.values()), report
    return seconds, {phase: max(e for _, e in s) - min(b for b, _ in s) for phase, s in spans.items() if s}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assignment", default="ch02_batchnorm_forward")
    parser.add_argument("--students", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    os.environ.setdefault("BNREF_PROGRESS", "0")
    print(f"# {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, bwrap {sandbox.bwrap()}")
    with tempfile.TemporaryDirectory() as tmp:
        course = Course(Path(tmp) / "course")
        course.release(args.assignment, publish=False)
        boxed, plain = overhead(course, args.assignment, args.repeats)
    print(f"\n## One {args.assignment} notebook (median of {args.repeats})\n")
    print("| run | seconds |\n|---|---|")
    print(f"| in the sandbox | {boxed:.2f} |\n| plain subprocess | {plain:.2f} |\n"
          f"| sandbox overhead | {boxed - plain:+.2f} |")
    (serial, serial_phases), (parallel, parallel_phases) = (class_time(args.assignment, args.students, jobs)
                                                            for jobs in (1, 2))
    print(f"\n## A class of {args.students} ({args.assignment}), end to end\n")
    print("| jobs | seconds | s / notebook | speed-up | " + " | ".join(PHASES) + " |")
    print("|---" * (4 + len(PHASES)) + "|")
    for jobs, seconds, phases in ((1, serial, serial_phases), (2, parallel, parallel_phases)):
        print(f"| {jobs} | {seconds:.1f} | {seconds / args.students:.2f} | {serial / seconds:.2f}x | "
              + " | ".join(f"{phases.get(p, 0.0):.1f}" for p in PHASES) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"sandbox_s": boxed, "plain_s": plain, "j1_s": serial,
                                               "j2_s": parallel, "students": args.students,
                                               "j1_phases_s": serial_phases, "j2_phases_s": parallel_phases},
                                              indent=1))


if __name__ == "__main__":
    main()
