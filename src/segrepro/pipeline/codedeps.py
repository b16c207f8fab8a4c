"""The source files each workflow stage runs, found by following the package's own imports.

Snakemake reruns a job when its shell command or an input changes, but not when a Python module
it imports changes. Declaring these files as inputs makes a code change rerun exactly the jobs
whose stage runs the changed module: the modules its CLI command imports, followed through the
package (imports inside functions too), less the other model families' code, the synthetic
generator on a real dataset, and bookkeeping that changes no output.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "segrepro"
CLI = "segrepro.cli"
# The `segrepro` command each workflow stage's rule runs. A stage's entry modules are the package
# modules its `cmd_*` function in segrepro.cli imports: the code the command runs, read from the
# CLI itself rather than listed here. (The CLI's own module-level imports, argument parsing and
# params/ loading, are every command's and are left out.)
STAGES = {
    "prepare": "prepare",
    "train": "train",
    "evaluate": "evaluate",
    "submit": "submit",
    "table": "table",
    "pyramids": "pyramids",
    "pyramid_stats": "pyramid-stats",
    "figure": "figure",
    "flops": "flops",
    "efficiency": "efficiency",
    "report": "report",
}
# Modules a stage runs in a process of their own, started by module name (`python -m`) rather
# than imported, which the import graph cannot see.
STARTED_BY_NAME = {"efficiency": ("segrepro.measure.efficiency_probe",)}

# The modules only one model family's runs need (a package covers its modules). A run of another
# family does not follow their imports, so editing the SaF model does not rerun PSPNet's
# trainings, and the other way round. Code several families share lives in segrepro.models.common.
FAMILY_MODULES = {
    "pspnet": ("segrepro.models.pspnet",),
    "saf": ("segrepro.models.saf", "segrepro.engine.saf_analysis"),
    "hfgd": ("segrepro.models.hfgd",),
}
# The code that makes each kind of dataset: the synthetic generator, and the download, extraction
# and conversion of real archives and folders. A job on one kind of data leaves the other's out,
# so editing the generator reruns nothing on a real dataset, and editing a converter nothing on
# synthetic data.
DATA_MODULES = {
    "synthetic": ("segrepro.data.synthetic",),
    "real": ("segrepro.data.convert", "segrepro.data.download", "segrepro.data.extract", "segrepro.data.folder",
             "segrepro.data.items"),
}
# Bookkeeping: MLflow tracking, the training log and curve, these code inputs. A stage runs it
# beside its work, but it never changes a stage's declared output (a model, metrics, a table...),
# so editing it reruns no job but those whose output shows it (the report: MLflow links, curves).
BOOKKEEPING = "segrepro.pipeline"
SHOWS_BOOKKEEPING = {"report"}


def _module_file(source_root: Path, module: str) -> Path | None:
    base = source_root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Package modules imported anywhere in the file (functions too: lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imported_modules_of(ast.parse(path.read_text(), str(path)), package)


def _imported_modules_of(tree: ast.AST, package: str) -> set[str]:
    """Package modules imported anywhere in `tree`, relative imports resolved against `package`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _covered(module: str, prefixes) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def entry_modules(stage: str, source_root: str = "src") -> list[str]:
    """The package modules the stage's CLI command imports (its `cmd_*` function, at any depth),
    and those it starts by name."""
    command = STAGES[stage]
    cli = _module_file(Path(source_root), CLI)
    function = f"cmd_{command.replace('-', '_')}"
    tree = ast.parse(cli.read_text(), str(cli))
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function]
    if not found:
        raise LookupError(f"{cli}: no {function} for stage '{stage}'")
    body = ast.Module(body=found[0].body, type_ignores=[])
    imported = _imported_modules_of(body, PACKAGE)
    return sorted(imported) + list(STARTED_BY_NAME.get(stage, ()))


@cache
def stage_sources(stage: str, family: str | None = None, source_root: str = "src",
                  data: str | None = None) -> list[str]:
    """Sorted paths (under `source_root`) of every package module the stage's entry modules
    import, themselves and the packages' __init__ files included. With a model `family`, the
    modules of the other families are left out; with the kind of `data` the job runs on
    ("synthetic" or "real"), the code that makes the other kind is; the bookkeeping modules are,
    but for a stage that shows them."""
    root = Path(source_root)
    others = [m for name, modules in FAMILY_MODULES.items() if name != family for m in modules]
    if family is None:
        others = []
    if data is not None:
        others += [m for kind, modules in DATA_MODULES.items() if kind != data for m in modules]
    if stage not in SHOWS_BOOKKEEPING:
        others.append(BOOKKEEPING)
    pending, seen = entry_modules(stage, source_root), {}
    while pending:
        module = pending.pop()
        path = _module_file(root, module)
        if path is None or module in seen or _covered(module, others):
            continue
        seen[module] = path
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        pending.extend(parents)
        pending.extend(imported_modules(path, module))
    return sorted(str(path) for path in seen.values())
