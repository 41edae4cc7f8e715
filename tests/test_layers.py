"""Imports point one way. Each layer may import itself and the layers below it, never one above:

    cli.py, worker.py        wiring: the processes and the `smi` commands
    api/, emulator/          the HTTP surfaces (the emulator stands alone beside the API)
    workflows/               decide
    activities/              act
    smi/                     the library: vocabulary, settings, database, storage, clients, imaging

and nothing that ships imports the development kit (devstack.py, tests/, bench/); the API does
not import activities (it reaches storage and records through smi/). Inside a
layer, no two modules import each other (directly or round a longer cycle), and no router
imports another router (what they share lives in api/service.py). Imports inside functions
count too: they were how the old cycles hid.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [{"cli", "worker"}, {"api", "emulator"}, {"workflows"}, {"activities"}, {"smi"}]
DEVELOPMENT = {"devstack", "tests", "bench"}
# Lower, yet off limits: the API starts and signals workflows; what activities do (bytes, money,
# mail) it reaches through the library (smi.storage, smi.db), never by building an activity.
FORBIDDEN = {("api", "activities")}
PACKAGES = {name for layer in LAYERS for name in layer} | DEVELOPMENT


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    found = {}
    for top in sorted(PACKAGES):
        if (ROOT / f"{top}.py").exists():
            found[top] = ROOT / f"{top}.py"
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            found[module_name(path)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports, anywhere in it (`from a import b` counts a.b when that is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in modules}


def layer_of(module: str) -> int | None:
    top = module.split(".")[0]
    return next((i for i, layer in enumerate(LAYERS) if top in layer), None)


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, of a sibling (api <-> emulator), of a FORBIDDEN pair, or of the development kit."""
    wrong = []
    for module, imported in edges.items():
        mine = layer_of(module)
        if mine is None:  # the development kit may import anything
            continue
        for target in sorted(imported):
            theirs = layer_of(target)
            sibling = theirs == mine and len(LAYERS[mine]) > 1 and target.split(".")[0] != module.split(".")[0]
            forbidden = (module.split(".")[0], target.split(".")[0]) in FORBIDDEN
            if theirs is None or theirs < mine or (sibling and mine == 1) or forbidden:
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    found: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_points_up_or_into_the_development_kit():
    assert violations(graph()) == []


def test_benchmarks_do_not_import_the_tests():
    assert [
        f"{m} -> {t}" for m, ts in graph().items() if m.startswith("bench") for t in ts if t.startswith("tests")
    ] == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_routers_do_not_import_routers():
    routers = {
        name for name, path in our_modules().items() if name.startswith("api.") and "APIRouter(" in path.read_text()
    }
    edges = graph()
    assert sorted(f"{r} -> {t}" for r in routers for t in edges[r] if t in routers) == []


def test_the_checks_see_what_they_forbid(tmp_path):
    """The checkers themselves, on imports that existed before: a function-level import counts."""
    fake = tmp_path / "wrong.py"
    fake.write_text("def f():\n    from activities.storage import StorageActivities\n")
    assert imports_of(fake, our_modules()) == {"activities.storage"}
    assert violations(
        {"smi.cli": {"worker", "api.app"}, "api.admin": {"activities.storage"}, "smi.db": {"smi.vocabulary"}}
    ) == ["api.admin -> activities.storage", "smi.cli -> api.app", "smi.cli -> worker"]
    assert cycles({"smi.settings": {"smi.codec"}, "smi.codec": {"smi.settings"}, "smi.db": set()}) == [
        ["smi.codec", "smi.settings"]
    ]
