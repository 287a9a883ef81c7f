"""Style rules over the whole source tree (``dllm_spec/``, ``drafters/``, ``verify/``): no function or
method, nested ones included, runs over :data:`MAX_LINES` lines (split it into named steps)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("dllm_spec", "drafters", "verify")
MAX_LINES = 80


def _long_functions(tree: ast.AST, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function in ``tree`` longer than ``limit`` lines (from
    its ``def`` to its last line)."""
    return [
        (node.name, node.lineno, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name, line, length in _long_functions(ast.parse(path.read_text()))
    ]
    assert not long, f"functions over {MAX_LINES} lines (split them into named steps):\n" + "\n".join(long)


def test_the_check_sees_a_long_nested_function():
    body = "\n".join(f"        x{i} = {i}" for i in range(80))
    tree = ast.parse(f"def outer():\n    def inner():\n{body}\n    return inner\n")
    assert [(name, line) for name, line, _ in _long_functions(tree)] == [("outer", 1), ("inner", 2)]
