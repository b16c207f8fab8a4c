"""`kind: folder`: any folder of images and label maps, declared in a few lines of YAML.

    membrane:
      kind: folder
      root: /path/to/membrane                    # or --config sources='{membrane: DIR}'
      images: {dir: train/image, suffix: .png}
      labels: {dir: train/label, suffix: .png}   # matched to images by file stem
      classes: [membrane, cell]
      values: {0: 0, 255: 1}                     # stored value -> class; unlisted values are errors
      splits: {fractions: {train: 0.8, val: 0.2}, seed: 0}

A stored label value becomes a class through exactly one of: `values` (value -> class index or
name), `colors` ("R,G,B" or "#rrggbb" -> class, for RGB-coded labels), `reduce_zero_label: true`
(mmseg's LoadAnnotations: 0 -> ignore, k -> k - 1), or, with none of them, the identity on
0..len(classes)-1. `ignore` lists stored values (or colours) meaning "don't care" (-> 255). Any
other stored value is an error naming the file and the value.

Labels: 8-bit grey, 1-bit, 16-bit grey, palette (its indices; with `colors`, its colours) or
RGB(A). Images: grey, palette or RGB(A), PNG or JPEG; their bytes are copied, never re-encoded.

Splits: `{fractions: {train: 0.8, val: 0.2}, seed: 0}` (the sorted stems permuted by
numpy.random.default_rng(seed); the splits, in sorted name order, take consecutive slices whose
sizes are the fractions' largest-remainder rounding); `{train: train.txt, val: val.txt}` (list
files under the root, one stem a line); or `{folders: {train: train, val: test}}` (each split's
images and labels under a folder of its own, substituted for `{split}` in `images.dir` and
`labels.dir`; ids become `<split>_<stem>`, so that equal stems of two splits do not collide).

Refused at preparation, because the scores they would give are not what they seem: a declared
class with no pixel in the training split; a split whose ignored pixels exceed `max_ignore_share`
(default 0.5) of its labelled pixels; a stored value the declaration does not map.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from segrepro.core.errors import SegreproError, one_line
from segrepro.data.items import Item, Plan, label_table, list_files, read_list
from segrepro.data.layout import IGNORE_INDEX

SPLIT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REQUIRED_SPLITS = ("train", "val")  # training reads train, evaluation and the training curve val
DEFAULT_MAX_IGNORE_SHARE = 0.5
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")


def _bad(where: str, key: str, why: str) -> SegreproError:
    return SegreproError(f"{where}: {key} {why}")


def _class_index(where: str, key: str, value, classes: list[str]) -> int:
    """A class given by index or by name -> its index."""
    if isinstance(value, str) and value in classes:
        return classes.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(classes):
        raise _bad(where, key, f"must be a class index 0..{len(classes) - 1} or a class name, got {value!r}")
    return value


def _stored_value(where: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _bad(where, key, f"must be a stored label value 0..65535, got {value!r}")
    return value


def parse_color(where: str, key: str, text) -> int:
    """"R,G,B", "R G B" or "#rrggbb" -> the 24-bit code (R << 16) | (G << 8) | B."""
    hex_match = _HEX.match(text) if isinstance(text, str) else None
    if hex_match:
        return int(hex_match.group(1), 16)
    parts = re.split(r"[,\s]+", text.strip()) if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise _bad(where, key, f"must be a colour 'R,G,B' (0..255 each) or '#rrggbb', got {text!r}")
    r, g, b = (int(p) for p in parts)
    return (r << 16) | (g << 8) | b


def _color_name(code: int) -> str:
    return f"{code >> 16},{(code >> 8) & 255},{code & 255}"


class LabelMapping:
    """Stored label (values or RGB colours) -> class indices with 255 = ignore, from a declaration."""

    def __init__(self, where: str, declaration: dict, classes: list[str]):
        ways = [key for key in ("values", "colors", "reduce_zero_label") if declaration.get(key)]
        if len(ways) > 1:
            raise _bad(where, " and ".join(ways), "are exclusive: give one way of mapping stored values to classes")
        self.rgb = ways == ["colors"]
        ignore = declaration.get("ignore") or []
        if not isinstance(ignore, list):
            raise _bad(where, "ignore", f"must be a list of stored values, got {ignore!r}")
        self.mapping: dict[int, int] = {}
        if self.rgb:
            for key, value in declaration["colors"].items():
                code = parse_color(where, f"colors key {key!r}", key)
                self.mapping[code] = _class_index(where, f"colors[{key!r}]", value, classes)
            ignored = [parse_color(where, "ignore", value) for value in ignore]
            self.describe = "colors " + ", ".join(f"{_color_name(c)} -> {v}" for c, v in self.mapping.items())
        else:
            if ways == ["values"]:
                for key, value in declaration["values"].items():
                    stored = _stored_value(where, f"values key {key!r}", _int_key(key))
                    self.mapping[stored] = _class_index(where, f"values[{key!r}]", value, classes)
                self.describe = "values " + ", ".join(f"{k} -> {v}" for k, v in self.mapping.items())
            elif ways == ["reduce_zero_label"]:
                # mmseg LoadAnnotations(reduce_zero_label=True): 0 -> 255, k -> k - 1.
                self.mapping = {0: IGNORE_INDEX, **{k + 1: k for k in range(len(classes))}}
                self.describe = f"reduce_zero_label: 0 -> ignore, 1..{len(classes)} -> 0..{len(classes) - 1}"
            else:
                self.mapping = {k: k for k in range(len(classes))}
                self.describe = f"identity: 0..{len(classes) - 1} are the classes"
            ignored = [_stored_value(where, "ignore", value) for value in ignore]
        for stored in ignored:
            if stored in self.mapping and self.mapping[stored] != IGNORE_INDEX:
                shown = _color_name(stored) if self.rgb else stored
                raise _bad(where, "ignore", f"lists {shown}, which is also mapped to class {self.mapping[stored]}")
            self.mapping[stored] = IGNORE_INDEX
        if ignored:
            self.describe += "; ignored: " + ", ".join(_color_name(c) if self.rgb else str(c) for c in ignored)
        self.known = ", ".join(_color_name(c) if self.rgb else str(c) for c in sorted(self.mapping))
        if not self.rgb:
            self.table = label_table(self.mapping, max(self.mapping) + 1)

    def convert(self, path: Path) -> np.ndarray:
        """Read the label file and map it; an unmapped stored value is an error naming both."""
        stored = read_stored_label(path, self.rgb)
        if self.rgb:
            codes, inverse = np.unique(stored, return_inverse=True)
            targets = np.array([self.mapping.get(int(c), -1) for c in codes], np.int16)
            bad = codes[targets < 0]
            if bad.size:
                raise SegreproError(f"{path}: stored colour {_color_name(int(bad[0]))} is not mapped by the "
                                    f"declaration (colors or ignore: {self.known})")
            return targets[inverse.reshape(stored.shape)].astype(np.uint8)
        present = np.flatnonzero(np.bincount(stored.ravel(), minlength=self.table.size))
        bad = present[(present >= self.table.size) | (self.table[np.minimum(present, self.table.size - 1)] < 0)]
        if bad.size:
            raise SegreproError(f"{path}: stored value {int(bad[0])} is not mapped by the declaration "
                                f"(values, reduce_zero_label or ignore: {self.known})")
        return self.table[stored].astype(np.uint8)


def _int_key(key):
    """YAML reads `{0: 0}` keys as ints and `{"0": 0}` as strings; both mean the value 0."""
    return int(key) if isinstance(key, str) and key.strip().isdigit() else key


def read_stored_label(path: Path, rgb: bool) -> np.ndarray:
    """The stored values of a label file: HxW integers (grey 8/16-bit, 1-bit as 0/255, palette
    indices), or with `rgb` HxW 24-bit colour codes (RGB(A), or a palette's colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if rgb:
                if mode not in ("RGB", "RGBA", "P"):
                    raise SegreproError(f"{path}: label has mode {mode}, but the declaration maps colours "
                                        "(colors: needs RGB or palette labels)")
                rgb_array = np.asarray(im.convert("RGB")).astype(np.int64)
                return (rgb_array[..., 0] << 16) | (rgb_array[..., 1] << 8) | rgb_array[..., 2]
            if mode == "1":
                return np.asarray(im.convert("L")).astype(np.int64)
            if mode in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                return np.asarray(im).astype(np.int64)
            if mode in ("LA", "PA"):
                return np.asarray(im.getchannel(0)).astype(np.int64)
    except SegreproError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise SegreproError(f"{path}: cannot read label: {one_line(exc)}") from None
    raise SegreproError(f"{path}: label has mode {mode}: a grey, 16-bit or palette label needs `values` "
                        "(or none), an RGB-coded one `colors`")


def _check_image_mode(path: Path) -> None:
    try:
        with Image.open(path) as im:
            mode = im.mode
    except Exception as exc:  # noqa: BLE001
        raise SegreproError(f"{path}: cannot read image: {one_line(exc)}") from None
    if mode not in IMAGE_MODES:
        raise SegreproError(f"{path}: image mode {mode} is not supported (grey, palette or RGB images; "
                            "convert 16-bit or CMYK images to 8-bit first)")


def _dir_spec(where: str, declaration: dict, key: str) -> tuple[str, str]:
    spec = declaration.get(key)
    if not isinstance(spec, dict) or not isinstance(spec.get("dir"), str) or not isinstance(spec.get("suffix"), str):
        raise _bad(where, key, "must be {dir: FOLDER, suffix: .png} (a folder under the root and the files' ending)")
    if not spec["suffix"]:
        raise _bad(where, f"{key}.suffix", "must not be empty")
    return spec["dir"], spec["suffix"]


def _inside(root: Path, relative: str, where: str, key: str) -> Path:
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise _bad(where, key, f"must be a path inside the root, got {relative!r}")
    return root / relative


def _pairs(where: str, root: Path, image_dir: str, image_suffix: str, label_dir: str,
           label_suffix: str) -> tuple[dict[str, Path], dict[str, Path]]:
    images_at = _inside(root, image_dir, where, "images.dir")
    labels_at = _inside(root, label_dir, where, "labels.dir")
    for folder, key in ((images_at, "images.dir"), (labels_at, "labels.dir")):
        if not folder.is_dir():
            raise SegreproError(f"{folder}: folder not found ({where}: {key})")
    images = list_files(images_at, image_suffix)
    labels = list_files(labels_at, label_suffix)
    if not images:
        raise SegreproError(f"{images_at}: no '*{image_suffix}' image ({where}: images)")
    for stem in sorted(images.keys() - labels.keys()):
        raise SegreproError(f"{images[stem]}: image without a label ({labels_at / (stem + label_suffix)} not found)")
    for stem in sorted(labels.keys() - images.keys()):
        raise SegreproError(f"{labels[stem]}: label without an image ({images_at / (stem + image_suffix)} not found)")
    return images, labels


def fraction_split(stems: list[str], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """The fractions draw of the module docstring: split name -> sorted stems."""
    names = sorted(fractions)
    exact = [fractions[name] * len(stems) for name in names]
    sizes = [int(np.floor(x)) for x in exact]
    # Largest remainder; ties go to the earlier name, so the result is deterministic.
    for i in sorted(range(len(names)), key=lambda i: (-(exact[i] - sizes[i]), i))[: len(stems) - sum(sizes)]:
        sizes[i] += 1
    order = np.random.default_rng(seed).permutation(len(stems))
    pool, splits, start = sorted(stems), {}, 0
    for name, size in zip(names, sizes):
        splits[name] = sorted(pool[i] for i in order[start:start + size])
        start += size
    return splits


def _splits(where: str, root: Path, spec) -> tuple[str, dict]:
    """(form, settings) of the `splits` declaration: fractions, lists or folders."""
    if not isinstance(spec, dict) or not spec:
        raise _bad(where, "splits", "must be {fractions: {...}, seed: N}, {SPLIT: LIST_FILE, ...} or {folders: {...}}")
    if "fractions" in spec:
        fractions, seed = spec.get("fractions"), spec.get("seed", 0)
        if set(spec) - {"fractions", "seed"}:
            raise _bad(where, "splits",
                       f"with fractions takes only 'seed' besides, got {sorted(set(spec) - {'fractions', 'seed'})}")
        if not isinstance(fractions, dict) or not fractions or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in fractions.values()):
            raise _bad(where, "splits.fractions", "must map split names to fractions in (0, 1]")
        if abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise _bad(where, "splits.fractions", f"must sum to 1, got {sum(fractions.values()):g}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise _bad(where, "splits.seed", f"must be an integer >= 0, got {seed!r}")
        names, form, settings = list(fractions), "fractions", {"fractions": fractions, "seed": seed}
    elif "folders" in spec:
        folders = spec["folders"]
        if set(spec) != {"folders"}:
            raise _bad(where, "splits", "with folders takes nothing else")
        if isinstance(folders, list):
            folders = {name: name for name in folders}
        if not isinstance(folders, dict) or not folders or not all(isinstance(v, str) and v for v in folders.values()):
            raise _bad(where, "splits.folders", "must list split names or map each to its folder name")
        names, form, settings = list(folders), "folders", folders
    else:
        if not all(isinstance(v, str) and v for v in spec.values()):
            raise _bad(where, "splits", "must map each split name to a list file (one stem a line)")
        names, form = list(spec), "lists"
        settings = {name: _inside(root, f, where, f"splits.{name}") for name, f in spec.items()}
    for name in names:
        if not isinstance(name, str) or not SPLIT_NAME.match(name):
            raise _bad(where, "splits", f"has split name {name!r}, not a simple identifier")
    missing = [name for name in REQUIRED_SPLITS if name not in names]
    if missing:
        raise _bad(where, "splits", f"has no '{missing[0]}' split (training reads 'train', evaluation 'val' "
                   "unless a table names another)")
    return form, settings


def plan_folder(where: str, declaration: dict, parts: dict[str, Path]) -> Plan:
    """The conversion plan of a folder dataset whose root is parts['main']."""
    root = parts["main"]
    classes = declaration.get("classes")
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes) or len(classes) > IGNORE_INDEX):
        raise _bad(where, "classes",
                   f"must be a list of distinct class names (at most {IGNORE_INDEX}), got {classes!r}")
    mapping = LabelMapping(where, declaration, classes)
    image_dir, image_suffix = _dir_spec(where, declaration, "images")
    label_dir, label_suffix = _dir_spec(where, declaration, "labels")
    form, settings = _splits(where, root, declaration.get("splits"))
    placeholder = "{split}" in image_dir or "{split}" in label_dir
    if (form == "folders") != placeholder:
        raise _bad(where, "images.dir and labels.dir", "must hold '{split}' exactly when splits are folders "
                   "(splits: {folders: ...})")

    chosen: dict[str, list[tuple[str, Path, Path]]] = {}
    if form == "folders":
        for split, folder in settings.items():
            images, labels = _pairs(where, root, image_dir.replace("{split}", folder), image_suffix,
                                    label_dir.replace("{split}", folder), label_suffix)
            chosen[split] = [(f"{split}_{stem}", images[stem], labels[stem]) for stem in sorted(images)]
    else:
        images, labels = _pairs(where, root, image_dir, image_suffix, label_dir, label_suffix)
        if form == "fractions":
            drawn = fraction_split(list(images), settings["fractions"], settings["seed"])
            for split, stems in drawn.items():
                if not stems:
                    raise _bad(where, f"splits.fractions.{split}", f"gives no image of {len(images)}")
        else:
            drawn, seen = {}, {}
            for split, listing in settings.items():
                drawn[split] = read_list(listing)
                if not drawn[split]:
                    raise SegreproError(f"{listing}: split list names no image")
                for stem in drawn[split]:
                    if stem not in images:
                        raise SegreproError(f"{listing}: stem {stem!r} has no image "
                                            f"({root / image_dir / (stem + image_suffix)} not found)")
                    if stem in seen:
                        raise SegreproError(f"{listing}: stem {stem!r} is also in split '{seen[stem]}'")
                    seen[stem] = split
        chosen = {split: [(stem, images[stem], labels[stem]) for stem in stems] for split, stems in drawn.items()}

    items = []
    for split, entries in chosen.items():
        for image_id, image, label in entries:
            _check_image_mode(image)
            items.append(Item(split, image_id, image, lambda label=label: mapping.convert(label), str(label)))
    max_share = declaration.get("max_ignore_share", DEFAULT_MAX_IGNORE_SHARE)
    source = {"root": str(root), "splits": _describe_splits(form, settings),
              "max_ignore_share": max_share}
    identity = {**{k: k for k in range(len(classes))}, IGNORE_INDEX: IGNORE_INDEX}
    return Plan(tuple(classes), image_suffix, label_table(identity),
                 f"class indices 0..{len(classes) - 1} or {IGNORE_INDEX}", mapping.describe, list(chosen), items,
                 source=source, check=lambda pixels: check_label_shares(where, classes, pixels, max_share))


def _describe_splits(form: str, settings: dict) -> str:
    if form == "fractions":
        parts = ", ".join(f"{k} {v:g}" for k, v in settings["fractions"].items())
        return f"fractions {parts} of the sorted stems, numpy.random.default_rng({settings['seed']}).permutation"
    if form == "folders":
        return "a folder per split: " + ", ".join(f"{k} <- {v}" for k, v in settings.items())
    return "list files: " + ", ".join(f"{k} <- {Path(v).name}" for k, v in settings.items())


def check_label_shares(where: str, classes: list[str], pixels: dict[str, np.ndarray], max_share: float) -> None:
    """The refusals of labels that would lie (module docstring); `pixels[split]` counts the
    converted label values 0..255 of the split."""
    train = pixels["train"]
    for index, name in enumerate(classes):
        if train[index] == 0:
            raise SegreproError(
                f"{where}: class '{name}' ({index}) has no pixel in split 'train': nothing could learn it and "
                "its score would be meaningless (check `values`/`colors`, or drop the class)")
    for split, counts in pixels.items():
        total = int(counts.sum())
        ignored = int(counts[IGNORE_INDEX])
        if total and ignored / total > max_share:
            raise SegreproError(
                f"{where}: split '{split}': ignore covers {100 * ignored / total:.1f} % of the labelled pixels, "
                f"more than max_ignore_share {max_share:g} (are class values mapped to ignore? declare "
                "max_ignore_share if the data really is so)")
