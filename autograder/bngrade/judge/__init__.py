"""The trusted judge: nbgrader's autograde split at the trust boundary, comparisons, the static scan."""
