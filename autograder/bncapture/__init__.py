"""The grader's capture helper: the only grading code that runs beside a student's notebook.

It is public on purpose. Inside the sandbox it knows no reference, no expected
output and no answer key: the hidden part of each test cell is replaced by one
call, ``capture("<grade id>", globals())``, which performs the calls that the
grader prepared for that cell (:mod:`bncapture.runner`) on the inputs the grader
wrote as data, and saves what the student's code returned as plain data
(:mod:`bncapture.codec`: JSON and ``.npz``, never pickle). The grader decides
every grade outside the sandbox, from its own copy of the inputs.
"""
from .runner import capture

__all__ = ["capture"]
