"""bngrade: the instructor's side of grading, grouped by role.

* :mod:`bngrade.pipeline`: the CLI, the course directory, intake of submissions, grading a class, feedback;
* :mod:`bngrade.sandbox`: where untrusted code runs (one bubblewrap sandbox per run, never as host root);
* :mod:`bngrade.judge`: nbgrader's autograde split at the trust boundary, the comparisons, the static scan;
* :mod:`bngrade.verdicts`: one module per chapter, the trusted verdict of each hidden check.

Untrusted code runs in one place only: the public package :mod:`bncapture` (the probes, ``bncapture.chNN``),
inside a sandbox. Grades are decided in one place only: :mod:`bngrade.verdicts`, outside it.

The judge's contract
--------------------
1. **Computed only from the grader's inputs.** The expected value of every check comes from the grader's own
   pristine copy of the inputs, rebuilt from the public case builders. Nothing read back from the sandbox goes
   into a reference: no attribute of a student object, no argument as the student's call left it.
2. **Opaque values stay opaque.** A cache, a layer's internals, whatever the API calls opaque, is only ever
   handed back to the student's own functions, inside the probe. No record refers to a result by byte
   identity or by a position inside it; a verdict reads only what the API returns in the open.
3. **Exact comparisons.** Structure, shape and dtype kind are checked against the expected value before any
   arithmetic, with no broadcasting; an array's size is checked from its header before it is read; the
   judging process runs under a memory limit of its own (:func:`bngrade.judge.autograde.memory_limit`).
4. **Banned means unavailable.** Where an exercise is "from scratch", the graded functions are built by running
   the answer cells alone, in a fresh interpreter, in a sandbox where the banned packages cannot be imported
   (:mod:`bngrade.judge.frameworks`); a definition in another cell does not count. Every cell of the student's
   is scanned and flagged (:mod:`bngrade.judge.scan`).
5. **Flags with no false positives.** The solution and every correct alternative in the tests raise no flag.
6. **One run per student.** A probe's calls never depend on what the student's code returned: the notebook and
   the probes run once each, and every verdict is decided from that one run.
"""
