"""bngrade: instructor tooling for the course: hidden-test checks and the nbgrader workflow CLI."""
