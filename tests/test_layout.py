"""The source tree's layout (CONTRIBUTING.md): subpackages by level, each saying what it owns; no module over 450
lines, no class over 250, no function over 80."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cnnctl"
LIMITS = {"module": 450, "class": 250, "function": 80}
PACKAGES = ["core", "data", "config", "run", "interop", "tools", "cli"]


def sizes():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(SRC))
        yield "module", len(text.splitlines()), name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                yield "class", node.end_lineno - node.lineno + 1, f"{name}:{node.name}"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield "function", node.end_lineno - node.lineno + 1, f"{name}:{node.name}"


def test_no_module_class_or_function_is_over_its_limit():
    over = [f"{kind} {where}: {n} lines (at most {LIMITS[kind]})" for kind, n, where in sizes() if n > LIMITS[kind]]
    assert not over, "\n".join(over)


def test_every_subpackage_says_what_it_owns():
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 15, f"cnnctl/{package}/__init__.py: a docstring of what it owns"
