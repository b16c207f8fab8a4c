"""Safe extraction: round trips, refused members (nothing written), damaged archives, plain files."""

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from segrepro.core.errors import SegreproError
from segrepro.data.extract import safe_extract

TREE = {"root/a.txt": b"alpha", "root/sub/b.bin": bytes(range(256)) * 10, "root/sub/deeper/c.txt": b"c"}


def files_under(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file() and not path.is_symlink()}


def make_zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def tar_member(name: str, data: bytes = b"", **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def regular(tree: dict[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [tar_member(name, data) for name, data in tree.items()]


def refused(archive: Path, member: str) -> str:
    dest = archive.parent / "out"
    with pytest.raises(SegreproError) as caught:
        safe_extract(archive, dest)
    message = str(caught.value)
    assert message.startswith(f"{archive}: refusing member '{member}': "), message
    assert "\n" not in message
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]  # no dest, no temp folder
    return message


def test_zip_round_trip(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"root/": b"", **TREE})
    assert safe_extract(archive, tmp_path / "out") == tmp_path / "out"
    assert files_under(tmp_path / "out") == TREE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "out"]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_round_trip(tmp_path, mode):
    archive = make_tar(tmp_path / "a.tar.x", [tar_member("root", type=tarfile.DIRTYPE, mode=0o755),
                                              *regular(TREE)], mode)
    safe_extract(archive, tmp_path / "out")
    assert files_under(tmp_path / "out") == TREE


def test_links_inside_are_kept(tmp_path):
    archive = make_tar(tmp_path / "a.tgz", [
        *regular(TREE),
        tar_member("root/link", type=tarfile.SYMTYPE, linkname="sub/b.bin"),
        tar_member("root/sub/up", type=tarfile.SYMTYPE, linkname="../a.txt"),
        tar_member("root/hard", type=tarfile.LNKTYPE, linkname="root/a.txt"),
    ])
    out = safe_extract(archive, tmp_path / "out")
    assert os.readlink(out / "root/link") == "sub/b.bin" and (out / "root/link").read_bytes() == TREE["root/sub/b.bin"]
    assert (out / "root/sub/up").read_bytes() == b"alpha"
    assert (out / "root/hard").read_bytes() == b"alpha" and not (out / "root/hard").is_symlink()

    archive = make_zip(tmp_path / "a.zip", TREE, links={"root/link": "sub/deeper/c.txt"})
    out = safe_extract(archive, tmp_path / "zip-out")
    assert os.readlink(out / "root/link") == "sub/deeper/c.txt" and (out / "root/link").read_bytes() == b"c"


def test_permissions_are_plain(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [tar_member("run.sh", b"#!/bin/sh\n", mode=0o6777),
                                            tar_member("ro.txt", b"x", mode=0o400)], "w")
    out = safe_extract(archive, tmp_path / "out")
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "ro.txt").stat().st_mode) == 0o600


@pytest.mark.parametrize("member, reason", [
    ("../evil.txt", "'..'"), ("root/../../evil.txt", "'..'"), ("/etc/evil", "absolute"),
    ("C:\\evil.txt", "absolute"), ("\\evil.txt", "absolute"), ("root\\..\\..\\evil.txt", "'..'"),
])
def test_zip_bad_names_refused(tmp_path, member, reason):
    archive = make_zip(tmp_path / "a.zip", {**TREE, member: b"evil"})  # good members first
    assert reason in refused(archive, member)


@pytest.mark.parametrize("member, reason", [("../evil.txt", "'..'"), ("/etc/evil", "absolute")])
def test_tar_bad_names_refused(tmp_path, member, reason):
    archive = make_tar(tmp_path / "a.tar.gz", [*regular(TREE), tar_member(member, b"evil")])
    assert reason in refused(archive, member)


@pytest.mark.parametrize("target, reason", [
    ("/etc", "absolute"), ("/etc/passwd", "absolute"), ("../../outside", "outside"),
    ("../../root/x", "outside"), ("sub/../../..", "outside"),
])
def test_tar_symlink_outside_refused(tmp_path, target, reason):
    # Relative to the link's folder root/: one `..` is the destination, two leave it.
    archive = make_tar(tmp_path / "a.tar.gz", [*regular(TREE),
                                               tar_member("root/link", type=tarfile.SYMTYPE, linkname=target)])
    message = refused(archive, "root/link")
    assert reason in message and target in message


def test_tar_hardlink_outside_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar", [*regular(TREE),
                                            tar_member("root/h", type=tarfile.LNKTYPE, linkname="../x")], "w")
    assert "outside" in refused(archive, "root/h")


def test_symlink_chains_are_followed(tmp_path):
    # root/up -> .. stays inside (it is the destination); root/up/.. is its parent: outside.
    archive = make_tar(tmp_path / "a.tar", [*regular(TREE),
                                            tar_member("root/up", type=tarfile.SYMTYPE, linkname=".."),
                                            tar_member("esc", type=tarfile.SYMTYPE, linkname="root/up/..")], "w")
    assert "outside" in refused(archive, "esc")
    # A member written through a link that leads outside is named, even before the link itself.
    archive = make_tar(tmp_path / "a.tar", [tar_member("d/x", b"evil"),
                                            tar_member("d", type=tarfile.SYMTYPE, linkname="root/up"),
                                            tar_member("root/up", type=tarfile.SYMTYPE, linkname="../..")], "w")
    assert "through a symlink" in refused(archive, "d/x")


def test_zip_symlink_outside_refused(tmp_path):
    archive = make_zip(tmp_path / "a.zip", TREE, links={"root/link": "../../outside"})
    assert "outside" in refused(archive, "root/link")
    archive = make_zip(tmp_path / "a.zip", TREE, links={"root/link": "/etc/passwd"})
    assert "absolute" in refused(archive, "root/link")


@pytest.mark.parametrize("kind, reason", [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"),
                                          (tarfile.FIFOTYPE, "FIFO")])
def test_tar_device_and_fifo_refused(tmp_path, kind, reason):
    archive = make_tar(tmp_path / "a.tar.gz", [*regular(TREE), tar_member("root/dev", type=kind)])
    assert reason in refused(archive, "root/dev")


def test_zip_device_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("fifo")
        info.create_system = 3
        info.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(info, b"")
    assert "FIFO" in refused(archive, "fifo")


def damaged(archive: Path) -> str:
    with pytest.raises(SegreproError) as caught:
        safe_extract(archive, archive.parent / "out")
    message = str(caught.value)
    assert message.startswith(f"{archive}: ") and "\n" not in message
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]
    return message


def test_truncated_tar_gz(tmp_path):
    big = {f"root/{i}.bin": os.urandom(20_000) for i in range(5)}
    archive = make_tar(tmp_path / "a.tar.gz", regular(big))
    archive.write_bytes(archive.read_bytes()[:60_000])
    assert "truncated" in damaged(archive)
    archive.write_bytes(archive.read_bytes()[:200])  # not even the first header is readable
    damaged(archive)


def test_corrupt_zip(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.bin": b"a" * 10_000, "b.bin": os.urandom(10_000)})
    data = bytearray(archive.read_bytes())
    info = zipfile.ZipFile(archive).getinfo("b.bin")
    data[info.header_offset + 100] ^= 0xFF  # inside b.bin's stored bytes: a CRC error on reading
    archive.write_bytes(bytes(data))
    damaged(archive)
    archive.write_bytes(bytes(data[:5000]))  # truncated: the central directory is gone
    assert "damaged" in damaged(archive)


def test_plain_file_copied(tmp_path):
    source = tmp_path / "trainval_merged.json"
    source.write_text('{"images": []}')
    out = safe_extract(source, tmp_path / "out")
    assert files_under(out) == {"trainval_merged.json": b'{"images": []}'}


def test_dest_must_not_exist(tmp_path):
    archive = make_zip(tmp_path / "a.zip", TREE)
    (tmp_path / "out").mkdir()
    with pytest.raises(SegreproError, match="already exists"):
        safe_extract(archive, tmp_path / "out")


def test_tarfile_data_filter_is_a_second_line(tmp_path, monkeypatch):
    if not hasattr(tarfile, "data_filter"):
        pytest.skip("tarfile without extraction filters (Python < 3.11.4)")
    from segrepro.data import extract

    monkeypatch.setattr(extract, "_check_all", lambda archive, members: None)  # as if the check missed it
    archive = make_tar(tmp_path / "a.tar", [*regular(TREE), tar_member("root/link", type=tarfile.SYMTYPE,
                                                                       linkname="/etc/passwd")], "w")
    assert "data filter" in refused(archive, "root/link")
