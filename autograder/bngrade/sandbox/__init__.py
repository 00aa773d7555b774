"""Where untrusted code runs: one bubblewrap sandbox per submission (:mod:`bngrade.sandbox.bwrap`)."""
from bngrade.sandbox.bwrap import GiB, MiB, Limits, NoSandbox, Outcome, available, bwrap, command, run, run_unsandboxed

__all__ = ["GiB", "MiB", "Limits", "NoSandbox", "Outcome", "available", "bwrap", "command", "run", "run_unsandboxed"]
