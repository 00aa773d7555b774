"""Autograded conceptual questions: the keys and what to tell a student who picks a wrong option.

The released notebook asks the question and lists the options; the visible
test only checks that the answer is one of them. The hidden test is
``check("questions.<id>", globals())``: the probe (:mod:`bncapture.questions`) reads the answer variable.
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
    "ch03_constant_dout": {
        "answer": "B",
        "why": {
            "A": "A correct backward gives exactly this: with dout constant over the batch, sum(dout * out) does not "
                 "depend on x, so dx = 0. The test says nothing either way.",
            "C": "eps is not the reason: the same happens with any eps, because sum_i x_hat_i = 0 for every batch.",
            "D": "A batch of 64 has plenty of gradient; the upstream gradient is what hides it, "
                 "being constant over the batch.",
        },
    },
    "ch03_eval_backward": {
        "answer": "C",
        "why": {
            "A": "In eval mode the running statistics do not depend on the batch, so no gradient flows through them; "
                 "the training-mode formula assumes that it does.",
            "B": "dx sums to 0 per feature only in training mode, where shifting a whole feature changes nothing; "
                 "in eval mode the output moves with x.",
            "D": "The running statistics are fixed, but x still passes through the affine map gamma * x / "
                 "sqrt(running_var + eps), so dx is not 0.",
        },
    },
    "ch04_update_ops": {
        "answer": "D",
        "why": {
            "A": "A learning rate too large would show in the training accuracy too; here training looks fine and "
                 "only the evaluation with training=False fails.",
            "B": "With training=False the layer uses moving_mean and moving_variance, not the statistics of the test "
                 "batch, so the size of the test set does not matter.",
            "C": "eps = 1e-3 barely changes features whose variance is of order 1; it cannot turn 99% into chance.",
        },
    },
    "ch04_batch_of_two": {
        "answer": "C",
        "why": {
            "A": "The unbiased correction only enters the running average; the batch itself is normalized with the "
                 "biased variance, and with two samples that maps them to -1 and +1 whatever their values.",
            "B": "Two samples are accepted (only one is refused), and the variance of two different values is not 0.",
            "D": "gamma and beta can rescale and shift the +-1 outputs, but cannot bring back how far apart the two "
                 "samples were: that information is gone.",
        },
    },
    "ch04_learning_rate": {
        "answer": "A",
        "why": {
            "B": "Training-mode BN normalizes with the batch statistics; the running averages are only used in "
                 "eval mode.",
            "C": "BN does not clip anything: its gradient is an exact derivative.",
            "D": "BN adds parameters (gamma and beta); the number of parameters is not what sets the largest "
                 "stable step.",
        },
    },
    "ch06_param_count": {
        "answer": "B",
        "why": {
            "A": "The statistics, and so gamma and beta, are shared by every position of a channel: a convolution "
                 "applies the same filter everywhere, and BN keeps that invariance.",
            "C": "BN has a shift beta as well as a scale gamma for each channel: 2 * C parameters.",
            "D": "The running mean and variance are buffers, estimated from the batches, not learned by gradient "
                 "descent.",
        },
    },
    "ch06_fold_when": {
        "answer": "C",
        "why": {
            "A": "In training mode BN normalizes with the statistics of the current batch, which change with every "
                 "batch: it is not a fixed affine map, so no fixed weight can replace it.",
            "B": "A bias is folded too: it becomes (bias - running_mean) * scale + beta.",
            "D": "Each output channel's filter, whatever its size, is scaled by that channel's factor.",
        },
    },
    "ch07_keep_prob": {
        "answer": "D",
        "why": {
            "A": "CS231n's p is the probability of KEEPING a unit; torch.nn.Dropout's p is the probability of "
                 "DROPPING it, so keep 0.8 is p = 0.2.",
            "B": "PyTorch uses inverted dropout (it divides by the keep probability during training), so nothing "
                 "is scaled at test time; and its p is the drop probability.",
            "C": "p = 0.2 is right, but torch already divides by the keep probability 0.8 during training; "
                 "at test time nn.Dropout is the identity and nothing more is needed.",
        },
    },
    "ch07_variance_shift": {
        "answer": "A",
        "why": {
            "B": "Inverted dropout keeps the mean: E[mask * x / keep] = x. What it changes is the variance.",
            "C": "In eval mode dropout is the identity; the test outputs are deterministic.",
            "D": "gamma and beta are trained normally; the problem is the running variance, measured with dropout "
                 "noise that is absent at test time.",
        },
    },
    "ch08_small_batch": {
        "answer": "B",
        "why": {
            "A": "The running statistics are only used at test time; during training each layer normalizes with "
                 "the statistics of its 2 images, and that noise (and the mismatch with the running averages) is "
                 "the problem.",
            "C": "eps only keeps the division finite; it does not make a mean and variance over 2 images any less "
                 "noisy.",
            "D": "Statistics over the batch axis are batch norm's, with the same problem; layer norm normalizes "
                 "each sample over its own features.",
        },
    },
    "ch08_syncbn_why": {
        "answer": "C",
        "why": {
            "A": "BN's arithmetic does not overflow with large images; the issue is how few images each GPU sees.",
            "B": "SyncBN still normalizes over a batch, just a larger one (all GPUs'); it is not batch-independent.",
            "D": "SyncBN keeps running statistics for test time, as BN does.",
        },
    },
    "ch08_syncbn_cost": {
        "answer": "D",
        "why": {
            "A": "Only per-channel sums are reduced (count, sum, squared deviations; sum of dy and dy * x_hat): "
                 "O(C) numbers, whatever the batch size.",
            "B": "The statistics are synchronized in every forward pass of every BN layer, not once per epoch.",
            "C": "Data parallelism already keeps a copy of the weights on every GPU; SyncBN adds communication, "
                 "not copies.",
        },
    },
}


def _verdict(question):
    def verdict(r):
        """The answer to ``question``, against the key."""
        q = QUESTIONS[question]
        answer = r.get("answer", "", question, "your answer")
        given = answer.strip().upper()[:20]
        if given == q["answer"]:
            return
        reason = q["why"].get(given, "that is not one of the options.")
        raise AssertionError(f"{question}: {given!r} is not the best answer. {reason}")
    verdict.__name__ = question
    return verdict


def __getattr__(name):
    if name in QUESTIONS:
        return _verdict(name)
    raise AttributeError(name)
