"""Every test image's true positives, false positives and false negatives per class, stored beside
a metrics file by the evaluation (segrepro.engine.evaluate) and read back by the tables' bootstrap
(segrepro.reporting.bootstrap): mIoU, pixel accuracy and the Scene-Parsing score of any resample
of the images follow from the summed counts. Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segrepro.core import atomic
from segrepro.core.errors import SegreproError

COUNT_KEYS = ("tp", "fp", "fn")


def per_image_path(metrics_path) -> Path:
    """The per-image counts beside a metrics file: ss.json -> ss.per_image.npz."""
    return Path(metrics_path).with_suffix(".per_image.npz")


def _compact(values: np.ndarray) -> np.ndarray:
    """The smallest unsigned integer type that holds the counts (most are 0: compressed well)."""
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def write_per_image(path, counts: dict[str, np.ndarray], image_ids: list[str]) -> None:
    """Store (images, classes) tp/fp/fn counts and the image ids, compressed (ADE20K's 2,000
    val images x 150 classes: well under a few MB)."""
    rows = {key: np.asarray(counts[key]) for key in COUNT_KEYS}
    if any(rows[key].shape != (len(image_ids), rows["tp"].shape[1]) for key in COUNT_KEYS):
        raise SegreproError(f"{path}: per-image counts do not match {len(image_ids)} images")

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, image_ids=np.asarray(image_ids, dtype=str),
                                **{key: _compact(value) for key, value in rows.items()})

    atomic.write_with(Path(path), save)


def load_per_image(path) -> dict | None:
    """{"image_ids", "tp", "fp", "fn"} of a metrics file's per-image counts; None where there are
    none (a metrics file written before they were stored)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            loaded = {key: data[key] for key in ("image_ids", *COUNT_KEYS)}
    except (OSError, ValueError, KeyError) as err:
        raise SegreproError(
            f"{path}: unreadable per-image counts ({err}); delete it and rerun the evaluation") from None
    loaded["image_ids"] = [str(i) for i in loaded["image_ids"]]
    return loaded
