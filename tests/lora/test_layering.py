"""LoRA stays in its layers: lora/ imports layers, secure and config but never the engine or the server; the LoRA
layer and kernel never import lora/ (it writes their weights, they do not know it)."""
from pathlib import Path

import ccserve.lora
from tests.router.test_layering import imported_modules

ROOT = Path(ccserve.lora.__file__).parent.parent


def ccserve_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m.startswith("ccserve.")}


def test_lora_package_imports_nothing_above_it():
    for path in sorted((ROOT / "lora").glob("*.py")):
        bad = {m for m in ccserve_imports(path) if m.startswith(("ccserve.engine", "ccserve.server", "ccserve.models"))}
        assert not bad, f"lora/{path.name} imports {bad}"


def test_lora_layer_and_kernel_import_no_higher_layer():
    for path in (ROOT / "layers" / "lora.py", ROOT / "kernels" / "lora.py"):
        bad = {m for m in ccserve_imports(path) if m.startswith(("ccserve.lora", "ccserve.engine", "ccserve.secure"))}
        assert not bad, f"{path} imports {bad}"
