"""The data modules import one way: files <- data (the MMEB format) <- digits <- scenes.

The format must never import a generator, not even lazily: each module's imports are read from
its source (function bodies included), and each is imported alone in a fresh interpreter.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# module -> every kit module it may load, directly or through the ones it imports
ALLOWED = {
    "llave_kit.files": set(),
    "llave_kit.data": {"llave_kit.files"},
    "llave_kit.digits": {"llave_kit.data", "llave_kit.files"},
    "llave_kit.scenes": {"llave_kit.data", "llave_kit.digits", "llave_kit.files"},
}


def kit_imports(module: str) -> set[str]:
    """The llave_kit modules named by any import statement of `module`'s source."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: the kit imports absolutely"
            named.add(node.module)
            if node.module == "llave_kit":  # `from llave_kit import scenes` names a module
                named.update(f"llave_kit.{alias.name}" for alias in node.names)
    return {name for name in named if name.startswith("llave_kit.")}


@pytest.mark.parametrize("module", ALLOWED)
def test_source_imports_follow_the_layers(module):
    assert kit_imports(module) <= ALLOWED[module]


@pytest.mark.parametrize("module", ALLOWED)
def test_a_fresh_import_loads_only_lower_layers(module):
    code = (f"import json, sys, {module}; "
            "print(json.dumps([m for m in sys.modules if m.startswith('llave_kit.')]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert set(json.loads(out)) - {module} <= ALLOWED[module]


def test_the_format_module_has_no_lazy_attributes():
    import llave_kit.data

    assert not hasattr(llave_kit.data, "__getattr__")
