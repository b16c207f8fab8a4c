"""The package's shape: no import cycles among its modules (imports inside functions count), and
the torch-free layers (segrepro.config, segrepro.reporting, the CLI's argument parsing) stay
torch-free and never reach into the engine, the models or the measurements."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segrepro.pipeline import codedeps

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "segrepro"
TORCH_FREE = ("segrepro.config", "segrepro.reporting")
TORCH_LAYERS = ("segrepro.engine", "segrepro.models", "segrepro.measure")


def module_name(path: Path, root: Path = SOURCE_ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = SOURCE_ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The package modules a file imports, at any depth (module level, functions, branches), read
    by the parser the code inputs use (segrepro.pipeline.codedeps): `from a import b` imports a, and
    a.b too when that is a module."""
    return (codedeps.imported_modules(path, module) & known) - {module}


def import_graph(root: Path = SOURCE_ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {module: imports_of(path, module, set(modules)) for module, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def in_layer(module: str, layers: tuple[str, ...]) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


# ----------------------------------------------------------------------------- the checker itself

def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    write_package(tmp_path, {
        "segrepro/__init__.py": "",
        "segrepro/a.py": "from segrepro.b import f\n",
        "segrepro/b.py": "def f():\n    from segrepro import a\n",
        "segrepro/c.py": "from segrepro import a\n",
    })
    assert find_cycles(import_graph(tmp_path)) == [["segrepro.a", "segrepro.b"]]


def test_a_cycle_through_a_package_reexport_and_a_relative_import_is_found(tmp_path):
    write_package(tmp_path, {
        "segrepro/__init__.py": "",
        "segrepro/sub/__init__.py": "from segrepro.sub.impl import thing\n",
        "segrepro/sub/impl.py": "def thing():\n    from .. import top\n",
        "segrepro/top.py": "from segrepro.sub import thing\n",
    })
    assert find_cycles(import_graph(tmp_path)) == [["segrepro.sub", "segrepro.sub.impl", "segrepro.top"]]


def test_an_acyclic_package_has_no_cycle(tmp_path):
    write_package(tmp_path, {
        "segrepro/__init__.py": "",
        "segrepro/a.py": "from segrepro import b\n",
        "segrepro/b.py": "def f():\n    import segrepro.c\n",
        "segrepro/c.py": "",
    })
    graph = import_graph(tmp_path)
    # `from segrepro import b` runs the package's __init__ first, then b.
    assert graph["segrepro.a"] == {"segrepro", "segrepro.b"} and graph["segrepro.b"] == {"segrepro.c"}
    assert find_cycles(graph) == []


# ----------------------------------------------------------------------------- the package

def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_torch_free_layers_never_import_the_torch_layers():
    graph = import_graph()
    assert any(in_layer(m, TORCH_FREE) for m in graph), "no config or reporting module found"
    crossings = sorted((module, target) for module, targets in graph.items() if in_layer(module, TORCH_FREE)
                       for target in targets if in_layer(target, TORCH_LAYERS))
    assert crossings == []


@pytest.mark.parametrize("code", [
    "import segrepro.config, segrepro.config.params, segrepro.config.table_specs, segrepro.config.efficiency_spec",
    # Every module of the reporting layer, loaded at once.
    "import pkgutil, importlib, segrepro.reporting as r\n"
    "[importlib.import_module(f'segrepro.reporting.{m.name}') for m in pkgutil.iter_modules(r.__path__)]",
    # The CLI's argument parsing and a command that only reads params/.
    "from segrepro import cli\ncli.build_parser().parse_args(['list'])\ncli.main(['list'])",
])
def test_the_torch_free_layers_leave_torch_unloaded(code):
    check = code + "\nimport sys\nloaded = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n" \
                   "assert not loaded, loaded\n"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=SOURCE_ROOT.parent, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
