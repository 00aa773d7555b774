"""The seeded class every grading test uses: for each assignment, the students, what they
submit, and exactly which grade cells each must lose."""
import shutil

from submissions import make_submission

FORWARD_VAR = "var = (centered * centered).mean(axis=0)"
STAGED_DX = "dx = dxmu + dmu / n"
STAGED_VAR_PATH = "dxmu = dxmu + dvar * 2.0 * xmu / n"
CLOSED_FORM_IN_STAGED_SLOT = """def batchnorm_backward(dout, cache):
    x_hat, xmu, var, eps, gamma = cache
    n = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx = gamma / np.sqrt(var + eps) * (dout - dbeta / n - x_hat * dgamma / n)
    return dx, dgamma, dbeta
"""
SPATIAL_ROWS = "channels_last = x.transpose(0, 2, 3, 1).reshape(n * h * w, c)"
SPATIAL_BACK = "out = out_rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)"
SPATIAL_DOUT_ROWS = "dout_rows = dout.transpose(0, 2, 3, 1).reshape(n * h * w, c)"
SPATIAL_DX_BACK = "dx = dx_rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)"
FOLD_SCALE = "per_channel = gamma / np.sqrt(running_var + eps)"
FOLD_BIAS = "folded_bias = (bias - running_mean) * per_channel + beta"
DROPOUT_TRAIN_FACTOR = 'factor = 1.0 / keep if mode == "inverted" else 1.0'
DROPOUT_EVAL_FACTOR = 'factor = 1.0 if mode == "inverted" else keep'

REDUCTION_VAR = "var = squares(x, mean.reshape((1, -1) + (1,) * (x.ndim - 2)), axis=axes) / count"
WELFORD_STEP = """            const float step = v - m;
            m += step / k;
            q += step * (v - m);"""
WELFORD_FINISH = """    cnt[tid] = k;
    avg[tid] = m;
    dev[tid] = q;"""

EVAL_MODE = "model.eval()  # the running statistics, not those of this batch"
RUN_UPDATE_OPS = "model.run_update_ops()  # TF1: sess.run(tf.get_collection(tf.GraphKeys.UPDATE_OPS))"
RECAL_MOMENTUM = "layer.momentum = 1.0  # replace the running statistics instead of averaging into them"

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
    "ch03_batchnorm_backward": {
        "solution": {},
        "blank": None,
        "no-mean-path": {"replace": {"batchnorm_backward": [(STAGED_DX, "dx = dxmu")]},
                         "lose": {"test_backward"}, "says": "dx is missing the path through the mean"},
        "no-variance-path": {"replace": {"batchnorm_backward": [(STAGED_VAR_PATH, "dxmu = dxmu")]},
                             "lose": {"test_backward"}, "says": "dx is missing the path through the variance"},
        "swapped-dgamma-dbeta": {"replace": {"batchnorm_backward": [("return dx, dgamma, dbeta",
                                                                     "return dx, dbeta, dgamma")]},
                                 "lose": {"test_backward"}, "says": "dgamma and dbeta are swapped"},
        "missing-one-over-n": {"replace": {"batchnorm_backward": [(STAGED_VAR_PATH,
                                                                   "dxmu = dxmu + dvar * 2.0 * xmu")]},
                               "lose": {"test_backward"},
                               "says": "a 1/N factor is missing in the path through the variance"},
        "eps-dropped": {"replace": {"batchnorm_backward": [("inv_std = 1.0 / np.sqrt(var + eps)",
                                                            "inv_std = 1.0 / np.sqrt(var)")]},
                        "lose": {"test_backward"}, "says": "eps is dropped in the backward pass"},
        # The closed form where the staged version belongs is correct: it keeps every point.
        "closed-form-in-staged-slot": {"override": {"batchnorm_backward": CLOSED_FORM_IN_STAGED_SLOT}, "lose": set()},
        # The layer calls the closed form and the eval-mode backward, so their mistakes cost the layer too.
        "closed-form-times-n": {"replace": {"batchnorm_backward_alt": [("scale = gamma / (n * np.sqrt(var + eps))",
                                                                        "scale = gamma / np.sqrt(var + eps)")]},
                                "lose": {"test_backward_alt", "test_batchnorm1d"}, "says": "dx is N times too large"},
        "eval-through-stats": {"replace": {"batchnorm_inference_backward": [(
            "dx = dout * gamma * inv_std",
            "dx = gamma * inv_std * (dout - dout.mean(axis=0) - (x - running_mean) * inv_std"
            " * np.mean(dout * (x - running_mean) * inv_std, axis=0))")]},
            "lose": {"test_inference_backward", "test_batchnorm1d"}, "says": "the running statistics are constants"},
        "one-sided-difference": {"replace": {"eval_numerical_gradient": [("xp[idx] = saved - h", "xp[idx] = saved"),
                                                                         ("/ (2 * h)", "/ h")]},
                                 "lose": {"test_numerical_gradient"}, "says": "uses a one-sided difference"},
        "constant-dout-fooled": {"override": {"answer_constant_dout": 'answer_constant_dout = "A"'},
                                 "lose": {"test_answer_constant_dout"},
                                 "says": "A correct backward gives exactly this"},
    },
    "ch04_training_with_bn": {
        "solution": {},
        "blank": None,
        "eval-in-train-mode": {"replace": {"evaluate": [(EVAL_MODE, "pass")]},
                               "lose": {"test_evaluate"}, "says": "your evaluation runs the network in training mode"},
        "no-update-ops": {"replace": {"train_epoch": [(RUN_UPDATE_OPS, "pass")]},
                          "lose": {"test_train_epoch"}, "says": "the running statistics are never updated"},
        "trains-in-eval-mode": {"replace": {"train_epoch": [("model.train()", "pass")]},
                                "lose": {"test_train_epoch"}, "says": "the network trains in eval mode"},
        "recal-blends": {"replace": {"recalibrate": [(RECAL_MOMENTUM, "pass")]},
                         "lose": {"test_recalibrate"}, "says": "recalibration blends the full-training-set statistics"},
        "recal-keeps-momentum-1": {"replace": {"recalibrate": [("layer.momentum = momentum", "pass")]},
                                   "lose": {"test_recalibrate"}, "says": "recalibrate leaves momentum = 1"},
        "blames-learning-rate": {"override": {"answer_update_ops": 'answer_update_ops = "A"'},
                                 "lose": {"test_answer_update_ops"}, "says": "A learning rate too large"},
    },
    "ch06_batchnorm_cnn": {
        "solution": {},
        "blank": None,
        "naive-reshape": {"replace": {
            "spatial_batchnorm_forward": [(SPATIAL_ROWS, "channels_last = x.reshape(-1, c)"),
                                          (SPATIAL_BACK, "out = out_rows.reshape(n, c, h, w)")],
            "spatial_batchnorm_backward": [(SPATIAL_DOUT_ROWS, "dout_rows = dout.reshape(-1, c)"),
                                           (SPATIAL_DX_BACK, "dx = dx_rows.reshape(n, c, h, w)")]},
            "lose": {"test_spatial_forward", "test_spatial_backward"}, "says": "x.reshape(-1, C)"},
        "per-pixel": {"replace": {"spatial_batchnorm_forward": [
            (SPATIAL_ROWS, "channels_last = x.reshape(n, c * h * w)"),
            ("bn1d_forward(channels_last, gamma, beta, eps)",
             "bn1d_forward(channels_last, np.repeat(gamma, h * w), np.repeat(beta, h * w), eps)"),
            (SPATIAL_BACK, "out = out_rows.reshape(n, c, h, w)")]},
            "lose": {"test_spatial_forward", "test_spatial_backward"}, "says": "the statistics are per pixel"},
        "over-chw": {"replace": {"spatial_batchnorm_forward": [(SPATIAL_BACK, SPATIAL_BACK + (
            "\n    mu = x.mean(axis=(1, 2, 3), keepdims=True)"
            "\n    sd = np.sqrt(x.var(axis=(1, 2, 3), keepdims=True) + eps)"
            "\n    out = (x - mu) / sd * gamma[:, None, None] + beta[:, None, None]"))]},
            "lose": {"test_spatial_forward"}, "says": "taken over (C, H, W)"},
        "swapaxes": {"replace": {  # a different, correct way to move the channel axis
            "spatial_batchnorm_forward": [(SPATIAL_ROWS, "channels_last = x.swapaxes(1, 3).reshape(-1, c)"),
                                          (SPATIAL_BACK, "out = out_rows.reshape(n, w, h, c).swapaxes(1, 3)")],
            "spatial_batchnorm_backward": [(SPATIAL_DOUT_ROWS, "dout_rows = dout.swapaxes(1, 3).reshape(-1, c)"),
                                           (SPATIAL_DX_BACK, "dx = dx_rows.reshape(n, w, h, c).swapaxes(1, 3)")]},
            "lose": set()},
        "fold-no-mean": {"replace": {"fold_batchnorm": [(FOLD_BIAS, "folded_bias = bias * per_channel + beta")]},
                         "lose": {"test_fold"}, "says": "the running mean is missing"},
        "fold-no-eps": {"replace": {"fold_batchnorm": [(FOLD_SCALE, "per_channel = gamma / np.sqrt(running_var)")]},
                        "lose": {"test_fold"}, "says": "eps is missing"},
    },
    "ch07_dropout": {
        "solution": {},
        "blank": None,
        "no-train-scale": {"replace": {"dropout_forward": [(DROPOUT_TRAIN_FACTOR, "factor = 1.0")]},
                           "lose": {"test_dropout_train", "test_dropout_backward"}, "says": "no scaling at train time"},
        "eval-scaled": {"replace": {"dropout_forward": [(DROPOUT_EVAL_FACTOR, "factor = keep")]},
                        "lose": {"test_dropout_eval", "test_dropout_backward"}, "says": "scaling in eval mode"},
        "p-as-keep": {"replace": {"dropout_forward": [("keep = 1.0 - p", "keep = p")]},
                      "lose": {"test_dropout_train", "test_dropout_classic", "test_dropout_backward"},
                      "says": "p is used as the keep probability"},
        "new-mask-backward": {"replace": {"dropout_backward": [
            ("dx = dout * kept * factor",
             "dx = dout * (np.random.default_rng().random(dout.shape) < kept.mean()) * factor")]},
            "lose": {"test_dropout_backward"}, "says": "a new mask is drawn in the backward pass"},
        "eval-mask": {"replace": {"dropout_forward": [("if not train:", "if False:")]},
                      "lose": {"test_dropout_eval", "test_dropout_classic", "test_dropout_backward"},
                      "says": "a mask is applied in eval mode"},
        "binomial": {"replace": {"dropout_forward": [  # another random stream, still correct
            ("kept = rng.random(x.shape) < keep", "kept = rng.binomial(1, keep, size=x.shape)")]}, "lose": set()},
    },
}

LN_MEAN = "centered = x - x.mean(axis=1, keepdims=True)"
NORM_RSTD = "rstd = 1.0 / np.sqrt((centered * centered).mean(axis=1, keepdims=True) + eps)"
LN_DX = "dx = rstd * (g - g.mean(axis=1, keepdims=True) - x_hat * (g * x_hat).mean(axis=1, keepdims=True))"
GN_ROWS = "rows = x.reshape(n * groups, -1)"
GN_BACK = "x_hat = (centered * rstd).reshape(x.shape)"
MERGE_M2 = "qa + qb + delta * delta * (na * nb / n)"
SYNC_TOTALS = "totals = all_reduce(np.concatenate([[x.size // x.shape[1]], x.sum(axis=axes, dtype=np.float64)]))"
SYNC_M2 = "m2 = all_reduce((centered.astype(np.float64) ** 2).sum(axis=axes))"
MERGE_BY_SUMS = """def merge_moments(parts):
    parts = [(n, np.asarray(m), np.asarray(q)) for n, m, q in parts if n > 0]
    if not parts:
        raise ValueError("no data")
    count = sum(n for n, _, _ in parts)
    sx = sum(n * m for n, m, _ in parts)
    sxx = sum(q + n * m * m for n, m, q in parts)
    mean = sx / count
    return count, mean, sxx - count * mean * mean
"""

ROSTER["ch08_beyond_bn"] = {
    "solution": {},
    "blank": None,
    "ln-batch-axis": {"replace": {"layernorm_forward": [
        (LN_MEAN, "centered = x - x.mean(axis=0, keepdims=True)"),
        (NORM_RSTD, NORM_RSTD.replace("axis=1", "axis=0"))]},
        "lose": {"test_layernorm_forward", "test_layernorm_backward"}, "says": "over the batch axis"},
    "ln-eps-outside": {"replace": {"layernorm_forward": [
        (NORM_RSTD, "rstd = 1.0 / (np.sqrt((centered * centered).mean(axis=1, keepdims=True)) + eps)")]},
        "lose": {"test_layernorm_forward", "test_layernorm_backward"}, "says": "eps is added outside"},
    "ln-np-var": {"replace": {"layernorm_forward": [  # another correct way to the variance
        (NORM_RSTD, "rstd = 1.0 / np.sqrt(x.var(axis=1, keepdims=True) + eps)")]}, "lose": set()},
    "ln-no-var-path": {"replace": {"layernorm_backward": [(LN_DX, "dx = rstd * (g - g.mean(axis=1, keepdims=True))")]},
                       "lose": {"test_layernorm_backward"}, "says": "path through the variance"},
    "gn-interleaved": {"replace": {"groupnorm_forward": [
        (GN_ROWS, "rows = x.reshape(n, c // groups, groups, -1).swapaxes(1, 2).reshape(n * groups, -1)"),
        (GN_BACK, "x_hat = (centered * rstd).reshape(n, groups, c // groups, -1).swapaxes(1, 2).reshape(x.shape)")]},
        "lose": {"test_groupnorm_forward", "test_groupnorm_backward"}, "says": "not consecutive channels"},
    "gn-unbiased": {"replace": {"groupnorm_forward": [
        (NORM_RSTD, "rstd = 1.0 / np.sqrt((centered * centered).sum(axis=1, keepdims=True) / (rows.shape[1] - 1) + eps)")]},
        "lose": {"test_groupnorm_forward", "test_groupnorm_backward"}, "says": "biased variance"},
    "merge-no-delta": {"replace": {"merge_moments": [(MERGE_M2, "qa + qb")]},
                       "lose": {"test_merge_moments"}, "says": "the sum of the shards' m2 only"},
    "merge-by-sums": {"override": {"merge_moments": MERGE_BY_SUMS},
                      "lose": {"test_merge_moments"}, "says": "E[x^2] - E[x]^2"},
    "syncbn-local": {"replace": {"syncbn": [(SYNC_TOTALS, SYNC_TOTALS.replace("all_reduce(", "(")),
                                            (SYNC_M2, SYNC_M2.replace("all_reduce(", "("))]},
                     "lose": {"test_syncbn_forward", "test_syncbn_backward"}, "says": "statistics of its own shard"},
    "syncbn-biased-running": {"replace": {"syncbn": [("running_var += momentum * m2 / (n - 1)",
                                                      "running_var += momentum * m2 / n")]},
                              "lose": {"test_syncbn_forward"}, "says": "biased variance"},
    "syncbn-not-in-place": {"replace": {"syncbn": [
        ("running_mean *= 1 - momentum\n    running_mean += momentum * mean",
         "running_mean = (1 - momentum) * running_mean + momentum * mean")]},
        "lose": {"test_syncbn_forward"}, "says": "not updated in place"},
    "syncbn-global-dgamma": {"replace": {"syncbn": [("    return dx, dgamma, dbeta",
                                                     "    return dx, sums[c:] * n, sums[:c] * n")]},
                             "lose": {"test_syncbn_backward"}, "says": "already summed over the ranks"},
    "ln-forgets-gamma": {"replace": {"layernorm_backward": [("g = dout * gamma", "g = dout")]},
                         "lose": {"test_layernorm_backward"}, "says": "dx forgets gamma"},
    "ln-float64-backward": {"replace": {"layernorm_forward": [  # float64 rstd, float64 gradients: correct
        (NORM_RSTD, NORM_RSTD.replace("keepdims=True)", "keepdims=True, dtype=np.float64)"))]}, "lose": set()},
    "gn-pooled-batch": {"replace": {"groupnorm_forward": [
        (GN_ROWS, "rows = x.reshape(n, groups, -1).swapaxes(0, 1).reshape(groups, -1)"),
        (GN_BACK, "x_hat = (centered * rstd).reshape(groups, n, -1).swapaxes(0, 1).reshape(x.shape)")]},
        "lose": {"test_groupnorm_forward", "test_groupnorm_backward"}, "says": "pooled over the whole batch"},
    "gn-no-group-check": {"replace": {"groupnorm_forward": [(" or c % groups", "")]},
                          "lose": {"test_groupnorm_bad_input"}, "says": "accepted C = 6 channels with groups = 4"},
    "merge-unweighted": {"replace": {"merge_moments": [("ma + delta * (nb / n)", "ma + delta * 0.5")]},
                         "lose": {"test_merge_moments"}, "says": "ignores the shards' sizes"},
    "large-batch-bn": {"override": {"answer_small_batch": 'answer_small_batch = "A"'},
                       "lose": {"test_answer_small_batch"}, "says": "running statistics are only used at test time"},
}

# ch05 runs CUDA kernels: graded on a GPU where there is one, else on bnref.cuda.emulator (tests/emulated_gpu.py)
ROSTER["ch05_cupy_kernels"] = {
    "solution": {},
    "blank": None,
    "one-pass-reduction": {"replace": {"reduction_moments": [(REDUCTION_VAR, REDUCTION_VAR.replace(
        "mean.reshape(", "cp.zeros_like(mean).reshape(").replace("/ count", "/ count - mean * mean"))]},
        "lose": {"test_reduction_moments"}, "says": "cancellation of the one-pass"},
    "one-pass-kernel": {"replace": {"channel_stats": [
        (WELFORD_STEP, "            m += v;\n            q += v * v;"),
        (WELFORD_FINISH, "    cnt[tid] = k;\n    avg[tid] = k > 0.0f ? m / k : 0.0f;\n"
                         "    dev[tid] = k > 0.0f ? q - m * m / k : 0.0f;")]},
        "lose": {"test_channel_stats_offset"}, "says": "cancellation of the one-pass"},
    "biased-running-var": {"replace": {"fused_forward_stats": [("momentum * p.m2 / (p.n - 1.0f);",
                                                                "momentum * p.m2 / p.n;")]},
                           "lose": {"test_fused_stats"}, "says": "average the unbiased one"},
    "channel-last-index": {"replace": {"batchnorm_forward_cupy": [("(i / plane) % channels", "i % channels")]},
                           "lose": {"test_forward_cupy"}, "says": "the channel of element i is computed wrongly"},
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
