"""Stateful layers that wrap the functional reference, mirroring ``torch.nn``."""
import numpy as np

from .backward import batchnorm_backward_alt, batchnorm_inference_backward
from .forward import batchnorm_forward, batchnorm_inference, ema_update


class BatchNorm1d:
    """NumPy twin of ``torch.nn.BatchNorm1d`` for (N, D) inputs.

    Attributes:
        gamma, beta: (D,) learnable scale and shift (``weight``/``bias`` in torch).
        running_mean, running_var: (D,) buffers, initialised to 0 and 1.
        momentum: PyTorch convention, weight of the new batch statistic.
        training: True after :meth:`train`, False after :meth:`eval`.
        dgamma, dbeta: (D,) gradients set by :meth:`backward` (None before).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float64):
        self.eps = eps
        self.momentum = momentum
        self.gamma = np.ones(num_features, dtype=dtype)
        self.beta = np.zeros(num_features, dtype=dtype)
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)
        self.training = True
        self.cache = None  # BNCache of the last training-mode forward
        self.eval_args = None  # (x, gamma, running_mean, running_var, eps) of the last eval-mode forward
        self.dgamma = self.dbeta = None

    def train(self):
        """Switch to training mode: batch statistics, running buffers updated."""
        self.training = True
        return self

    def eval(self):
        """Switch to eval mode: running statistics, buffers frozen."""
        self.training = False
        return self

    def forward(self, x):
        """Normalize an (N, D) batch; returns (N, D)."""
        if not self.training:
            self.cache = None
            self.eval_args = (x, self.gamma, self.running_mean, self.running_var, self.eps)
            return batchnorm_inference(x, self.gamma, self.beta, self.running_mean, self.running_var, self.eps)
        self.eval_args = None
        out, self.cache = batchnorm_forward(x, self.gamma, self.beta, self.eps)
        self.running_mean, self.running_var = ema_update(
            self.running_mean, self.running_var, self.cache.mean, self.cache.var, x.shape[0], self.momentum
        )
        return out

    __call__ = forward

    def backward(self, dout):
        """Backward of the last :meth:`forward`, in the mode that forward ran in.

        After a training-mode forward the gradient flows through the batch
        statistics (closed form); after an eval-mode forward the running
        statistics are constants. Sets :attr:`dgamma` and :attr:`dbeta`.

        Args:
            dout: (N, D) upstream gradient.

        Returns:
            dx: (N, D).
        """
        if self.cache is not None:
            dx, self.dgamma, self.dbeta = batchnorm_backward_alt(dout, self.cache)
        elif self.eval_args is not None:
            dx, self.dgamma, self.dbeta = batchnorm_inference_backward(dout, *self.eval_args)
        else:
            raise RuntimeError("BatchNorm1d.backward needs a forward pass first")
        return dx
