"""No import cycles inside the ``lowlabel`` package.

The graph is read from the source with :mod:`ast`, without importing anything. Every ``import``
statement of a module counts, wherever it stands: at module level, inside a function or method,
inside a class body. A function-level (deferred) import does not fail at import time, but it ties
the two modules together all the same (each needs the other to work, neither can be read or
tested alone), and the two circles this test was written against ran through deferred imports
(``data.dataset`` -> ``data.raster`` -> ``data.dataset``, ``models.segmenter`` ->
``models.ssr_sam`` -> ``models.segmenter``). Only imports under ``if TYPE_CHECKING:`` are left
out: they never run.

Edges: ``import a.b.c`` and ``from a.b.c import x`` lead to ``a.b.c`` (and to ``a.b.c.x`` when
that is a module), and to every package above ``a.b.c`` that is not also above the importing
module (Python runs those packages' ``__init__`` first; a package above the importer is already
being initialised when the importer runs, so it adds no edge).
"""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src"
PACKAGE = "lowlabel"


def package_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    mods = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                stack.extend(node.orelse)
                continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for what counts)."""
    mods = package_modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name if is_pkg else name.rsplit(".", 1)[0]  # the package relative imports start from
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods)
        own = set(_ancestors(name))
        deps = set()
        for t in targets:
            if t.split(".")[0] != package:
                continue
            deps.update(m for m in [t, *_ancestors(t)] if m in mods and m not in own)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative), each as
    one concrete cycle through its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return [_cycle_in(graph, comp) for comp in comps]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search back to it)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {sorted(comp)}")


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert len(graph) > 40 and "lowlabel.cli" in graph  # the walk found the package
    assert "lowlabel.errors" in graph["lowlabel.data.raster"]  # deferred and module-level imports are both read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_cycle_finder_finds_deferred_and_package_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")  # deferred: still a cycle
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import y\n")
    (pkg / "d.py").write_text("import pkg.c\n")  # c -> d only for the type checker: no cycle
    (pkg / "sub" / "__init__.py").write_text("from .e import z\n")
    (pkg / "sub" / "e.py").write_text("import os\nfrom . import f\n")  # own package: no edge back to sub
    (pkg / "sub" / "f.py").write_text("")
    (pkg / "g.py").write_text("from .sub.f import q\n")  # -> pkg.sub.f and pkg.sub (its __init__ runs)
    (pkg / "sub" / "h.py").write_text("class K:\n    from ..g import q\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.g"] == {"pkg.sub", "pkg.sub.f"}
    assert graph["pkg.sub.e"] == {"pkg.sub.f"}
    assert graph["pkg.c"] == set()
    found = cycles(graph)
    assert sorted(found) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "sub" / "__init__.py").write_text("from .h import K\n")  # sub -> sub.h -> g -> sub
    found = cycles(import_graph(tmp_path, "pkg"))
    assert ["pkg.g", "pkg.sub", "pkg.sub.h", "pkg.g"] in found and len(found) == 2


def test_compatibility_names_are_the_same_objects():
    from lowlabel import errors
    from lowlabel.data import dataset, raster
    from lowlabel.models import instance, normalization, segmenter

    assert dataset.DatasetError is errors.DatasetError is raster.DatasetError
    assert segmenter.MEAN is normalization.MEAN and segmenter.STD is normalization.STD
    assert instance.MEAN == normalization.MEAN and len(normalization.STD) == 3
