"""A small seeded class of chapter 2 for the cache and cluster tests: the solution and one seeded mistake."""
from nbgrader.api import Gradebook

from bngrade.pipeline.course import Course
from bngrade.sandbox import Limits
from class_roster import ROSTER
from submissions import make_submission

ASSIGNMENT = "ch02_batchnorm_forward"
STUDENTS = ("solution", "unbiased-var")
#: small limits: these notebooks need seconds
LIMITS = Limits(wall=120)


def small_course(folder):
    """A course below ``folder`` with chapter 2 released, and the folder of its class's submissions."""
    course = Course(folder / "course")
    course.release(ASSIGNMENT, publish=False)
    subs = folder / "subs"
    for student in STUDENTS:
        spec = ROSTER[ASSIGNMENT][student]
        make_submission(course.path("release", ASSIGNMENT, f"{ASSIGNMENT}.ipynb"), ASSIGNMENT,
                        subs / student / f"{ASSIGNMENT}.ipynb", spec.get("replace"), spec.get("override"))
    return course, subs


def grades(course, students=STUDENTS):
    """{student: {cell: score}} from the gradebook."""
    with Gradebook(f"sqlite:///{course.path('gradebook.db')}") as gb:
        return {s: {g.name: g.score for g in gb.find_submission_notebook(ASSIGNMENT, ASSIGNMENT, s).grades
                    if g.cell_type == "code" and g.max_score} for s in students}
