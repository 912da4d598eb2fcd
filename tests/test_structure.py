"""The shape of the code base: no import cycle among the modules of dino_fast/, kernels/ and bench/
(function-level and ``TYPE_CHECKING`` imports included: a lazy or type-only import back into a
caller is still a dependency flowing up), no module past ~450 lines."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Module name -> file, for dino_fast/, kernels/ (installed as dino_fast.kernels) and bench/."""
    mods = {}
    for base, pkg in ((ROOT / "dino_fast", "dino_fast"), (ROOT / "kernels", "dino_fast.kernels"),
                      (ROOT / "bench", "bench")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere (``if TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known}
    return found


def test_no_import_cycles():
    mods = _modules()
    known = set(mods)
    # packages' __init__ files only re-export; their edges would make every module "import" every other
    graph = {m: {t for t in _imports(m, p, known) if mods[t].name != "__init__.py"}
             for m, p in mods.items() if p.name != "__init__.py"}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
