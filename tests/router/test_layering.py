"""router/ stays apart: it never imports the server, the engine or torch (so it never holds a prompt in the
clear, and a relay or gateway host needs no GPU stack)."""
import ast
from pathlib import Path

import ccserve.router

FORBIDDEN = ("ccserve.server", "ccserve.engine", "ccserve.models", "ccserve.kv", "ccserve.secure", "torch")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_router_imports_nothing_above_or_beside_it():
    files = sorted(Path(ccserve.router.__file__).parent.glob("*.py"))
    assert len(files) > 10
    for path in files:
        bad = {m for m in imported_modules(path) if m.startswith(FORBIDDEN)}
        assert not bad, f"{path.name} imports {bad}"
