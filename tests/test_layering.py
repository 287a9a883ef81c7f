"""Imports run one way: dllm_spec -> dllm_spec.drafters -> dllm_spec.verify (the repository's
``drafters/`` and ``verify/`` folders, installed under the one ``dllm_spec`` name). Parses every module's imports (including
those inside functions) and fails on an upward one, or on a lazy module ``__getattr__`` papering
over one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"verify": 0, "drafters": 1, "dllm_spec": 2}  # folder -> rank


def _rank(module: str) -> int | None:
    """The layer an absolute import lands in: dllm_spec.verify* 0, dllm_spec.drafters* 1, other dllm_spec* 2."""
    parts = module.split(".")
    if parts[0] != "dllm_spec":
        return None
    return FOLDERS.get(parts[1], 2) if len(parts) > 1 else 2


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_package_imports_upward():
    upward = []
    for package, rank in FOLDERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in _imports(ast.parse(path.read_text())):
                target = _rank(module)
                if target is not None and target > rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_bare_top_level_names():
    """Nothing imports ``drafters`` or ``verify`` as top-level packages (PyPI has both names)."""
    bare = [
        f"{p.relative_to(ROOT)}:{line} imports {module}"
        for folder in (*FOLDERS, "tests", "scripts")
        for p in sorted((ROOT / folder).rglob("*.py"))
        for line, module in _imports(ast.parse(p.read_text()))
        if module.split(".")[0] in ("drafters", "verify")
    ]
    assert not bare, "\n".join(bare)


def test_no_lazy_module_getattr():
    lazy = [
        str(p.relative_to(ROOT))
        for package in FOLDERS
        for p in (ROOT / package).rglob("*.py")
        if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)
    ]
    assert not lazy, f"module-level __getattr__ in {lazy}"


def test_the_check_sees_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from dllm_spec.loop import speculative_decode\n")
    assert _imports(tree) == [(2, "dllm_spec.loop")]
