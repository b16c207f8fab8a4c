"""The entries of the uniform dataset layout (segrepro.data.dataset reads it), and the check every
preparation makes before it replaces a folder. Torch-free, and apart from the synthetic generator:
preparing a real dataset must not depend on the generator's code."""

from __future__ import annotations

import os
from pathlib import Path

from segrepro.core.errors import SegreproError
from segrepro.core.paths import CARD

LAYOUT_ENTRIES = {CARD, "images", "labels", "splits"}
# The label value every prepared dataset writes for "not evaluated" (the card's ignore_index).
IGNORE_INDEX = 255


def check_replaceable(root: Path) -> None:
    """Only a dataset folder (complete or not) may be replaced; anything else is left alone."""
    if not root.exists():
        return
    if not root.is_dir():
        raise SegreproError(f"{root}: exists and is not a directory; refusing to replace it")
    foreign = sorted(set(os.listdir(root)) - LAYOUT_ENTRIES)
    if foreign:
        raise SegreproError(
            f"{root}: not a dataset folder (contains {foreign[0]!r}); refusing to replace it")
