"""README: `pytest -m "not slow"` leaves out the subprocess and multi-device tests. Every test that starts a
subprocess (directly, or through a helper function of its module) carries the `slow` marker."""

import ast
import glob
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _uses_subprocess(node) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "subprocess" for n in ast.walk(node))


def _calls(node, names) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) in names for n in ast.walk(node))


def _unmarked(path: str) -> list[str]:
    src = open(path).read()
    tree = ast.parse(src)
    module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                      and "slow" in ast.get_source_segment(src, n) for n in tree.body)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    helpers = {n.name for n in functions if not n.name.startswith("test_") and _uses_subprocess(n)}
    out = []
    for n in functions:
        if not n.name.startswith("test_"):
            continue
        starts = _uses_subprocess(n) or _calls(n, helpers)
        marked = module_slow or any("slow" in ast.get_source_segment(src, d) for d in n.decorator_list)
        if starts and not marked:
            out.append(f"{os.path.basename(path)}::{n.name}")
    return out


def test_subprocess_tests_are_marked_slow():
    unmarked = [t for path in sorted(glob.glob(os.path.join(HERE, "test_*.py"))) for t in _unmarked(path)]
    assert not unmarked, f"start a subprocess without @pytest.mark.slow: {unmarked}"
