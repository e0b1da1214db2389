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


def test_a_relay_or_router_host_loads_no_gpu_stack():
    """At run time too: the router verifies nodes with ccserve.attest, which must not pull torch in."""
    import subprocess
    import sys
    code = ("import sys, ccserve.router.commands, ccserve.router.gateway, ccserve.router.relay, "
            "ccserve.router.attestation, ccserve.router.issuer; print(sorted(m for m in sys.modules "
            "if m == 'torch' or m.startswith(('ccserve.engine', 'ccserve.server', 'ccserve.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
