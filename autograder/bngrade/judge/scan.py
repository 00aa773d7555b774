"""Static scan of a submission's own cells, on the trusted side: messages and flags, not the defence.

The defence is that a banned framework is unavailable to the graded code (:mod:`bngrade.judge.frameworks`):
a name can always be built from strings, so no scan can be complete. The scan gives the student a clear
message instead of an ``ImportError``, and the instructor a list of things to look at:

* a framework op that implements the exercise itself (``F.batch_norm``, ``torch.native_batch_norm``,
  ``nn.Dropout`` ..., matched by :data:`FORBIDDEN`'s patterns through any import, alias or star import) in an
  answer cell bans every function of that cell that uses it, directly or through another answer-cell function:
  their tests score 0, with a message;
* the same op in any other cell of the student's, or looked up by a string (``getattr(F, "batch_norm")``,
  ``operator.attrgetter("batch_norm")``), is *flagged*;
* the reference package, IPython internals, ``sys.modules``, builtins tricks, and file, process or network
  access are *flagged* for the instructor.

No flag fires on the solution or on the correct alternatives in the tests (``tests/test_scan.py``).
"""
import ast
import re

TORCH_NORMS = r"(batch|layer|group|instance|rms|local_?response)_?norm"
#: assignment -> pattern of framework op names that do the exercise's work (case-insensitive, on one name)
FORBIDDEN = {
    "ch01_why_normalize": r"^(standardscaler|scale|cond|zscore)$",
    "ch02_batchnorm_forward": TORCH_NORMS,
    "ch03_batchnorm_backward": TORCH_NORMS + r"|^(backward|grad|autograd|gradcheck|vjp|jacobian)$",
    "ch04_training_with_bn": None,
    "ch05_cupy_kernels": TORCH_NORMS,
    "ch06_batchnorm_cnn": TORCH_NORMS,
    "ch07_dropout": r"dropout",
    # the SyncBN functions get all_reduce as an argument: torch.distributed's own would bypass the ranks given
    "ch08_beyond_bn": TORCH_NORMS + r"|^(all_reduce|all_gather|distributed|reduce_scatter)$",
}
FRAMEWORK_ROOTS = ("torch", "tensorflow", "keras", "jax", "sklearn", "cupy", "numpy")
#: names bound to a framework module without an import statement in the cell (the usual notebook aliases)
USUAL_ALIASES = {"torch", "tf", "tensorflow", "keras", "jax", "sklearn", "F", "nn", "cp", "cupy", "np", "numpy",
                 "linalg", "functional"}
LOOKUPS = {"getattr", "attrgetter", "methodcaller", "import_module", "__import__", "__getattribute__", "eval",
           "exec", "compile"}
REVIEW = [
    (re.compile(r"\bbnref\b|\bbngrade\b|\bbncapture\b"), "uses the course's reference or grading packages"),
    (re.compile(r"get_ipython|\bIPython\b|ipykernel|InteractiveShell|input_transformers|\bevents\.register"),
     "uses IPython internals"),
    (re.compile(r"sys\.modules|__builtins__|\bbuiltins\b|\bimportlib\b|sys\.settrace|sys\.setprofile"
                r"|\bctypes\b|__globals__|__code__|__dict__|\bgc\.get_objects"),
     "touches sys.modules, builtins or interpreter internals"),
    (re.compile(r"\bopen\s*\(|\bos\.(?!path\b|environ\b)\w+|\bshutil\b|\bpathlib\b|\bPath\s*\(|\bsubprocess\b|"
                r"\bsocket\b|\burllib\b|\brequests\b|\bglob\b"), "accesses files, processes or the network"),
]
#: builtins that look names up or run text as code: flagged when called by their own name (not a method)
DYNAMIC = {"eval", "exec", "compile", "getattr", "setattr", "globals", "vars", "locals", "__import__"}
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


def _framework(module):
    return (module or "").split(".")[0] in FRAMEWORK_ROOTS


class Imports:
    """What a cell's imports bind: framework module aliases, forbidden names imported bare, star imports (after
    which a forbidden-looking name counts unless the cell binds it itself)."""

    def __init__(self, tree, forbidden):
        self.bases, self.names, self.star, self.ops = set(USUAL_ALIASES), set(), False, set()
        self.own = {n.name for n in ast.walk(tree) if isinstance(n, DEFS)} | {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
            a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _framework(alias.name):
                        self.bases.add(alias.asname or alias.name.split(".")[0])
                        self.ops |= {part for part in alias.name.split(".")[1:] if forbidden.search(part)}
            elif isinstance(node, ast.ImportFrom) and _framework(node.module):
                self.ops |= {p for p in (node.module or "").split(".")[1:] if forbidden.search(p)}
                for alias in node.names:
                    if alias.name == "*":
                        self.star = True
                    elif forbidden.search(alias.name):
                        self.names.add(alias.asname or alias.name)
                        self.ops.add(alias.name)
                    else:  # `from torch.nn import functional as G`: G is a framework module
                        self.bases.add(alias.asname or alias.name)


def _ops_in(node, imports, forbidden):
    """Forbidden ops that ``node`` uses: an attribute of a framework module (``F.batch_norm``,
    ``torch.ops.aten.native_batch_norm``), a name imported bare or through a star import, or a string looked up
    by a lookup function (``getattr(F, "batch_norm")``)."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and forbidden.search(sub.attr):
            base = sub.value
            while isinstance(base, (ast.Attribute, ast.Call, ast.Subscript)):
                base = base.value if not isinstance(base, ast.Call) else base.func
            if isinstance(base, ast.Name) and (base.id in imports.bases or base.id in imports.names):
                found.add(sub.attr)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and (
                sub.id in imports.names or (imports.star and forbidden.search(sub.id) and sub.id not in imports.own)):
            found.add(sub.id)
        elif isinstance(sub, ast.Call) and getattr(sub.func, "id", getattr(sub.func, "attr", None)) in LOOKUPS:
            found |= {a.value for a in sub.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                      and any(forbidden.search(part) for part in re.split(r"[.\s]", a.value) if part)}
    return found


def _ban_message(name, ops):
    return (f"{name} uses {', '.join(sorted(ops))}, a framework op that implements the exercise itself; the "
            "exercises are written from scratch, so its tests score 0")


def _parse(source):
    try:
        return ast.parse(re.sub(r"(?m)^\s*[!%].*$", "", source))
    except SyntaxError:
        return None


def _review(tree, text):
    """Flags for the instructor's review of one cell."""
    found = [what for pattern, what in REVIEW if pattern.search(text)]
    if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in DYNAMIC for n in ast.walk(tree)):
        found.append("looks names up dynamically or runs text as code (eval, exec, getattr, globals, ...)")
    return found


def scan(assignment, answers, others=None):
    """Scan the student's cells.

    A forbidden op in an answer cell bans each of the cell's defs and classes that use it (and each name that
    one of its other statements binds to something using it; none: the cell's own id). In any other cell of the
    student's it is flagged, as is every review pattern in any of them.

    Args:
        answers: {grade_id: source} of the submission's answer cells.
        others: {label: source} of the student's other cells (added cells, without nbgrader metadata).

    Returns:
        (banned, flags): {function name: message}, and a list of (cell, what) for the instructor to review.
    """
    forbidden = re.compile(FORBIDDEN[assignment], re.I) if FORBIDDEN.get(assignment) else None
    banned, flags, trees = {}, [], {}
    for cell, source in {**answers, **(others or {})}.items():
        tree = _parse(source)
        if tree is None:
            continue
        flags += [(cell, what) for what in _review(tree, source)]
        if cell in answers:
            trees[cell] = tree
        if forbidden is None:
            continue
        imports = Imports(tree, forbidden)
        ops = _ops_in(tree, imports, forbidden) | imports.ops
        if not ops:
            continue
        flags.append((cell, f"framework op {', '.join(sorted(ops))}"))
        if cell not in answers:
            continue
        names = set()
        for bound, stmt in _bindings(tree):
            used = _ops_in(stmt, imports, forbidden)
            if used:
                names |= bound
                for name in bound:
                    banned[name] = _ban_message(name, used)
        if not names:
            banned[cell] = _ban_message(cell, ops)
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


def _uses(tree):
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def defined_sources(cells):
    """{name: source of the answer cell that defines it (a def or class)} for ``cells`` {grade_id: source}."""
    found = {}
    for source in cells.values():
        tree = _parse(source)
        if tree is not None:
            found.update({name: source for name in _defined(tree)})
    return found
