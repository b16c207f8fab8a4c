"""What a converter plans before it writes anything: the items of a dataset (split, id, image,
label) and the lookup tables that map a source's label values onto train ids. Shared by the
converters of the known datasets (segrepro.data.convert) and of a user's folder
(segrepro.data.folder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segrepro.core.errors import SegreproError, one_line


def label_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """Lookup table source value -> class index (255 = ignore); -1 marks a value the source
    never holds (finding one is an error)."""
    table = np.full(size, -1, np.int16)
    for source, target in mapping.items():
        table[source] = target
    table.setflags(write=False)
    return table


@dataclass
class Item:
    """One image of a split; `read` returns its raw label (None: unlabelled split)."""
    split: str
    id: str
    image: Path
    read: Callable[[], np.ndarray] | None = None
    culprit: str = ""          # what a label error names


@dataclass
class Plan:
    class_names: tuple[str, ...]
    image_suffix: str
    table: np.ndarray
    values: str                # the source's valid values, for error messages
    conversion: str
    splits: list[str]
    items: list[Item]
    unlabelled: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    # Called with split -> counts of the written label values 0..255, before the card is made;
    # raises on labels that would lie (kind folder: segrepro.data.folder.check_label_shares).
    check: Callable[[dict[str, np.ndarray]], None] | None = None


def list_files(folder: Path, suffix: str, pattern: str = "*") -> dict[str, Path]:
    """id -> path of the files `folder/<pattern><suffix>`, id = name without the suffix."""
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(pattern + suffix)):
        if path.is_file():
            image_id = path.name[: -len(suffix)]
            if image_id in found:
                raise SegreproError(f"{path}: same id '{image_id}' as {found[image_id]}")
            found[image_id] = path
    return found


def read_list(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SegreproError(f"{path}: cannot read image list: {one_line(exc)}") from None
