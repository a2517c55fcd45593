"""The shape of the code (README, "Code map"): layers import downwards only, no import cycle
(imports inside functions count), `models/` below `viz/`, the app (`app.py` and `lens_app/`)
through the front doors, and no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ["engine", "measures", "figures", "commands"]  # each may import only those before it
# the `python -m` entry points and the `attention-lens` command: the only ways into training
TRAINING_ENTRY = {"models.train", "models.train_hybrid", "models.card", "viz.commands.front_door"}

# what the app may import of the library (`viz.targets`: what a CAM explains, a public module)
FRONT_DOORS = {"models", "viz", "viz.figures", "viz.targets"}


def _sources() -> list[Path]:
    return [*ROOT.glob("models/**/*.py"), *ROOT.glob("viz/**/*.py"), ROOT / "app.py",
            *ROOT.glob("lens_app/**/*.py")]  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in _sources():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in it (the longest known prefix of each)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _package_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "viz" and len(parts) > 2 and parts[1] in LAYERS else None


def test_no_import_cycles():
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError(" -> ".join(path[path.index(node) :] + [node]))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            # a package's __init__ re-exports its modules (the front doors): not followed
            if not nxt.startswith(node + ".") and nxt not in ("viz", "models"):
                visit(nxt, path + [node])
        done.add(node)

    for name in graph:
        visit(name, [])


def test_layers_import_downwards_only():
    wrong = []
    for name, targets in _graph().items():
        here = _package_of(name)
        for target in targets:
            there = _package_of(target)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                wrong.append(f"{name} -> {target}")
            # training is the top room of models/: only the entry points reach into it
            if target.startswith("models.training") and not name.startswith("models.training"):
                if name not in TRAINING_ENTRY:
                    wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_models_import_nothing_from_viz_and_the_app_only_front_doors():
    graph = _graph()
    assert [(m, t) for m, ts in graph.items() if m.startswith("models") for t in ts
            if t.startswith("viz")] == []  # fmt: skip
    for name, targets in graph.items():  # `from viz import figures` is a front door too
        if name == "app" or name.startswith("lens_app"):
            library = {t for t in targets if not t.startswith("lens_app")}
            assert library <= FRONT_DOORS, (name, library - FRONT_DOORS)


def test_the_app_package_imports_downwards():
    """`app.py` over `lens_app.page` over the views over the shared helpers: nothing in
    `lens_app` imports the entry script, and no view imports the page (which routes to them)."""
    graph = _graph()
    assert "lens_app" in graph and "lens_app.views.dataset" in graph  # the package is seen
    wrong = [
        (name, t) for name, targets in graph.items() if name.startswith("lens_app")
        for t in targets if t == "app" or (name.startswith("lens_app.views") and t == "lens_app.page")
    ]  # fmt: skip
    assert wrong == []


def test_no_function_over_80_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []
