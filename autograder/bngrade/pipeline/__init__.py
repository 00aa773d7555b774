"""The instructor's workflow: the CLI, the course directory, intake of submissions, grading a class, feedback."""
