"""``python -m bngrade``: the instructor's workflow on nbgrader.

    release                       generate the student notebooks (all assignments)
    grade ASSIGNMENT SUBMISSIONS  collect a folder or zip, autograde, export grades.csv, feedback
    export                        rewrite grades.csv from the gradebook
    feedback ASSIGNMENT           regenerate the feedback HTML

GPU assignments (ch05_cupy_kernels) are graded only on a machine with a CUDA GPU;
elsewhere `grade` refuses them with exit code 2 before collecting anything.

Every submission runs in its own bubblewrap sandbox (no network, no view of the course, the
solutions or your HOME, limited memory, processes, disk, output and time) and is judged outside
it. Where no sandbox can be made, `grade` refuses unless --no-sandbox is given.

`grade --cluster tcp://HOST:8786` runs the sandboxed step on a Dask cluster's workers instead; results are
kept in COURSE/.bngrade/cache/, so a regrade after a change to a verdict re-executes nobody (--no-cache: all).
"""
import argparse
import dataclasses
import os
import sys
import warnings

from bngrade.pipeline.course import DEFAULT_COURSE, Course, assignments
from bngrade.pipeline.grading import (default_limits, export_grades, format_report, from_cache,
                                     grade_class)
from bngrade.pipeline.intake import Problem


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bngrade", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--course", default=str(DEFAULT_COURSE), help="nbgrader course directory (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    rel = sub.add_parser("release", help="generate the student version of each assignment with nbgrader")
    rel.add_argument("assignments", nargs="*", help="default: all of " + ", ".join(assignments()))
    rel.add_argument("--no-publish", action="store_true", help="do not copy the student notebooks into chapters/")
    grade = sub.add_parser("grade", help="collect, autograde, export grades.csv and generate feedback")
    grade.add_argument("assignment", choices=assignments())
    grade.add_argument("submissions", help="folder of per-student folders, or an LMS zip")
    grade.add_argument("--quiet", action="store_true", help="no progress bar")
    grade.add_argument("-j", "--jobs", type=int, default=None,
                       help="students graded in parallel (default: 1, or the cluster's task slots)")
    grade.add_argument("--cluster", default=os.environ.get("BNGRADE_CLUSTER") or None, metavar="tcp://HOST:8786",
                       help="run the sandboxed step on this Dask scheduler's workers (default: $BNGRADE_CLUSTER)")
    grade.add_argument("--no-cache", action="store_true",
                       help="execute every student again instead of reusing COURSE/.bngrade/cache/")
    grade.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: nbgrader config)")
    limits = grade.add_argument_group("sandbox limits, per submission")
    limits.add_argument("--memory-gb", type=float, default=None, help="memory (default: 4)")
    limits.add_argument("--processes", type=int, default=None, help="processes and threads at once (default: 256)")
    limits.add_argument("--disk-mb", type=int, default=None, help="disk written in the notebook's folder (default: 1024)")
    limits.add_argument("--output-mb", type=int, default=None, help="results sent back (default: 256)")
    limits.add_argument("--wall-seconds", type=int, default=None,
                        help="whole notebook (default: 600, or 300 for a GPU assignment)")
    grade.add_argument("--no-sandbox", action="store_true",
                       help="grade without a sandbox where none can be made (student code runs with your rights; "
                            "every row is reported as not sandboxed)")
    exp = sub.add_parser("export", help="write grades.csv from the gradebook")
    exp.add_argument("--to", default=None, help="CSV path (default: COURSE/grades.csv)")
    fb = sub.add_parser("feedback", help="generate feedback HTML (hidden tests removed)")
    fb.add_argument("assignment", choices=assignments())
    args = parser.parse_args(argv)

    course = Course(args.course)
    if args.command == "release":
        for assignment in args.assignments or assignments():
            released = course.release(assignment, publish=not args.no_publish)
            print(f"released {assignment}: {released}")
    elif args.command == "grade":
        chosen = {"memory": args.memory_gb and int(args.memory_gb * (1 << 30)), "processes": args.processes,
                  "disk": args.disk_mb and args.disk_mb << 20, "output": args.output_mb and args.output_mb << 20,
                  "wall": args.wall_seconds}
        limits = dataclasses.replace(default_limits(args.assignment), **{k: v for k, v in chosen.items() if v})
        if args.no_sandbox:
            warnings.warn("--no-sandbox: student code runs with your rights, with no limit but the wall clock")
        try:
            report, grades = grade_class(course, args.assignment, args.submissions,
                                         progress=not args.quiet, cell_timeout=args.cell_timeout, jobs=args.jobs,
                                         limits=limits, sandboxed=not args.no_sandbox, cluster=args.cluster,
                                         cache=not args.no_cache)
        except Problem as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_report(report))
        reused = from_cache(course, args.assignment, report)
        print(f"from the execution cache: {len(reused)} of {len(report)} students")
        print(f"grades: {grades}")
        print(f"flags for review: {course.path('flags.csv')}")
        print(f"feedback: {course.path('feedback')}")
        return 1 if any(report.values()) else 0
    elif args.command == "export":
        print(export_grades(course, args.to))
    elif args.command == "feedback":
        course.check("generate_feedback", args.assignment, "--force")
        print(course.path("feedback"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
