"""A NumPy reference layer and its ``torch.nn`` twin, set up to be stepped in lockstep."""
import numpy as np
import torch


def torch_twin(ours, torch_cls, rng):
    """Give ``ours`` random gamma/beta; return a ``torch_cls`` layer with the same parameters and settings."""
    dtype = ours.gamma.dtype
    c = ours.gamma.shape[0]
    ours.gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    ours.beta = rng.normal(size=c).astype(dtype)
    theirs = torch_cls(c, eps=ours.eps, momentum=ours.momentum, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.gamma))
        theirs.bias.copy_(torch.from_numpy(ours.beta))
    return theirs


def lockstep(ours, theirs, schedule, batches, tol, dout_rng=None):
    """Step both layers through ``schedule`` ("train"/"eval" per step) on ``batches``.

    Compares outputs and running buffers at every step and, when ``dout_rng`` is
    given, the backward pass too (dx, dgamma, dbeta for a random upstream gradient).
    """
    for step, (mode, x) in enumerate(zip(schedule, batches)):
        where = f"step {step} ({mode})"
        getattr(ours, mode)()
        getattr(theirs, mode)()
        xt = torch.tensor(x, requires_grad=True)
        theirs.zero_grad()
        expected = theirs(xt)
        np.testing.assert_allclose(ours(x), expected.detach().numpy(), rtol=tol, atol=tol, err_msg=where)
        for name in ("running_mean", "running_var"):
            buffer = getattr(ours, name)
            np.testing.assert_allclose(buffer, getattr(theirs, name).numpy(), rtol=tol, atol=tol,
                                       err_msg=f"{name}, {where}")
            assert buffer.dtype == x.dtype, f"{name} is {buffer.dtype}, {where}"
        if dout_rng is None:
            continue
        dout = dout_rng.standard_normal(x.shape).astype(x.dtype)
        expected.backward(torch.from_numpy(dout))
        dx = ours.backward(dout)
        assert dx.shape == x.shape
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=10 * tol, atol=10 * tol, err_msg=f"dx, {where}")
        np.testing.assert_allclose(ours.dgamma, theirs.weight.grad.numpy(), rtol=10 * tol, atol=100 * tol,
                                   err_msg=f"dgamma, {where}")
        np.testing.assert_allclose(ours.dbeta, theirs.bias.grad.numpy(), rtol=10 * tol, atol=100 * tol,
                                   err_msg=f"dbeta, {where}")
