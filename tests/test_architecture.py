"""The package's import graph has no circle and no upward import: every module imports only from its own layer or
the layers below it (ARCHITECTURE.md draws them)."""

from __future__ import annotations

import pytest

from kdrepro.pipeline.deps import module_graph

#: Bottom to top. A module belongs to the first entry that is its name or a package above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kdrepro.errors",),
    ("kdrepro.io", "kdrepro.config", "kdrepro.distributed"),
    ("kdrepro.pipeline",),
    ("kdrepro.models", "kdrepro.data"),
    ("kdrepro.distill", "kdrepro.evaluate"),
    ("kdrepro.train",),
    ("kdrepro.analysis",),
    ("kdrepro.report",),
    ("kdrepro.plan", "kdrepro.evaluate_cli", "kdrepro.cli", "kdrepro.__main__", "kdrepro"),
)


def layer(module: str) -> int:
    """The index in :data:`LAYERS` of ``module`` (a KeyError for a module no layer names)."""
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names if name != "kdrepro") or module in names:
            return index
    raise KeyError(f"{module} is in no layer of LAYERS; add it to the layer it belongs to")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


GRAPH = module_graph()


def test_every_module_has_a_layer():
    assert [module for module in GRAPH if _unlayered(module)] == []


def _unlayered(module: str) -> bool:
    try:
        layer(module)
    except KeyError:
        return True
    return False


def test_no_import_circle():
    assert circles(GRAPH) == []


def test_no_upward_import():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a))
    assert upward == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]), ({"a": {"b"}, "b": set()}, []), ({"a": {"a"}}, [["a"]])],
)
def test_circles_finds_loops(graph, expected):
    assert circles(graph) == expected


def test_the_old_circle_would_be_found():
    """io importing the models again (as load_model once did) closes io -> models -> segmentor -> weights -> io."""
    graph = {name: set(targets) for name, targets in GRAPH.items()}
    graph["kdrepro.io"].add("kdrepro.models")
    assert any("kdrepro.io" in circle for circle in circles(graph))
