"""Every real dataset through the pipeline's own steps (segrepro.data.prepare.prepare_dataset):
miniature archives in each dataset's real layout (tests/miniature.py), served from 127.0.0.1
(tests/loopback.py) -> download -> verify -> extract -> convert -> the reader. The declarations
are the project's own (params/datasets.yaml); the archive specs pin what the real ones pin
(sha256, else sha1/md5, else nothing: the lock file records it), computed on the miniatures."""

from __future__ import annotations

import copy
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from loopback import serve
from miniature import build

from segrepro.config.params import load_params
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import SegmentationDataset, load_card
from segrepro.data.prepare import prepare_dataset

PARAMS = load_params(REPO)
DOWNLOADED = ["ade20k", "cocostuff164k", "cocostuff10k", "pascal_context", "pascal_context60", "camvid"]


def pack(folder: Path, archive: str, prefix: str = "") -> bytes:
    """The bytes of `archive` as its host serves it: a zip or tar of `folder`'s content (under
    `prefix`), or the plain file itself (trainval_merged.json)."""
    if not archive.endswith((".zip", ".tar")):
        return (folder / archive).read_bytes()
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    buffer = io.BytesIO()
    if archive.endswith(".zip"):
        with zipfile.ZipFile(buffer, "w") as bundle:
            for path in files:
                bundle.write(path, f"{prefix}{path.relative_to(folder)}")
    else:
        with tarfile.open(fileobj=buffer, mode="w") as bundle:
            for path in files:
                bundle.add(path, f"{prefix}{path.relative_to(folder)}")
    return buffer.getvalue()


def miniature_archives(dataset: str, where: Path) -> tuple[dict, dict, dict[str, bytes]]:
    """(declaration, expected, archive name -> bytes) for a miniature of `dataset`."""
    declaration = copy.deepcopy(PARAMS.dataset(dataset))
    declaration.pop("manifest_sha256", None)  # pins the full CamVid folder, not a miniature
    options = {"classes": declaration["classes"]} if "classes" in declaration else {}
    parts, expected = build(declaration["kind"], where, **options)
    served = {}
    for role, part in declaration["parts"].items():
        prefix = f"{part['root']}/" if "root" in part else ""
        served[part["archive"]] = pack(parts[role], part["archive"], prefix)
    return declaration, expected, served


def specs_like_the_real_ones(served: dict[str, bytes], url) -> dict:
    """Archive specs pinning, for each miniature, what params/archives.yaml pins for the real one."""
    specs = {}
    for name, data in served.items():
        real = PARAMS.archive(name)
        spec = {"url": url(name)}
        if "size" in real:
            spec["size"] = len(data)
        for algorithm in ("sha256", "sha1", "md5"):
            if algorithm in real:
                spec[algorithm] = hashlib.new(algorithm, data).hexdigest()
        if "login" in real:
            spec["login"] = real["login"]
        specs[name] = spec
    return specs


def prepare(dataset, declaration, specs, base: Path) -> Path:
    return prepare_dataset(dataset, declaration, base / "data" / dataset, specs,
                           raw_dir=base / "raw", lock_path=base / "archives.lock.yaml")


def check_prepared(root: Path, expected: dict) -> None:
    card = load_card(root)
    assert card["num_classes"] == expected["num_classes"]
    assert card["ignore_index"] == 255
    assert {s: n for s, n in card["splits"].items()} == expected["splits"]
    unlabelled = set(card.get("unlabelled_splits", []))
    seen = {}
    for split in card["splits"]:
        if split in unlabelled:
            continue
        data = SegmentationDataset(root, split)
        assert data.num_classes == expected["num_classes"]
        for index, image_id in enumerate(data.ids):
            image, label = data.load_pair(index)
            assert image.shape[:2] == label.shape and image.shape[2] == 3
            values = set(np.unique(label)) - {255}
            assert all(0 <= v < expected["num_classes"] for v in values), (image_id, values)
            seen[image_id] = label
    for image_id, label in expected["labels"].items():
        np.testing.assert_array_equal(seen[image_id], label, err_msg=image_id)


# ----------------------------------------------------------------------------- the happy paths

@pytest.mark.parametrize("dataset", DOWNLOADED)
def test_download_verify_extract_convert_read(dataset, tmp_path):
    declaration, expected, served = miniature_archives(dataset, tmp_path / "source")
    with serve(served) as server:
        specs = specs_like_the_real_ones(served, server.url)
        root = prepare(dataset, declaration, specs, tmp_path)
    check_prepared(root, expected)
    assert load_card(root)["content_sha256"]
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(served)  # no .part, no extraction left
    for name, data in served.items():
        assert (raw / name).read_bytes() == data
    # Archives without a pinned sha256 had theirs recorded by the first download.
    unpinned = {name for name, spec in specs.items() if "sha256" not in spec}
    lock = yaml.safe_load((tmp_path / "archives.lock.yaml").read_text()) if unpinned else {}
    assert set(lock or {}) == unpinned
    for name in unpinned:
        assert lock[name]["sha256"] == hashlib.sha256(served[name]).hexdigest()


def test_cityscapes_from_user_placed_archives(tmp_path):
    """Behind a login: no download; the user's archives in data/raw/ are verified and converted."""
    declaration, expected, served = miniature_archives("cityscapes", tmp_path / "source")
    specs = specs_like_the_real_ones(served, lambda name: f"http://127.0.0.1:9/{name}")
    raw = tmp_path / "raw"
    with pytest.raises(SegreproError, match=r"login.*" + str(raw / "gtFine_trainvaltest.zip")) as info:
        prepare("cityscapes", declaration, specs, tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "data" / "cityscapes").exists()
    raw.mkdir(exist_ok=True)
    for name, data in served.items():
        (raw / name).write_bytes(data)
    root = prepare("cityscapes", declaration, specs, tmp_path)
    check_prepared(root, expected)
    assert load_card(root)["unlabelled_splits"] == ["test"]


def test_local_source_folder_is_read_not_changed(tmp_path):
    declaration, expected, _ = miniature_archives("camvid", tmp_path / "source")
    folder = tmp_path / "source" / "main"
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    root = prepare_dataset("camvid", declaration, tmp_path / "data" / "camvid", {}, source=folder)
    check_prepared(root, expected)
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before


# ----------------------------------------------------------------------------- failures leave nothing

def assert_nothing_left(base: Path, dataset: str, archive: str) -> None:
    assert not (base / "data" / dataset).exists()
    assert not (base / "raw" / archive).exists()
    assert not list((base / "raw").glob(".extract-*"))


def test_truncated_download_fails_with_nothing_extracted(tmp_path):
    declaration, _, served = miniature_archives("ade20k", tmp_path / "source")
    # Every response breaks off after 64 bytes: the first try and its 3 resumptions cannot finish it.
    assert len(served["ADEChallengeData2016.zip"]) > 4 * 64
    with serve(served, truncate={"ADEChallengeData2016.zip": 64}) as server:
        specs = specs_like_the_real_ones(served, server.url)
        with pytest.raises(SegreproError, match="ADEChallengeData2016.zip") as info:
            prepare("ade20k", declaration, specs, tmp_path)
    assert "\n" not in str(info.value)
    assert_nothing_left(tmp_path, "ade20k", "ADEChallengeData2016.zip")


def test_checksum_mismatch_fails_with_nothing_extracted(tmp_path):
    declaration, _, served = miniature_archives("ade20k", tmp_path / "source")
    with serve(served) as server:
        specs = specs_like_the_real_ones(served, server.url)
        specs["ADEChallengeData2016.zip"]["sha256"] = "0" * 64
        with pytest.raises(SegreproError, match="ADEChallengeData2016.zip.*sha256"):
            prepare("ade20k", declaration, specs, tmp_path)
    assert_nothing_left(tmp_path, "ade20k", "ADEChallengeData2016.zip")
    assert not list((tmp_path / "raw").glob("*.part"))


def test_a_changed_file_fails_against_the_lock(tmp_path):
    """cocostuff-10k has no published checksum: the first download pins it, a different file later fails."""
    declaration, _, served = miniature_archives("cocostuff10k", tmp_path / "source")
    with serve(served) as server:
        prepare("cocostuff10k", declaration, specs_like_the_real_ones(served, server.url), tmp_path)
    (tmp_path / "raw" / "cocostuff-10k-v1.1.zip").unlink()
    first = served["cocostuff-10k-v1.1.zip"]
    changed = {"cocostuff-10k-v1.1.zip": first[:-1] + bytes([first[-1] ^ 1])}  # same size, other bytes
    with serve(changed) as server:
        with pytest.raises(SegreproError, match="cocostuff-10k-v1.1.zip.*sha256"):
            prepare("cocostuff10k", declaration, specs_like_the_real_ones(changed, server.url), tmp_path)
    # The first preparation is untouched by the failed one.
    assert load_card(tmp_path / "data" / "cocostuff10k")["num_classes"] == 171


def _with_member(data: bytes, add) -> bytes:
    """A copy of a tar archive with one more member made by `add(tarfile)`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as source, tarfile.open(fileobj=buffer, mode="w") as bundle:
        for member in source.getmembers():
            bundle.addfile(member, source.extractfile(member) if member.isfile() else None)
        add(bundle)
    return buffer.getvalue()


def _dotdot(bundle):
    info = tarfile.TarInfo("VOCdevkit/../../evil.txt")
    info.size = 4
    bundle.addfile(info, io.BytesIO(b"evil"))


def _outside_link(bundle):
    info = tarfile.TarInfo("VOCdevkit/VOC2010/passwd")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bundle.addfile(info)


@pytest.mark.parametrize(("add", "member"), [(_dotdot, "VOCdevkit/../../evil.txt"),
                                             (_outside_link, "VOCdevkit/VOC2010/passwd")])
def test_unsafe_archive_members_are_refused(add, member, tmp_path):
    declaration, _, served = miniature_archives("pascal_context", tmp_path / "source")
    served["VOCtrainval_03-May-2010.tar"] = _with_member(served["VOCtrainval_03-May-2010.tar"], add)
    with serve(served) as server:
        with pytest.raises(SegreproError, match=f"refusing member '{member}'"):
            prepare("pascal_context", declaration, specs_like_the_real_ones(served, server.url), tmp_path)
    assert not (tmp_path / "data" / "pascal_context").exists()
    assert not list((tmp_path / "raw").glob(".extract-*"))
    assert not list(tmp_path.rglob("evil.txt"))
