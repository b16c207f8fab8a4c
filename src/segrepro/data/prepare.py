"""Bring a dataset declared in params/datasets.yaml into the uniform layout under data/.

The card of a prepared dataset records a fingerprint of its files (`content_sha256`), so the
card, the one file the workflow's training rules depend on, changes whenever the data does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from segrepro import atomic
from segrepro.errors import SegreproError


def content_fingerprint(root: Path) -> str:
    """sha256 over the split lists, images and labels (names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for folder in ("splits", "images", "labels"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_dataset(name: str, declaration: dict, root: Path) -> Path:
    kind = declaration["kind"]
    root = Path(root)
    if kind == "synthetic":
        from segrepro.data.synthetic import generate_dataset

        generate_dataset(root, name, **declaration["generator"])
    else:
        raise SegreproError(
            f"dataset '{name}' (kind '{kind}') has no preparation step here: place it under {root} "
            "in the uniform layout (images/, labels/, splits/, dataset.yaml)"
        )
    card_path = root / "dataset.yaml"
    card = yaml.safe_load(card_path.read_text())
    card["content_sha256"] = content_fingerprint(root)
    atomic.write_text(card_path, yaml.safe_dump(card, sort_keys=False))
    return root
