"""``python -m bngrade``: the instructor's workflow on nbgrader.

    release                       generate the student notebooks (all assignments)
    grade ASSIGNMENT SUBMISSIONS  collect a folder or zip, autograde, export grades.csv, feedback
    export                        rewrite grades.csv from the gradebook
    feedback ASSIGNMENT           regenerate the feedback HTML

GPU assignments (ch05_cupy_kernels) are graded only on a machine with a CUDA GPU;
elsewhere `grade` refuses them with exit code 2 before collecting anything.
"""
import argparse
import sys

from .course import DEFAULT_COURSE, Course, assignments
from .grading import export_grades, format_report, grade_class
from .intake import Problem


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
    grade.add_argument("-j", "--jobs", type=int, default=1, help="students graded in parallel (default: 1)")
    grade.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default: nbgrader config)")
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
        try:
            report, grades = grade_class(course, args.assignment, args.submissions,
                                         progress=not args.quiet, cell_timeout=args.cell_timeout, jobs=args.jobs)
        except Problem as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_report(report))
        print(f"grades: {grades}")
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
