"""The package's rooms: imports point only down the layers, no cycle, small modules, one registry.

Read from the source with ``ast`` (nothing is imported): every ``import`` counts, also those inside
functions; only imports under ``if TYPE_CHECKING:`` (annotations, never executed) are left out of
the cycle check, not of the layer check.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmshiftkv"

#: The layers, top first. A module may import its own package (``mmshiftkv.presses.*`` from
#: ``mmshiftkv.presses.*``) and any package of a lower layer; nothing else. The vLLM plugin, the
#: pipeline, kvpress interop and the evaluation use the library and not one another; the grounding
#: task uses the evaluation (its calibration images); ``cache`` routes attention over compressed layers
#: and finds the model's attention layers through ``models`` (the adapter), which needs nothing above.
LAYERS: list[tuple[str, ...]] = [
    ("mmshiftkv",),  # the lazy top-level namespace
    ("mmshiftkv.cli",),
    ("mmshiftkv.demo",),
    ("mmshiftkv.grounding",),
    ("mmshiftkv.evaluation", "mmshiftkv.pipelines", "mmshiftkv.vllm", "mmshiftkv.interop"),
    ("mmshiftkv.generation",),
    ("mmshiftkv.registry",),
    ("mmshiftkv.presses",),
    ("mmshiftkv.allocators",),
    ("mmshiftkv.cache",),
    ("mmshiftkv.models",),
    ("mmshiftkv.ops",),
    ("mmshiftkv.validation", "mmshiftkv.tokenization"),
]
#: Test utilities: may import anything; no runtime module imports them.
TESTING = "mmshiftkv.testing"
MAX_LINES = 600
#: The one module that turns press and allocator names into objects.
REGISTRY = "mmshiftkv.registry"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    """The top-level room of a module: ``mmshiftkv.presses.base`` -> ``mmshiftkv.presses``."""
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    room = package_of(module)
    for index, rooms in enumerate(LAYERS):
        if room in rooms:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS (add its room there)")


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> Iterator[tuple[str, int, bool]]:
    """``(imported mmshiftkv module, line, under TYPE_CHECKING)`` for every import in ``module``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    typing_only = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            # ``from mmshiftkv import ops`` imports the submodule; ``from mmshiftkv.x import name`` the module
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "mmshiftkv" or target.startswith("mmshiftkv."):
                while target not in MODULES:  # a name inside a module, or a missing module: its package
                    target = target.rsplit(".", 1)[0]
                yield target, node.lineno, node.lineno in typing_only


def runtime(module: str) -> bool:
    return package_of(module) != TESTING


def test_every_room_is_in_a_layer() -> None:
    for module in MODULES:
        if runtime(module):
            layer_of(module)


def test_imports_point_only_down_the_layers() -> None:
    upward = []
    for module in filter(runtime, MODULES):
        for target, line, _ in imports(module):
            if package_of(target) == package_of(module):
                continue
            if not runtime(target):
                upward.append(f"{module}:{line} imports the test utilities {target}")
            elif layer_of(target) <= layer_of(module):
                upward.append(f"{module}:{line} imports {target} (not in a lower layer)")
    assert upward == []


def test_no_import_cycle() -> None:
    graph = {
        module: sorted({target for target, _, typing_only in imports(module) if not typing_only})
        for module in MODULES
    }
    cycles = []
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(filter(runtime, MODULES)))
def test_runtime_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by idea"


def test_only_the_registry_builds_presses_and_allocators_by_name() -> None:
    """Outside the registry its tables are read for their names only: never indexed, never redefined."""
    offenders = []
    for module in MODULES:
        if module == REGISTRY:
            continue
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            table = None
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
                table = node.value.id
            elif isinstance(node, ast.Attribute) and node.attr in ("values", "items", "get"):
                table = node.value.id if isinstance(node.value, ast.Name) else None
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                table = next((t.id for t in targets if isinstance(t, ast.Name)), None)
            if table in ("PRESSES", "ALLOCATORS"):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def test_conftest_holds_only_fixtures() -> None:
    tree = ast.parse((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    definitions = [
        node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Assign)
    ]
    not_fixtures = [
        node.lineno
        for node in definitions
        if not (
            isinstance(node, ast.FunctionDef)
            and any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
        )
    ]
    assert not_fixtures == [], "helpers and constants belong in mmshiftkv.testing"
