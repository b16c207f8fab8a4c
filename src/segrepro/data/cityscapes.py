"""Cityscapes' label ids (cityscapesScripts cityscapesscripts/helpers/labels.py): the converter maps
the annotations' labelIds to the 19 trainIds the models predict (segrepro.data.convert), a test
submission maps them back (segrepro.data.test_servers)."""

from __future__ import annotations

import numpy as np

from segrepro.core.errors import SegreproError

# labelId -> trainId of the 19 evaluated classes; every other id in 0..33 has trainId 255 (ignore);
# license plate (-1) is never drawn.
LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_IDS = 34  # labelIds 0..33
# mmseg mmseg/datasets/cityscapes.py CityscapesDataset, in trainId order.
CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)


def train_to_label() -> np.ndarray:
    """Lookup table trainId -> labelId (uint8, 19 entries), the inverse of LABEL_TO_TRAIN."""
    trains = sorted(LABEL_TO_TRAIN.values())
    if trains != list(range(len(trains))):
        raise SegreproError(f"segrepro.data.cityscapes.LABEL_TO_TRAIN: train ids {trains} are not 0..N-1, once each")
    table = np.zeros(len(trains), np.uint8)
    for label, train in LABEL_TO_TRAIN.items():
        table[train] = label
    return table
