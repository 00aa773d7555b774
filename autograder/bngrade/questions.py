"""Autograded conceptual questions: the keys and what to tell a student who picks a wrong option.

The released notebook asks the question and lists the options; the visible
test only checks that the answer is one of them. The hidden test calls
:func:`check_choice`.
"""

QUESTIONS = {
    "ch01_covariate_shift": {
        "answer": "C",
        "why": {
            "A": "BN does not whiten: it standardizes each feature separately and ignores correlations.",
            "B": "The running averages are only used at inference; during training BN uses batch statistics.",
            "D": "Santurkar et al. (2018) inject noise after BN to create covariate shift on purpose, "
                 "and BN networks still train well: reduced shift is not what makes BN work.",
        },
    },
    "ch01_santurkar": {
        "answer": "B",
        "why": {
            "A": "Their experiments show BN networks train well even with extra distribution shift added.",
            "C": "BN does not make the loss convex; it makes loss and gradients change more slowly (smoother).",
            "D": "Their argument is about the optimization landscape, not about regularization noise.",
        },
    },
    "ch02_bias_before_bn": {
        "answer": "A",
        "why": {
            "B": "The bias is removed exactly by the mean subtraction, whatever the batch.",
            "C": "beta already provides the shift; the bias adds nothing, so it can be dropped (bias=False).",
            "D": "The bias does not change the variance of the batch: adding a constant does not spread the data.",
        },
    },
    "ch02_running_var": {
        "answer": "D",
        "why": {
            "A": "The batch is normalized with the biased variance, but the running average uses the unbiased one.",
            "B": "Keras' momentum=0.99 is the weight of the old value; PyTorch's 0.1 is the weight of the new one.",
            "C": "PyTorch's default eps is 1e-5; Keras' is 1e-3.",
        },
    },
}


def check_choice(question, answer):
    """Hidden test of a multiple-choice answer."""
    q = QUESTIONS[question]
    given = str(answer).strip().upper() if answer is not None else None
    if given == q["answer"]:
        return
    reason = q["why"].get(given, "that is not one of the options.")
    raise AssertionError(f"{question}: {given!r} is not the best answer. {reason}")
