"""The seeded class every grading test uses: for each assignment, the students, what they
submit, and exactly which grade cells each must lose."""
import shutil

from submissions import make_submission

FORWARD_VAR = "var = (centered * centered).mean(axis=0)"

ROSTER = {
    "ch01_why_normalize": {
        "solution": {},
        "blank": None,
        "std-ddof1": {"replace": {"standardize": [("std = X.std(axis=0)", "std = X.std(axis=0, ddof=1)")]},
                      "lose": {"test_standardize"}, "says": "ddof=1"},
        "cond-of-x": {"replace": {"condition_number": [
            ("eigenvalues = np.linalg.eigvalsh(X.T @ X / X.shape[0])", "eigenvalues = np.linalg.svd(X)[1][::-1]")]},
            "lose": {"test_condition_number"}, "says": "condition number of X itself"},
    },
    "ch02_batchnorm_forward": {
        "solution": {},
        "blank": None,
        "unbiased-var": {"replace": {"batchnorm_forward": [(FORWARD_VAR, "var = (centered * centered).sum(axis=0) / (n - 1)")]},
                         "lose": {"test_forward", "test_batchnorm1d"}, "says": "your variance divides by N-1"},
        "eps-outside": {"replace": {"batchnorm_forward": [("rstd = 1.0 / np.sqrt(var + eps)",
                                                           "rstd = 1.0 / (np.sqrt(var) + eps)")]},
                        "lose": {"test_forward", "test_batchnorm1d"}, "says": "eps is added outside the square root"},
        "wrong-axis": {"replace": {"batchnorm_forward": [
            ("mean = x.mean(axis=0)", "mean = x.mean(axis=1, keepdims=True)"),
            (FORWARD_VAR, "var = (centered * centered).mean(axis=1, keepdims=True)")]},
            "lose": {"test_forward", "test_batchnorm1d"}, "says": "the statistics are taken over the wrong axis"},
        "tf-momentum": {"replace": {"update_running_stats": [
            ("(1 - momentum) * running_mean + momentum * batch_mean", "momentum * running_mean + (1 - momentum) * batch_mean"),
            ("(1 - momentum) * running_var + momentum * batch_var", "momentum * running_var + (1 - momentum) * batch_var")]},
            "lose": {"test_running_stats", "test_batchnorm1d"}, "says": "Keras/TF convention"},
        # A correct answer that writes a warning to stderr keeps its points.
        "noisy": {"replace": {"batchnorm_forward": [(FORWARD_VAR, FORWARD_VAR + "\n    import warnings\n    warnings."
                                                     "simplefilter('always')\n    warnings.warn('old API', DeprecationWarning)")]},
                  "lose": set()},
        "endless-loop": {"override": {"keras_momentum_to_torch": "while True:\n    pass"},
                         "lose": {"test_keras_momentum"}, "problem": "CellTimeoutError"},
        "kernel-crash": {"override": {"answer_bias": "import os\nos._exit(1)"}, "problem": "Kernel died"},
        "broken-json": {"raw": "{ this is not a notebook", "problem": "not a readable notebook"},
    },
}


def write_class(course, assignment, folder):
    """Write one folder per student of ``ROSTER[assignment]`` below ``folder``; returns ``folder``."""
    released = course.path("release", assignment, f"{assignment}.ipynb")
    for student, spec in ROSTER[assignment].items():
        target = folder / student / f"{assignment}.ipynb"
        target.parent.mkdir(parents=True)
        if spec is None:
            shutil.copyfile(released, target)
        elif "raw" in spec:
            target.write_text(spec["raw"])
        else:
            make_submission(released, assignment, target, spec.get("replace"), spec.get("override"))
    return folder
