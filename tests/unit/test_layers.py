"""The import graph of src/backhaul keeps its layers (docs/architecture.md, "Layers").

Every import statement counts, function-local ones too: a local import that breaks a
cycle only hides it. A module may import modules of its own layer or of lower ones,
never of a higher one; relay and connector never import each other (they meet only on
the wire); and no two modules import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.codec_independent

SRC = Path(__file__).resolve().parents[2] / "src"

#: The layers, lowest first: a module's layer is that of its longest listed prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    # wire constants and plain helpers: nothing of backhaul below them
    ("backhaul.errors", "backhaul.protocol.constants", "backhaul.files", "backhaul.openssl_ctx", "backhaul.runstats",
     "backhaul.pki", "backhaul.jsonhttp", "backhaul"),
    # settings and sans-I/O cores: what every part is configured by, the protocol state machines
    ("backhaul.config", "backhaul.protocol", "backhaul.logs", "backhaul.maintenance", "backhaul.tlsconfig", "backhaul.progress",
     "backhaul.release"),
    # moving bytes and keeping records: transports, figures, the store, processes
    ("backhaul.transport", "backhaul.metrics", "backhaul.reporter", "backhaul.store", "backhaul.supervisor",
     "backhaul.admin", "backhaul.memory", "backhaul.oidc_client"),
    # the two sides' control planes and agents
    ("backhaul.control", "backhaul.center", "backhaul.connector"),
    # what runs them: the relay's workers, the updater
    ("backhaul.relay", "backhaul.updater"),
    # entry points
    ("backhaul.cli", "backhaul.demo", "backhaul.__main__"),
)

#: Pairs of packages that must not import each other whatever their layers.
APART = (("backhaul.relay", "backhaul.connector"),)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "backhaul").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")
                    parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _layer(module: str) -> int:
    best, rank = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_module_imports_a_higher_layer():
    graph = _graph(_modules())
    wrong = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in graph.items()
        for t in targets
        if _layer(t) > _layer(m)
    ]
    assert wrong == []


def test_relay_and_connector_stay_apart():
    graph = _graph(_modules())
    wrong = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        for t in targets
        for a, b in APART
        if (_within(m, a) and _within(t, b)) or (_within(m, b) and _within(t, a))
    ]
    assert wrong == []


def test_no_import_cycle():
    graph = _graph(_modules())
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_the_graph_is_read():
    """The checks above would pass on an empty graph: prove the reader sees real imports."""
    graph = _graph(_modules())
    assert "backhaul.protocol.constants" in graph["backhaul.protocol.mux"]
    assert "backhaul.transport.tunnel" in graph["backhaul.relay.worker"]
