"""The hidden blocks of test cells: finding them, and what the sandbox runs in their place."""
import ast
import builtins
import re

HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS[ \t]*\n(.*?)^[ \t]*### END HIDDEN TESTS[ \t]*\n?", re.S | re.M)


def grade_id(cell):
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def is_test_cell(cell):
    meta = cell.metadata.get("nbgrader", {})
    return cell.cell_type == "code" and meta.get("grade") and not meta.get("solution")


def hidden_code(cell):
    """The hidden block of a test cell ('' if none)."""
    return "".join(HIDDEN.findall(cell.source))


def sandboxed_source(cell):
    """A test cell's source with its hidden block replaced by the capture call for its grade id."""
    call = f"from bncapture import capture as _bncapture\n_bncapture({grade_id(cell)!r}, globals())\n"
    return HIDDEN.sub(lambda m: call, cell.source, count=1)


def student_names(code):
    """Names a hidden block reads that it does not define or import: the student's globals it judges."""
    tree = ast.parse(code)
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                  - bound - set(dir(builtins)))
