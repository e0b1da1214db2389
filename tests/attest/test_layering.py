"""attest/ and client/ stay in their layers: attest/ never imports the server, the router or the engine (the server
and the router import it); client/ imports attest/ and only the client-side helpers of router/."""
from pathlib import Path

import ccserve.attest
import ccserve.client
from tests.router.test_layering import imported_modules

CLIENT_SIDE_ROUTER = {"ccserve.router", "ccserve.router.bhttp", "ccserve.router.errors", "ccserve.router.issuer",
                      "ccserve.router.oblivious", "ccserve.router.tokens"}


def ccserve_imports(package) -> dict[str, set[str]]:
    files = sorted(Path(package.__file__).parent.glob("*.py"))
    return {p.name: {m for m in imported_modules(p) if m.startswith("ccserve.")} for p in files}


def test_attest_imports_nothing_above_it():
    for name, modules in ccserve_imports(ccserve.attest).items():
        bad = {m for m in modules if m.startswith(("ccserve.server", "ccserve.router", "ccserve.engine"))}
        assert not bad, f"attest/{name} imports {bad}"


def test_client_imports_attest_and_client_side_router_helpers_only():
    for name, modules in ccserve_imports(ccserve.client).items():
        bad = {m for m in modules if not m.startswith(("ccserve.attest", "ccserve.client"))
               and m not in CLIENT_SIDE_ROUTER}
        assert not bad, f"client/{name} imports {bad}"
