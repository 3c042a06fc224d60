"""The library's layers: imports point down, peers do not import each other, and no module imports
itself back through others (every import counts, function-local ones included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import its own subpackage and any lower layer, never a peer or above.
LAYERS = [
    {"dpnotes.errors", "dpnotes.console", "dpnotes.config", "dpnotes.digests", "dpnotes.caches", "dpnotes.corpus", "dpnotes.models", "dpnotes.prompting", "dpnotes.tokenized_notes",
     "dpnotes.runs"},
    {"dpnotes.privacy"},
    {"dpnotes.training", "dpnotes.generation", "dpnotes.evaluation"},
    {"dpnotes.study"},
    {"dpnotes.cli", "dpnotes.testing"},
]
BOTTOM = LAYERS[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    """The layer unit a dpnotes module belongs to (its subpackage, or the bottom module itself)."""
    for layer in LAYERS:
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return unit
    return None


def level(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def imports_of(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "dpnotes" or m.startswith("dpnotes.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "dpnotes").rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_every_module_belongs_to_a_layer():
    assert [name for name in graph() if name != "dpnotes" and unit_of(name) is None] == []


def test_imports_point_down():
    wrong = []
    for name, targets in graph().items():
        unit = unit_of(name)
        if unit is None:
            continue
        for target in targets:
            other = unit_of(target)
            if other is None or other == unit or (unit in BOTTOM and other in BOTTOM):
                continue
            if level(other) >= level(unit):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_entry_scripts_are_thin():
    """train/ generate/ eval/ hold scripts that only call into the library."""
    for folder in ("train", "generate", "eval"):
        for script in (ROOT / folder).glob("*.py"):
            tree = ast.parse(script.read_text())
            defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
            assert defined == [], f"{script.relative_to(ROOT)} defines {defined}: put it in the library"
            assert len(script.read_text().splitlines()) < 30, script
