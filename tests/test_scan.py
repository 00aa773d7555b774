"""The static scan: messages and flags for framework ops however they are named; no flag on honest code.

The scan is not the defence (the probe's sandbox hides the frameworks: tests/test_judge_sandbox.py); these tests
check that it names what it can see, in every cell of the student's, and stays quiet on correct code.
"""
import pytest

from bngrade.judge.scan import scan

HONEST = ("def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
          "    mu = x.mean(0)\n    var = x.var(0)\n    out = gamma * (x - mu) / np.sqrt(var + eps) + beta\n"
          "    return out, (x, mu, var, gamma, eps)\n")

HIDDEN_OPS = {
    "star import, bare name": "from torch.nn.functional import *\nimport torch\n"
                              "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                              "    return batch_norm(torch.from_numpy(x), None, None, training=True).numpy(), None",
    "module imported under another name": "from torch.nn import functional as G\n"
                                          "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                                          "    return G.batch_norm(x, None, None, training=True), None",
    "native op": "import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                 "    return torch.native_batch_norm(x, gamma, beta, None, None, True, 0.1, eps)[0], None",
    "aten op": "import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
               "    return torch.ops.aten.native_batch_norm(x, gamma, beta, None, None, True, 0.1, eps)[0], None",
    "torch._C": "import torch\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                "    return torch._C._nn.batch_norm(x, None, None), None",
    "attrgetter": "import operator\nimport torch.nn.functional as F\n"
                  "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
                  "    return operator.attrgetter('batch_norm')(F)(x, None, None, training=True), None",
    "getattr": "import torch.nn.functional as F\ndef batchnorm_forward(x, gamma, beta, eps=1e-5):\n"
               "    return getattr(F, 'batch_' + 'norm')(x, None, None), None",
}


@pytest.mark.parametrize("how", sorted(HIDDEN_OPS))
def test_a_framework_op_in_an_answer_cell_is_named_however_it_is_reached(how):
    banned, flags = scan("ch02_batchnorm_forward", {"bn_forward": HIDDEN_OPS[how]})
    if how == "getattr":  # a name built from strings cannot be seen: flagged for review, and unavailable anyway
        assert ("bn_forward", "looks names up dynamically or runs text as code (eval, exec, getattr, globals, ...)") \
            in flags
        return
    assert "batchnorm_forward" in banned, how
    assert "from scratch" in banned["batchnorm_forward"]
    assert any(cell == "bn_forward" and what.startswith("framework op") for cell, what in flags)


def test_an_extra_cell_is_scanned_and_flagged_but_bans_nothing_it_does_not_define_for_grading():
    """The probe never runs an added cell, so its redefinition earns nothing; the scan flags it by name."""
    banned, flags = scan("ch02_batchnorm_forward", {"bn_forward": HONEST},
                         {"cell 7": "import torch.nn.functional as F\n" + HIDDEN_OPS["native op"]})
    assert banned == {}
    assert any(cell == "cell 7" and what.startswith("framework op") for cell, what in flags)


def test_callers_and_aliases_of_a_banned_function_are_banned_and_honest_helpers_are_not():
    cells = {"forward": "import torch\nEPS = 1e-5\ndef helper(x):\n    return x\n"
                        "batchnorm_forward = lambda x, g, b, p: (torch.nn.functional.batch_norm(\n"
                        "    torch.from_numpy(x), None, None, training=True).numpy(), None)\n",
             "layer": "class BatchNorm1d:\n    def forward(self, x):\n        return batchnorm_forward(x, 1, 0)[0]",
             "alias": "forward_again = batchnorm_forward\n"}
    banned, _ = scan("ch02_batchnorm_forward", cells)
    assert set(banned) == {"batchnorm_forward", "BatchNorm1d", "forward_again"}
    assert banned["forward_again"].startswith("forward_again calls batchnorm_forward: batchnorm_forward uses "
                                              "batch_norm, a framework op")
    assert scan("ch07_dropout", cells)[0] == {}, "batch_norm is not forbidden in the dropout assignment"


@pytest.mark.parametrize("source", [
    HONEST,
    "class BatchNorm1d:\n    def train(self):\n        self.training = True\n"
    "    def eval(self):\n        self.training = False\n",
    "from numpy import *\n" + HONEST.replace("np.sqrt", "sqrt") + "def batchnorm_inference(x, g, b, m, v, eps=1e-5):\n"
    "    return batchnorm_forward(x, g, b, eps)[0]\n",
    "def batchnorm_forward(x, gamma, beta, eps=1e-5):\n    n = np.linalg.norm(x)\n"
    "    return x / n, {'layer_norm': None}\n",
])
def test_honest_code_raises_no_flag(source):
    """`def eval(self)` (the released template's own method) is not a call of eval; numpy's norm is not a norm
    layer; a star import of numpy bans nothing the student defines."""
    assert scan("ch02_batchnorm_forward", {"cell": source}) == ({}, [])


@pytest.mark.parametrize("source,what", [
    ("x = eval('1 + 1')", "looks names up dynamically"),
    ("import sys\nsys.modules['bnref'] = None", "sys.modules"),
    ("import bnref", "reference or grading packages"),
    ("open('/etc/passwd').read()", "files, processes or the network"),
])
def test_tricks_are_flagged_in_any_cell(source, what):
    _, flags = scan("ch02_batchnorm_forward", {}, {"cell 3": source})
    assert any(cell == "cell 3" and what in text for cell, text in flags), flags
