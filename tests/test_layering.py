"""The layering contract: imports point downward only (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"

# package -> diffalign packages it must never import
FORBIDDEN = {
    "core": {"cli", "config", "runtime", "algorithms", "search", "evaluation", "rewards", "models", "worlds", "data"},
    "worlds": {"cli", "runtime", "algorithms", "search", "evaluation", "rewards", "models"},
    "models": {"cli", "runtime", "algorithms", "search", "evaluation", "rewards"},
    "rewards": {"cli", "runtime", "algorithms", "search", "evaluation"},
    "evaluation": {"cli", "runtime", "algorithms", "search"},
    "algorithms": {"cli", "runtime"},
    "search": {"cli", "runtime", "algorithms"},
    "runtime": {"cli"},
    "data": {"cli", "runtime", "algorithms", "search", "evaluation"},
}


def _diffalign_imports(path: Path) -> set[str]:
    """Top-level diffalign sub-packages imported by a module (absolute or relative)."""
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(SRC).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "diffalign" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("diffalign."):
                found.add(node.module.split(".")[1])
            elif node.level > 0:
                base = list(pkg_parts[: len(pkg_parts) - (node.level - 1)])
                mod = base + (node.module.split(".") if node.module else [])
                if mod:
                    found.add(mod[0])
                else:  # `from .. import x` at the top: x is a sub-package
                    found.update(a.name for a in node.names)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_downward(package):
    bad = []
    for path in (SRC / package).rglob("*.py"):
        hits = _diffalign_imports(path) & FORBIDDEN[package]
        if hits:
            bad.append(f"{path.relative_to(SRC)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_core_imports_only_torch():
    code = (
        "import sys; import diffalign.core; "
        "heavy = [m for m in ('numpy.random', 'scipy', 'diffusers', 'transformers', 'accelerate', 'peft', 'yaml', "
        "'typer', 'PIL', 'matplotlib') if m in sys.modules]; "
        "own = [m for m in sys.modules if m.startswith('diffalign.') and not m.startswith('diffalign.core')]; "
        "print(heavy, own); assert not heavy and not own, (heavy, own)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_checker_sees_a_forbidden_import(tmp_path):
    f = SRC / "core" / "_layering_probe.py"
    f.write_text("from ..runtime import loop\n")
    try:
        assert "runtime" in _diffalign_imports(f)
    finally:
        f.unlink()


def test_nothing_reads_shared_at_run_time():
    offenders = [str(p) for p in SRC.rglob("*.py") if "../shared" in p.read_text() or "shared/DESIGN" in p.read_text()]
    assert not offenders
