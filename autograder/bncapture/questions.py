"""Probes of the multiple-choice questions: each reads the notebook's answer variable (the key is the grader's)."""
from .probe import Missing

#: question id -> the notebook's variable that holds the answer
VARIABLES = {
    "ch01_covariate_shift": "answer_covariate_shift", "ch01_santurkar": "answer_santurkar",
    "ch02_bias_before_bn": "answer_bias", "ch02_running_var": "answer_running_var",
    "ch03_constant_dout": "answer_constant_dout", "ch03_eval_backward": "answer_eval_backward",
    "ch04_update_ops": "answer_update_ops", "ch04_batch_of_two": "answer_batch_of_two",
    "ch04_learning_rate": "answer_learning_rate", "ch06_param_count": "answer_params",
    "ch06_fold_when": "answer_fold", "ch07_keep_prob": "answer_keep_prob",
    "ch07_variance_shift": "answer_variance_shift", "ch08_small_batch": "answer_small_batch",
    "ch08_syncbn_why": "answer_syncbn_why", "ch08_syncbn_cost": "answer_syncbn_cost",
}


def _probe(question):
    def probe(p):
        """Record the answer as text (a string of at most a few characters is all a verdict reads)."""
        answer = p.student(VARIABLES[question])
        if isinstance(answer, Missing):
            p.call("answer", answer)   # records its NameError
        else:
            p.put("answer", answer if isinstance(answer, str) else None)
    probe.__name__ = question
    return probe


def __getattr__(name):
    if name in VARIABLES:
        return _probe(name)
    raise AttributeError(name)
