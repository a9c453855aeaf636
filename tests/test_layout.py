"""The import graph of the four packages, read from their source with `ast`: no cycles, no import up the layers, no
unexplained import inside a function, and inside `stages` the recipe reads one way (stage modules above the shared
machinery of `stages.core`, which never imports a stage).

Layers: flows -> stages -> {grpo, rewards}; grpo and rewards import neither each other nor anything above them.
An edge counts wherever the import is written (module level or inside a function); `from x import y` where x.y is a
module is an edge to x.y. An internal import inside a function must say why on its line or the line above its import
block (`# lazy: ...`): everything else belongs at the top of the module.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "rewards", "stages", "flows")
ALLOWED = {"flows": {"flows", "stages", "grpo", "rewards"}, "stages": {"stages", "grpo", "rewards"},
           "grpo": {"grpo"}, "rewards": {"rewards"}}
STAGE_MODULES = {f"stages.{s}" for s in ("base_model", "r1_zero", "cold_start_sft", "reasoning_rl", "synthesize",
                                         "general_sft", "preference_rl", "distill")}
STAGE_IMPORTERS = {"stages.registry", "stages.entry"}
SHARED = "stages.core"
LAZY = re.compile(r"#\s*lazy\b", re.IGNORECASE)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    in_function: bool
    explained: bool

    def where(self) -> str:
        return f"{self.src}:{self.line} imports {self.dst}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _target(node: ast.ImportFrom | ast.Import, alias: ast.alias, src: str, is_pkg: bool, known) -> str:
    if isinstance(node, ast.Import):
        name = alias.name
    else:
        base = node.module or ""
        if node.level:
            here = src.split(".") if is_pkg else src.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        name = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
    while name and name not in known:  # `import a.b.func`-like names: the longest known module
        name = name.rpartition(".")[0]
    return name


def _function_import_blocks(tree: ast.AST) -> set[int]:
    """The lines of every import statement inside a function."""
    lines: set[int] = set()
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for n in ast.walk(fn):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                lines.update(range(n.lineno, (n.end_lineno or n.lineno) + 1))
    return lines


def _explained(node: ast.stmt, source_lines: list[str], import_lines: set[int]) -> bool:
    if any(LAZY.search(source_lines[i - 1]) for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
        return True
    above = node.lineno - 1
    while above in import_lines:  # the comment may head a block of imports
        if LAZY.search(source_lines[above - 1]):
            return True
        above -= 1
    return above >= 1 and bool(LAZY.search(source_lines[above - 1]))


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    known = set(modules)
    edges = []
    for src, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        source_lines = text.splitlines()
        import_lines = _function_import_blocks(tree)
        in_fn: set[int] = set()
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            in_fn.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for alias in node.names:
                dst = _target(node, alias, src, path.name == "__init__.py", known)
                if not dst or dst == src:
                    continue
                inside = id(node) in in_fn
                edges.append(Edge(src, dst, node.lineno, inside,
                                  inside and _explained(node, source_lines, import_lines)))
    return edges


def find_cycles(edges: list[Edge]) -> list[tuple[list[str], set[str]]]:
    """Each tangle (strongly connected component of more than one module) with one cycle through it (a -> ... -> a)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def connect(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(_cycle_in(graph, comp), comp) for comp in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def layer_violations(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        src_pkg, dst_pkg = e.src.split(".")[0], e.dst.split(".")[0]
        if dst_pkg not in ALLOWED[src_pkg]:
            out.append(f"{e.where()} ({src_pkg} may import only {sorted(ALLOWED[src_pkg])})")
        elif e.dst in STAGE_MODULES and e.src.startswith("stages.") and e.src not in STAGE_IMPORTERS:
            out.append(f"{e.where()} (a stage module is imported only by {sorted(STAGE_IMPORTERS)})")
        elif e.src.startswith(SHARED + ".") and (e.dst in STAGE_MODULES or e.dst in STAGE_IMPORTERS):
            out.append(f"{e.where()} ({SHARED} is shared machinery below the stages)")
    return out


def unexplained_lazy_imports(edges: list[Edge]) -> list[str]:
    return sorted({f"{e.where()} inside a function without a `# lazy: why` comment"
                   for e in edges if e.in_function and not e.explained})


# ---- the tests

EDGES = import_edges(source_modules())


def test_no_import_cycle():
    cycles = find_cycles(EDGES)
    assert not cycles, "import cycles:\n" + "\n".join(
        f"{' -> '.join(cycle)} (one of the cycles through these {len(comp)} modules: {', '.join(sorted(comp))})"
        for cycle, comp in cycles)


def test_imports_go_down_the_layers():
    bad = layer_violations(EDGES)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_imports_inside_functions_say_why():
    bad = unexplained_lazy_imports(EDGES)
    assert not bad, f"{len(bad)} internal imports inside functions:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """A tree with a cycle, an upward import, a stage imported by the shared core and an unexplained lazy import is
    refused on each count; a lazy import with its reason is accepted."""
    files = {
        "grpo/__init__.py": "",
        "grpo/a.py": "from grpo import b\n",
        "grpo/b.py": "def f():\n    from grpo import a  # lazy: breaks nothing\n",
        "rewards/__init__.py": "from stages.core import x\n",
        "stages/__init__.py": "",
        "stages/r1_zero.py": "from stages.core import x\n",
        "stages/core/__init__.py": "",
        "stages/core/x.py": "def f():\n    from stages import r1_zero\n",
        "flows/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_edges(source_modules(tmp_path))
    assert {tuple(c[:-1]) for c, _ in find_cycles(edges)} >= {("grpo.a", "grpo.b"),
                                                         ("stages.core.x", "stages.r1_zero")}
    bad = layer_violations(edges)
    assert any("rewards:1 imports stages.core" in b for b in bad)
    assert any("stages.core.x:2 imports stages.r1_zero" in b for b in bad)
    lazy = unexplained_lazy_imports(edges)
    assert lazy == ["stages.core.x:2 imports stages.r1_zero inside a function without a `# lazy: why` comment"]
