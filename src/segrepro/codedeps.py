"""The source files each workflow stage runs, found by following the package's own imports.

Snakemake reruns a job when its shell command or an input changes, but not when a Python module
it imports changes. Declaring these files as inputs makes a code change rerun exactly the jobs
whose stage imports the changed module.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = "segrepro"
STAGES = {
    "prepare": "segrepro.data.prepare",
    "train": "segrepro.train",
    "evaluate": "segrepro.evaluate",
    "submit": "segrepro.submit",
    "table": "segrepro.tables",
    "pyramids": "segrepro.pyramid_store",
    "pyramid_stats": "segrepro.pyramid_stats",
    "figure": "segrepro.figures",
    "flops": "segrepro.flops",
    # The table-side module starts the probe by name (segrepro.efficiency's doc says why), so
    # both are entry modules.
    "efficiency": ("segrepro.efficiency", "segrepro.efficiency_probe"),
    "report": "segrepro.report",
}

# The modules only one model family's runs need. A run of another family does not follow their
# imports, so editing the SaF model does not rerun PSPNet's trainings, and the other way round.
# Code two families share lives outside these modules (segrepro.models.layers, backbone, losses).
FAMILY_MODULES = {
    "pspnet": ("segrepro.models.pspnet",),
    "saf": ("segrepro.models.specialize_fuse", "segrepro.saf_analysis"),
    "hfgd": ("segrepro.models.hfgd",),
}


def _module_file(source_root: Path, module: str) -> Path | None:
    base = source_root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """Package modules imported anywhere in the file (functions too: lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


@cache
def stage_sources(stage: str, family: str | None = None, source_root: str = "src") -> list[str]:
    """Sorted paths (under `source_root`) of every package module the stage's entry module(s) import,
    themselves and the packages' __init__ files included. With a model `family`, the modules of the other
    families are left out."""
    root = Path(source_root)
    others = {m for name, modules in FAMILY_MODULES.items() if name != family for m in modules}
    if family is None:
        others = set()
    entries = STAGES[stage]
    pending, seen = [entries] if isinstance(entries, str) else list(entries), {}
    while pending:
        module = pending.pop()
        path = _module_file(root, module)
        if path is None or module in seen or module in others:
            continue
        seen[module] = path
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        pending.extend(parents)
        pending.extend(_imported_modules(path, module))
    return sorted(str(path) for path in seen.values())
