"""The test servers' submission formats: what each benchmark's server takes for one image (pixel
values, file name), and where to upload. The keys of SERVERS are the `format`s a table's
`test_server` row may name (segrepro.config.table_specs checks them); segrepro.engine.submit writes
the zips."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segrepro.core.errors import SegreproError
from segrepro.data import cityscapes

# Cityscapes file names: {city}_{seq:0>6}_{frame:0>6}_... (cityscapesScripts README, "Dataset Structure").
CITYSCAPES_FRAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})(?:_|$)")


@dataclass(frozen=True)
class Server:
    """One benchmark's submission format."""

    benchmark: str
    url: str
    values: str                                  # what a pixel value means, for the README
    encode: Callable[[np.ndarray, int], np.ndarray]    # (class indices HxW uint8, num_classes) -> PNG values
    file_name: Callable[[str, bool], str]        # (image id, stand-in) -> the PNG's name in the zip


def _ade20k_encode(pred: np.ndarray, num_classes: int) -> np.ndarray:
    # CSAILVision/sceneparsing README: masks hold 0..150, 0 = "other objects" (not evaluated); a
    # prediction has the annotation's format, so class k (0-based, reduce_zero_label) is k + 1
    # (as mmseg's ADE20KDataset.results2img writes it for the server).
    if num_classes > 254:
        raise SegreproError(f"the ADE20K format stores class + 1 in 8 bits: {num_classes} classes do not fit")
    return (pred + 1).astype(np.uint8)


def _ade20k_name(image_id: str, stand_in: bool) -> str:
    # The README: the mask of ADE_test_00000001.jpg is ADE_test_00000001.png.
    return f"{image_id}.png"


def _cityscapes_encode(pred: np.ndarray, num_classes: int) -> np.ndarray:
    # evalPixelLevelSemanticLabeling.py: "pixels encode the class IDs as defined in labels.py ... the
    # regular ID is used, not the train ID".
    table = cityscapes.train_to_label()
    if num_classes > len(table):
        raise SegreproError(f"the Cityscapes format maps {len(table)} train ids to label ids;"
                            f" the model has {num_classes} classes")
    return table[pred]


def _cityscapes_name(image_id: str, stand_in: bool) -> str:
    # evalPixelLevelSemanticLabeling.getPrediction: the prediction of <city>_<seq>_<frame> is the one
    # file anywhere in the upload matching "<city>_<seq>_<frame>*.png".
    match = CITYSCAPES_FRAME.match(image_id)
    if match:
        return f"{match.group(1)}_{match.group(2)}_{match.group(3)}.png"
    if stand_in:
        return f"{image_id}.png"  # a stand-in split (synthetic val) has no Cityscapes names
    raise SegreproError(f"image id {image_id!r} does not start with <city>_<seq>_<frame> (e.g. berlin_000000_000019)")


SERVERS = {
    "ade20k_sceneparsing": Server(
        benchmark="MIT Scene Parsing Benchmark (ADE20K test)",
        url="http://sceneparsing.csail.mit.edu/",
        values="class index + 1 (ADE20K's 150 classes: 1..150); 0 ('other objects') is never predicted",
        encode=_ade20k_encode,
        file_name=_ade20k_name,
    ),
    "cityscapes": Server(
        benchmark="Cityscapes pixel-level semantic labeling (test)",
        url="https://www.cityscapes-dataset.com/submit/",
        values="Cityscapes labelIds (labels.py 'id', not the trainId the model predicts)",
        encode=_cityscapes_encode,
        file_name=_cityscapes_name,
    ),
}


def server(name: str) -> Server:
    if name not in SERVERS:
        raise SegreproError(f"unknown test-server format '{name}' (known: {', '.join(SERVERS)})")
    return SERVERS[name]
