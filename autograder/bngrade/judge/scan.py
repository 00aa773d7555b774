"""Static scan of a submission's answer cells, on the trusted side, before anything runs.

* A framework op that implements the exercise itself (``torch.nn.functional.batch_norm``, ``BatchNorm1d``,
  ``dropout`` ..., listed per assignment in :data:`FORBIDDEN`) bans every function that uses it, directly
  or through another answer-cell function: the tests of a banned function score 0, with a message.
* The reference package, IPython internals, ``sys.modules``, builtins tricks, and file, process or network
  access are *flagged* for the instructor (they cannot gain points in the sandbox, but deserve a look).
"""
import ast
import re

TORCH_NORMS = {"batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "instance_norm",
               "layer_norm", "group_norm", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d"}
#: assignment -> names of framework ops that do the exercise's work
FORBIDDEN = {
    "ch01_why_normalize": {"StandardScaler", "scale", "cond"},
    "ch02_batchnorm_forward": TORCH_NORMS,
    "ch03_batchnorm_backward": TORCH_NORMS | {"backward", "grad", "autograd", "gradcheck"},
    "ch04_training_with_bn": set(),
    "ch05_cupy_kernels": TORCH_NORMS,
    "ch06_batchnorm_cnn": TORCH_NORMS,
    "ch07_dropout": {"dropout", "Dropout", "dropout2d", "Dropout2d", "alpha_dropout", "feature_alpha_dropout"},
    # the SyncBN functions get all_reduce as an argument: torch.distributed's own would bypass the ranks given
    "ch08_beyond_bn": TORCH_NORMS | {"InstanceNorm3d", "LocalResponseNorm", "RMSNorm", "rms_norm", "all_reduce",
                                    "all_gather", "distributed"},
}
FRAMEWORKS = {"torch", "tf", "tensorflow", "keras", "jax", "sklearn", "F", "nn", "cp", "cupy", "np", "numpy",
              "linalg", "functional"}
REVIEW = [
    (re.compile(r"\bbnref\b|\bbngrade\b|\bbncapture\b"), "uses the course's reference or grading packages"),
    (re.compile(r"get_ipython|\bIPython\b|ipykernel|InteractiveShell|input_transformers|\bevents\.register"),
     "uses IPython internals"),
    (re.compile(r"sys\.modules|__builtins__|\bbuiltins\b|__import__|importlib|sys\.settrace|sys\.setprofile"
                r"|\bctypes\b|__globals__|__code__|__dict__|\bgc\.get_objects"
                r"|\b(eval|exec|getattr|setattr|globals|vars|locals)\s*\("),
     "touches sys.modules, builtins or interpreter internals (or looks names up dynamically)"),
    (re.compile(r"\bopen\s*\(|\bos\.(?!path\b|environ\b)\w+|\bshutil\b|\bpathlib\b|\bPath\s*\(|\bsubprocess\b|"
                r"\bsocket\b|\burllib\b|\brequests\b|\bglob\b"), "accesses files, processes or the network"),
]


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _defined(tree):
    """Names of a cell's top-level defs and classes."""
    return {n.name for n in tree.body if isinstance(n, DEFS)}


def _bindings(tree):
    """[(names, statement)] for each top-level statement of a cell that binds names other than by an import:
    a def or class, or an assignment, loop or ``with`` (``batchnorm_forward = lambda ...`` is an answer too)."""
    found = []
    for stmt in tree.body:
        if isinstance(stmt, DEFS):
            found.append(({stmt.name}, stmt))
        elif not isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            if names:
                found.append((names, stmt))
    return found


def _framework_ops(tree, forbidden, within=None):
    """Forbidden ops used in ``within`` (default: all of ``tree``, a cell), resolving the cell's imports:
    attributes of a framework module (``F.batch_norm``) or imported names; a forbidden import counts only
    when ``within`` is the whole cell."""
    found = set()
    imported = set()
    bases = set(FRAMEWORKS)
    for node in ast.walk(tree):  # `import torch.distributed as dist`: dist is a framework module too
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("torch", "tensorflow", "keras", "jax", "sklearn", "cupy"):
                    bases.add(alias.asname or alias.name.split(".")[0])
                    found |= set(alias.name.split(".")[1:]) & forbidden
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "tensorflow",
                                                                                          "keras", "jax", "sklearn",
                                                                                          "cupy"):
            imported |= {a.asname or a.name for a in node.names if a.name in forbidden}
            found |= {a.name for a in node.names if a.name in forbidden}
    if within is not None:
        found = set()
    for node in ast.walk(tree if within is None else within):
        if isinstance(node, ast.Attribute) and node.attr in forbidden:
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and (base.id in bases or base.id in imported):
                found.add(node.attr)
        elif isinstance(node, ast.Name) and node.id in imported:
            found.add(node.id)
    return found


def _uses(tree):
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _ban_message(name, ops):
    return (f"{name} uses {', '.join(sorted(ops))}, a framework op that implements the exercise itself; the "
            "exercises are written from scratch, so its tests score 0")


def scan(assignment, cells):
    """Scan answer cells.

    A cell that uses a forbidden op bans each of its defs and classes, and each name that one of its other
    statements binds to something using the op; nothing of it bound: the cell's own id.

    Args:
        cells: {grade_id: source} of the submission's answer (solution) cells.

    Returns:
        (banned, flags): {function name: message} of functions that use a forbidden framework op, and a list
        of (grade_id, what) for the instructor to review.
    """
    forbidden = FORBIDDEN.get(assignment, set())
    banned, flags, trees = {}, [], {}
    for cell, source in cells.items():
        text = re.sub(r"(?m)^\s*[!%].*$", "", source)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        trees[cell] = tree
        ops = _framework_ops(tree, forbidden)
        if ops:
            names = _defined(tree)
            for bound, stmt in _bindings(tree):
                if not isinstance(stmt, DEFS) and _framework_ops(tree, forbidden, within=stmt):
                    names |= bound
            for name in names or {cell}:
                banned[name] = _ban_message(name, ops)
            flags.append((cell, f"framework op {', '.join(sorted(ops))}"))
        for pattern, what in REVIEW:
            if pattern.search(text):
                flags.append((cell, what))
    changed = True
    while changed:  # a function (or an alias) that calls a banned one is banned too
        changed = False
        for tree in trees.values():
            for bound, stmt in _bindings(tree):
                via = sorted((_uses(stmt) & set(banned)) - bound)
                for name in sorted(bound - set(banned)) if via else ():
                    banned[name] = f"{name} calls {via[0]}: " + banned[via[0]].split(": ", 1)[-1]
                    changed = True
    return banned, flags


def defined_sources(cells):
    """{name: source of the answer cell that defines it (a def or class)} for ``cells`` {grade_id: source}."""
    found = {}
    for source in cells.values():
        try:
            found.update({name: source for name in _defined(ast.parse(source))})
        except SyntaxError:
            continue
    return found
