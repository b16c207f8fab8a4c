"""Bring a dataset declared in params/datasets.yaml into the uniform layout under data/."""

from __future__ import annotations

from pathlib import Path

from segrepro.errors import SegreproError


def prepare_dataset(name: str, declaration: dict, root: Path) -> Path:
    kind = declaration["kind"]
    if kind == "synthetic":
        from segrepro.data.synthetic import generate_dataset

        return generate_dataset(Path(root), name, **declaration["generator"])
    raise SegreproError(
        f"dataset '{name}' (kind '{kind}') has no preparation step here: place it under {root} "
        "in the uniform layout (images/, labels/, splits/, dataset.yaml)"
    )
