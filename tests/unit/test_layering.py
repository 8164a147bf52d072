"""The package's layers point one way (docs/DESIGN.md §3): the torch-only core, then the Ray
layers, then the applications. Checked on the import graph read from the source (ast, every
import including lazy ones inside functions), and once at run time (importing the core loads
no Ray).

Rules, each tested here on a synthetic graph with a planted violation:
- every unit (a top-level module or subpackage of unimoe_ray) imports only the units
  ALLOWED lists for it: core → core below it, Ray layers → core (+ the Ray layers named),
  applications → anything but are imported by no layer;
- the core imports no `ray`;
- no import cycles, between units or between modules;
- no private names across modules (`from unimoe_ray.x import _helper`, `x._helper`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "unimoe_ray"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

# The core: torch (and numpy) only. Each entry lists the core units it may import.
CORE = {
    "config": set(),
    "tasks": set(),
    "media": set(),
    "config_hf": {"config"},
    "presets": {"config", "config_hf"},
    "audio": {"config"},
    "model": {"config"},
    "text": {"config", "audio"},
    "checkpoint": {"config", "config_hf", "model"},
    "checkpoint_hf": {"config", "model", "checkpoint"},
    "inference": {"config", "tasks", "audio", "media", "model", "text", "checkpoint"},
    "builders": {"config", "presets", "audio", "model", "text", "checkpoint"},
}
# Ray layers: any core unit, plus the layers named here. `eval` imports no Ray itself, but it
# reads data's row layout and train's batches and loss, so it sits beside them, not in the core.
RAY_LAYERS = {"parallel": set(), "data": set(), "serve": {"parallel"}, "train": {"data"}, "eval": {"data", "train"}}
# Applications (the `apps` subpackage: cli, cli_generate, demo, product): may import anything; no
# core unit or Ray layer may import them.
APPLICATIONS = {"apps"}

ALLOWED: dict[str, set[str]] = {
    **CORE,
    **{unit: set(CORE) | extra for unit, extra in RAY_LAYERS.items()},
    **{app: set(CORE) | set(RAY_LAYERS) | APPLICATIONS for app in APPLICATIONS},
    "__init__": set(),  # the package's own __init__ imports nothing
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "unimoe_ray.text.prompts"
    target: str  # imported module, e.g. "unimoe_ray.text.prompt" or "ray.data"
    names: tuple[str, ...] = ()  # names taken from it (`from target import a, b`, `target.a`)
    line: int = 0


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_graph(root: Path = ROOT) -> tuple[set[str], list[Edge]]:
    """Every module of the package and every import it makes (top-level or lazy)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: list[Edge] = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        module_aliases: dict[str, str] = {}  # local name -> unimoe_ray module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    edges.append(Edge(mod, a.name, (), node.lineno))
                    if a.name.startswith(PACKAGE) and a.asname:
                        module_aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute {PACKAGE}. path")
                names = []
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in files:  # `from unimoe_ray.model import kernels`: an import of that module
                        edges.append(Edge(mod, sub, (), node.lineno))
                        module_aliases[a.asname or a.name] = sub
                    else:
                        names.append(a.name)
                if names or node.module not in files:
                    edges.append(Edge(mod, node.module, tuple(names), node.lineno))
        for node in ast.walk(tree):  # `kernels._plan` on an imported module
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases:
                edges.append(Edge(mod, module_aliases[node.value.id], (node.attr,), node.lineno))
    return set(files), edges


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def violations(
    modules: set[str], edges: list[Edge], allowed: dict[str, set[str]] = ALLOWED, core: set[str] = set(CORE)
) -> list[str]:
    """Every broken rule, one line each (empty when the graph is layered)."""
    found = []
    for unit in sorted({unit_of(m) for m in modules} - set(allowed)):
        found.append(f"unit {unit!r} has no layer: add it to ALLOWED in tests/unit/test_layering.py")
    unit_graph: dict[str, set[str]] = {}
    module_graph: dict[str, set[str]] = {}
    for e in edges:
        where = f"{e.source} (line {e.line})"
        src = unit_of(e.source)
        if e.target == "ray" or e.target.startswith("ray."):
            if src in core:
                found.append(f"{where} imports {e.target}: the core ({src}) must not import Ray")
            continue
        if not (e.target == PACKAGE or e.target.startswith(PACKAGE + ".")):
            continue
        dst = unit_of(e.target)
        if dst != src:
            unit_graph.setdefault(src, set()).add(dst)
            if src in allowed and dst not in allowed[src]:
                kind = "an application" if dst in APPLICATIONS else f"{dst!r}"
                found.append(f"{where} imports {e.target}: {src!r} may not import {kind}")
        if e.target != e.source:
            module_graph.setdefault(e.source, set()).add(e.target)
            for name in e.names:
                if name.startswith("_") and not name.startswith("__"):
                    found.append(
                        f"{where} uses {e.target}.{name}: a private name of another module "
                        "(make it public where it is defined)"
                    )
    for what, graph in (("units", unit_graph), ("modules", module_graph)):
        if cycle := _cycle(graph):
            found.append(f"import cycle between {what}: {' -> '.join(cycle)}")
    return found


def test_the_package_is_layered():
    modules, edges = read_graph()
    assert f"{PACKAGE}.text.prompt" in modules and len(edges) > 100  # the reader sees the tree
    assert violations(modules, edges) == []


# A synthetic package that keeps the rules, then one planted violation per rule.
_MODULES = {
    "unimoe_ray",
    "unimoe_ray.config",
    "unimoe_ray.model.moe",
    "unimoe_ray.inference.generate",
    "unimoe_ray.serve.app",
    "unimoe_ray.apps.demo",
}
_CLEAN = [
    Edge("unimoe_ray.model.moe", "unimoe_ray.config", ("ModelConfig",)),
    Edge("unimoe_ray.inference.generate", "unimoe_ray.model.moe", ("DCMoE",)),
    Edge("unimoe_ray.serve.app", "unimoe_ray.inference.generate", ("generate",)),
    Edge("unimoe_ray.serve.app", "ray.serve"),
    Edge("unimoe_ray.apps.demo", "unimoe_ray.serve.app", ("build_app",)),
    Edge("unimoe_ray.inference.generate", "torch"),
]


def test_a_layered_synthetic_graph_passes():
    assert violations(_MODULES, _CLEAN) == []


def test_core_importing_ray_is_caught():
    found = violations(_MODULES, _CLEAN + [Edge("unimoe_ray.model.moe", "ray", (), 7)])
    assert found == ["unimoe_ray.model.moe (line 7) imports ray: the core (model) must not import Ray"]


def test_a_layer_importing_an_application_is_caught():
    found = violations(
        _MODULES, _CLEAN + [Edge("unimoe_ray.serve.app", "unimoe_ray.apps.demo", ("reference_voice",), 3)]
    )
    # serve -> apps breaks the table, and apps -> serve makes it a cycle as well
    assert found[0] == (
        "unimoe_ray.serve.app (line 3) imports unimoe_ray.apps.demo: 'serve' may not import an application"
    )
    assert any(f.startswith("import cycle between units: apps -> serve -> apps") for f in found)


def test_an_upward_core_import_and_its_cycle_are_caught():
    found = violations(_MODULES, _CLEAN + [Edge("unimoe_ray.model.moe", "unimoe_ray.inference.generate", ("x",), 9)])
    assert (
        "unimoe_ray.model.moe (line 9) imports unimoe_ray.inference.generate: 'model' may not import 'inference'"
        in found
    )
    assert "import cycle between units: inference -> model -> inference" in found
    assert (
        "import cycle between modules: unimoe_ray.inference.generate -> unimoe_ray.model.moe -> "
        "unimoe_ray.inference.generate" in found
    )


def test_a_cycle_inside_one_unit_is_caught():
    modules = _MODULES | {"unimoe_ray.model.router"}
    edges = _CLEAN + [
        Edge("unimoe_ray.model.router", "unimoe_ray.model.moe", ("a",)),
        Edge("unimoe_ray.model.moe", "unimoe_ray.model.router", ("b",)),
    ]
    assert violations(modules, edges) == [
        "import cycle between modules: unimoe_ray.model.moe -> unimoe_ray.model.router -> unimoe_ray.model.moe"
    ]


def test_a_private_name_across_modules_is_caught():
    found = violations(
        _MODULES, _CLEAN + [Edge("unimoe_ray.serve.app", "unimoe_ray.inference.generate", ("_batch_prompts",), 5)]
    )
    assert found == [
        "unimoe_ray.serve.app (line 5) uses unimoe_ray.inference.generate._batch_prompts: a private "
        "name of another module (make it public where it is defined)"
    ]
    assert (
        violations(_MODULES, _CLEAN + [Edge("unimoe_ray.serve.app", "unimoe_ray.inference.generate", ("__version__",))])
        == []
    )  # dunders are public


def test_a_new_unit_must_be_placed_in_a_layer():
    found = violations(_MODULES | {"unimoe_ray.extras.thing"}, _CLEAN)
    assert found == ["unit 'extras' has no layer: add it to ALLOWED in tests/unit/test_layering.py"]


def test_the_reader_sees_lazy_module_and_attribute_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "__init__.py").write_text("")
    (pkg / "model" / "kernels.py").write_text("def _plan(): pass\n")
    (pkg / "model" / "moe.py").write_text(
        "def f():\n    import ray\n    from unimoe_ray.model import kernels\n    return kernels._plan()\n"
    )
    modules, edges = read_graph(pkg)
    assert modules == {"unimoe_ray", "unimoe_ray.model", "unimoe_ray.model.kernels", "unimoe_ray.model.moe"}
    assert Edge("unimoe_ray.model.moe", "ray", (), 2) in edges
    assert Edge("unimoe_ray.model.moe", "unimoe_ray.model.kernels", ("_plan",), 4) in edges
    found = violations(modules, edges)
    assert "unimoe_ray.model.moe (line 2) imports ray: the core (model) must not import Ray" in found
    assert any("uses unimoe_ray.model.kernels._plan" in f for f in found)


def test_the_design_doc_shows_the_allowed_table():
    """docs/DESIGN.md §3's "may import" table and ALLOWED say the same thing."""
    import re

    text = (ROOT.parent / "docs/DESIGN.md").read_text(encoding="utf-8")
    section = text[text.index("## 3.") : text.index("## 4.")]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        units, may = re.findall(r"`(\w+)`", cells[0]), cells[1]
        allowed = set(re.findall(r"`(\w+)`", may))
        if may.startswith("the core"):
            allowed |= set(CORE)
        elif may == "anything":
            allowed = set(CORE) | set(RAY_LAYERS) | APPLICATIONS
        table.update({u: allowed for u in units})
    assert table == {u: a for u, a in ALLOWED.items() if u != "__init__"}


def test_the_core_loads_no_ray_at_run_time():
    """The static check above sees unimoe_ray's own imports; this one also catches Ray arriving
    through a third-party package the core imports."""
    core = sorted(f"{PACKAGE}.{u}" for u in CORE)
    code = (
        "import sys, pkgutil, importlib\n"
        f"for name in {core!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(getattr(mod, '__path__', []), name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
