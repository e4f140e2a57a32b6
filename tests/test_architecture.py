"""The package's shape: layers that import only downwards, and no private reach-ins.

Every import counts, including those inside functions and under ``TYPE_CHECKING``:
moving an import into a function does not hide a cycle from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "celery_perkey_backend"

#: The layers, bottom first. A module may import only modules of lower layers.
LAYERS: list[set[str]] = [
    {"errors"},
    {"urls", "deadline"},
    {"settings"},
    {"keys"},
    {"scripts"},
    {"connection"},
    {"store"},
    {"watches", "outage"},
    {"multiplex"},
    {"waiting", "chords", "sweep", "tasks", "legacy"},
    {"stats"},
    {"prometheus", "doctor"},
    {"backend", "cli"},
    {"aio"},
    {"__init__"},
    {"testing.server"},
    {"testing.topology", "testing.fixtures"},
    {"testing.__init__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The package-relative name an import refers to, or "" for outside ones."""
    if node.level == 0:
        name = node.module or ""
        prefix = "celery_perkey_backend"
        if name == prefix:
            return "__init__"
        return name[len(prefix) + 1 :] if name.startswith(prefix + ".") else ""
    # Relative to the module's package: "testing.topology" and "testing.__init__" are
    # both in "testing"; a top-level module is in the package itself.
    base = module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    target = ".".join([*base, node.module] if node.module else base)
    return target or "__init__"


def _imports(module: str, tree: ast.Module, known: set[str]) -> dict[str, set[str]]:
    """Each package module ``module`` imports, with the names it takes from it."""
    edges: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("celery_perkey_backend"):
                    edges.setdefault(_resolve(module, ast.ImportFrom(alias.name, [], 0)), set())
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target != "__init__" else alias.name
                if sub in known:  # ``from . import scripts``: the module itself
                    edges.setdefault(sub, set())
                else:
                    key = target if target in known else f"{target}.__init__"
                    edges.setdefault(key, set()).add(alias.name)
    edges.pop(module, None)
    return edges


MODULES = _modules()
GRAPH = {name: _imports(name, tree, set(MODULES)) for name, tree in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) == set(RANK)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_downwards(module: str) -> None:
    upward = {other for other in GRAPH[module] if RANK[other] >= RANK[module]}
    assert not upward, f"{module} imports {upward} from its own layer or above"


def test_no_import_cycle() -> None:
    seen: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, name]))
        if name in seen:
            return
        path.append(name)
        for other in GRAPH[name]:
            visit(other)
        path.pop()
        seen.add(name)

    for name in MODULES:
        visit(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_of_other_modules(module: str) -> None:
    imported = {name for names in GRAPH[module].values() for name in names}
    assert not {name for name in imported if name.startswith("_")}
    aliases = {
        alias.asname or alias.name
        for node in ast.walk(MODULES[module])
        if isinstance(node, ast.ImportFrom) and _resolve(module, node)
        for alias in node.names
    }
    reach_ins = [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(MODULES[module])
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]
    assert reach_ins == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_all_lists_what_other_modules_take(module: str) -> None:
    exported: set[str] = set()
    for node in MODULES[module].body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exported = set(ast.literal_eval(node.value))
    taken = {name for edges in GRAPH.values() for name in edges.get(module, ())}
    assert taken <= exported, f"{module}.__all__ lacks {taken - exported}"


@pytest.mark.parametrize("module", ["store", "scripts", "keys", "connection", "settings"])
def test_the_byte_level_core_does_not_know_celery(module: str) -> None:
    outside = set()
    for node in ast.walk(MODULES[module]):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            outside.add(node.module.split(".")[0])
    assert not {"celery", "kombu"} & outside


def test_benchmarks_do_not_import_tests() -> None:
    for path in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] == "tests"], path.name
        assert "sys.path" not in path.read_text(), path.name


def test_the_backend_class_stays_small() -> None:
    (cls,) = [
        node
        for node in MODULES["backend"].body
        if isinstance(node, ast.ClassDef) and node.name == "PerkeyBackend"
    ]
    assert cls.end_lineno is not None
    assert cls.end_lineno - cls.lineno + 1 <= 360
