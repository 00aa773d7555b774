"""The public half of grading: the only grading code that runs beside a student's code, in the sandbox.

It is public on purpose, and it decides nothing. It holds no reference, no expected output and no answer key:

* :mod:`bncapture.notebook` runs the whole notebook (visible tests included) for the feedback;
* :mod:`bncapture.answers` runs the answer cells alone in a fresh interpreter, then each test cell's probes;
* :mod:`bncapture.probe` and the chapters' modules (``bncapture.chNN``) are the probes: the inputs (public
  builders, :mod:`bncapture.cases`), the calls and their chaining; what came back is recorded as plain data
  (:mod:`bncapture.codec`: JSON and ``.npz``, never pickle).

The grader decides every grade outside the sandbox, from its own copy of the inputs (``bngrade.verdicts``).
"""
