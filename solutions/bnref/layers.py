"""Stateful layers that wrap the functional reference, mirroring ``torch.nn``."""
import numpy as np

from .forward import batchnorm_forward, batchnorm_inference, ema_update


class BatchNorm1d:
    """NumPy twin of ``torch.nn.BatchNorm1d`` for (N, D) inputs.

    Attributes:
        gamma, beta: (D,) learnable scale and shift (``weight``/``bias`` in torch).
        running_mean, running_var: (D,) buffers, initialised to 0 and 1.
        momentum: PyTorch convention, weight of the new batch statistic.
        training: True after :meth:`train`, False after :meth:`eval`.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float64):
        self.eps = eps
        self.momentum = momentum
        self.gamma = np.ones(num_features, dtype=dtype)
        self.beta = np.zeros(num_features, dtype=dtype)
        self.running_mean = np.zeros(num_features, dtype=dtype)
        self.running_var = np.ones(num_features, dtype=dtype)
        self.training = True
        self.cache = None

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
            return batchnorm_inference(x, self.gamma, self.beta, self.running_mean, self.running_var, self.eps)
        out, self.cache = batchnorm_forward(x, self.gamma, self.beta, self.eps)
        self.running_mean, self.running_var = ema_update(
            self.running_mean, self.running_var, self.cache.mean, self.cache.var, x.shape[0], self.momentum
        )
        return out

    __call__ = forward
