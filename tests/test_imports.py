"""Every module of the package imports, the module import graph has no cycle and no upward arrow.

The graph counts every ``import`` statement found by walking each module's syntax tree, at module level and
inside functions alike (a function-level import hides a cycle from Python but not from the design).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import anomnet

PACKAGE_DIR = Path(anomnet.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    found = {"anomnet": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="anomnet."):
        rel = Path(*info.name.split(".")[1:])
        path = PACKAGE_DIR / rel / "__init__.py" if info.ispkg else PACKAGE_DIR / rel.with_suffix(".py")
        found[info.name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import anomnet.x.y` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


# An optional extra's libraries: the modules built on them (the Ray engine's rows and driver) import only with
# that extra installed; CI installs it. Any other missing module fails the test.
EXTRA_LIBRARIES = {"pyarrow", "ray"}


def test_every_module_imports() -> None:
    for name in _modules():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in EXTRA_LIBRARIES or importlib.util.find_spec(top) is not None:
                raise


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles met by a depth-first walk of ``graph`` (each as the path that closes it)."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_study_code_in_the_package() -> None:
    modules = _modules()
    assert "anomnet.postprocess_bench" not in modules
    bench_imports = _imports("anomnet.bench", modules["anomnet.bench"], modules)
    assert not any("postprocess" in m and m != "anomnet.decisions.postprocess" for m in bench_imports)


# The layers: library parts below, the entry points above. A module of a lower part never imports an entry
# point (an 'upward' arrow), and the components (building blocks) never import the detectors built from them.
LOWER = ("anomnet.predict", "anomnet.decisions", "anomnet.evaluation", "anomnet.components", "anomnet.imageio")
ENTRY_POINTS = ("anomnet.engine", "anomnet.serve", "anomnet.watch", "anomnet.cli", "anomnet.api")
BELOW_DETECTORS = ("anomnet.components",)
DETECTORS = ("anomnet.detectors",)


def _within(name: str, parts: tuple[str, ...]) -> bool:
    return any(name == part or name.startswith(part + ".") for part in parts)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(module, imported)`` pairs that break the layers above."""
    return sorted(
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if (_within(name, LOWER) and _within(target, ENTRY_POINTS))
        or (_within(name, BELOW_DETECTORS) and _within(target, DETECTORS))
    )


def test_the_layer_check_finds_upward_imports() -> None:
    graph = {
        "anomnet.predict.outputs": {"anomnet.engine.rows", "anomnet.imageio"},
        "anomnet.imageio": {"anomnet.cli"},
        "anomnet.components.features": {"anomnet.detectors.base", "anomnet.backbones"},
        "anomnet.engine.rows": {"anomnet.predict.outputs"},  # downward: allowed
        "anomnet.detectors.base": {"anomnet.components.features"},
    }
    assert upward_imports(graph) == [
        ("anomnet.components.features", "anomnet.detectors.base"),
        ("anomnet.imageio", "anomnet.cli"),
        ("anomnet.predict.outputs", "anomnet.engine.rows"),
    ]


def test_no_upward_import() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    found = upward_imports(graph)
    assert not found, "upward imports:\n" + "\n".join(f"{a} -> {b}" for a, b in found)
