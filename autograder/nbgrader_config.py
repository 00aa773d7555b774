"""nbgrader configuration of the course; ``python -m bngrade`` writes a course
directory whose own nbgrader_config.py loads this file."""
c = get_config()  # noqa: F821  (provided by traitlets when nbgrader loads this file)

c.CourseDirectory.course_id = "bn-course"

# Student code gets at most this many seconds per cell; an infinite loop is
# interrupted and recorded as CellTimeoutError in that cell, and grading goes on.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True
c.Execute.error_on_timeout = {
    "ename": "CellTimeoutError",
    "evalue": "this cell ran past the grader's time limit and was stopped: look for an endless loop",
    "traceback": ["CellTimeoutError: this cell ran past the grader's time limit and was stopped"],
}

# nbgrader scores 0 any test cell with stderr output. Warnings and progress
# bars are not errors: drop those stderr outputs before grading.
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = r"Warning:|\d+%\|"

c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}

# Autograde: nbgrader's sanitizing steps restore every test cell; then the notebook runs in a sandbox
# (bngrade.judge.autograde.SandboxedExecute, configured as c.Execute.*), and every test cell is judged outside it
# (bngrade.judge.autograde.Judge) before nbgrader's own SaveAutoGrades scores it.
c.Autograde.autograde_preprocessors = [
    "bngrade.judge.autograde.SandboxedExecute",
    "nbgrader.preprocessors.IgnorePattern",
    "bngrade.judge.autograde.Judge",
    "nbconvert.preprocessors.ClearMetadataPreprocessor",
    "nbgrader.preprocessors.LimitOutput",
    "nbgrader.preprocessors.SaveAutoGrades",
    "nbgrader.preprocessors.AssignLatePenalties",
    "nbgrader.preprocessors.CheckCellMetadata",
]

# Feedback: remove hidden-test code (nbgrader #1363) and reduce tracebacks to
# the assertion message, so no hidden test reaches a student. The page is written by an exporter that
# sanitizes the student's HTML (nh3) and forbids scripts (a Content-Security-Policy), so that opening
# a hostile student's feedback runs nothing.
c.GenerateFeedback.exporter_class = "bngrade.pipeline.feedback.SafeFeedbackExporter"
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbgrader.preprocessors.ClearHiddenTests",
    "bngrade.pipeline.feedback.ShortTracebacks",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
]
