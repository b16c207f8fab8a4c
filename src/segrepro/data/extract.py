"""Extract a downloaded archive into a new folder, refusing any member that could write outside it.

Every member is checked before anything is written: no absolute names (also `C:…` and `\\…`
forms), no `..` component (split at `/` and `\\`), no device files, FIFOs or other special
members, and no link, or path through a link, that resolves outside the destination. Links are
followed the way the file system will follow them once the archive's own symlinks exist: a
symlink's target is relative to the symlink's folder; a tar hard link names an archive member,
so its target is relative to the archive root (tarfile.TarFile.makelink). Zip symlinks are the
members whose Unix mode (the high 16 bits of `external_attr`) is S_IFLNK; their data is the target.

tarfile's "data" extraction filter (PEP 706, Python >= 3.11.4) runs as a second line of defence.
Permissions: regular bits only (setuid, setgid, sticky and group/other write dropped), owner
read/write always; ownership is never restored.
"""

from __future__ import annotations

import copy
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from segrepro.core import atomic
from segrepro.core.errors import SegreproError, one_line

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_LINK_DEPTH = 40  # as Linux's MAXSYMLINKS
# Leading bytes of the formats handled here: a file starting like one of them but not readable
# as such is a damaged archive, not a plain file to copy.
_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# Errors of damaged archives. OSError is one only without an errno (bz2's "Invalid data stream",
# gzip.BadGzipFile); with one it is the file system's (e.g. a full disk) and passes through.
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile, NotImplementedError)


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract `archive` (zip, tar, tar.gz/tgz, tar.bz2, tar.xz; recognised by content) into the
    new folder `dest`, or copy a file that is no archive into it; return `dest`. Raises a one-line
    SegreproError, leaving nothing at `dest`, for a refused member or a damaged archive."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise SegreproError(f"{archive}: no such file")
    if dest.exists() or dest.is_symlink():
        raise SegreproError(f"{dest}: already exists; extracting {archive} needs a new folder")
    with atomic.build_directory(dest) as tmp:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            elif tarfile.is_tarfile(archive):
                _extract_tar(archive, tmp)
            elif _looks_like_archive(archive):
                raise SegreproError(f"{archive}: damaged archive (its first bytes say zip or compressed, "
                                    f"but it cannot be read as a zip or tar archive)")
            else:
                shutil.copyfile(archive, tmp / archive.name)
        except _CORRUPT + (OSError,) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise SegreproError(f"{archive}: damaged or truncated archive "
                                f"({type(exc).__name__}: {one_line(str(exc))})") from None
    return dest


def _looks_like_archive(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(512)
    return head.startswith(_MAGIC) or head[257:262] == b"ustar"


# ----------------------------------------------------------------------------- checks


def _refuse(archive: Path, member: str, reason: str) -> SegreproError:
    return SegreproError(f"{archive}: refusing member '{one_line(member)}': {reason}")


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(_DRIVE.match(name))


def _name_problem(name: str) -> str | None:
    if _is_absolute(name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in its path"
    return None


def _parts(name: str) -> list[str]:
    return [part for part in name.split("/") if part not in ("", ".")]


def _resolve(parts: list[str], links: dict[str, str], depth: int = 0) -> list[str] | None:
    """Where the path `parts` (relative to the destination) lands once the archive's symlinks
    (`links`: normalised member name -> target) exist; None if it leaves the destination or loops."""
    out: list[str] = []
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(part)
        target = links.get("/".join(out))
        if target is not None:
            if depth >= _MAX_LINK_DEPTH or _is_absolute(target):
                return None
            out = _resolve(out[:-1] + target.split("/"), links, depth + 1)
            if out is None:
                return None
    return out


def _check_all(archive: Path, members: list[tuple[str, str, str | None]]) -> None:
    """members: (name, kind, link target) with kind one of file, dir, symlink, hardlink or a
    refusal reason. Raises for the first member that may not be extracted."""
    for name, kind, _ in members:
        if problem := _name_problem(name):
            raise _refuse(archive, name, problem)
        if kind not in ("file", "dir", "symlink", "hardlink"):
            raise _refuse(archive, name, kind)
        if not _parts(name) and kind != "dir":
            raise _refuse(archive, name, "names no file")
    links = {"/".join(_parts(name)): target for name, kind, target in members if kind == "symlink"}
    for name, kind, target in members:
        parts = _parts(name)
        if kind in ("symlink", "hardlink"):
            if not target:
                raise _refuse(archive, name, f"{kind} without a target")
            if _is_absolute(target):
                raise _refuse(archive, name, f"{kind} to an absolute path '{one_line(target)}'")
            base = parts[:-1] if kind == "symlink" else []
            if _resolve(base + target.split("/"), links) is None:
                raise _refuse(archive, name, f"{kind} target '{one_line(target)}' resolves outside "
                                             "the destination")
        elif _resolve(parts, links) is None:
            raise _refuse(archive, name, "its path leads outside the destination through a symlink")


# ----------------------------------------------------------------------------- zip

def _zip_mode(info: zipfile.ZipInfo) -> int:
    return info.external_attr >> 16 if info.create_system == 3 else 0  # 3: Unix


def _zip_kind(info: zipfile.ZipInfo) -> str:
    kind = stat.S_IFMT(_zip_mode(info))
    if info.flag_bits & 0x1:
        return "encrypted"
    if kind == stat.S_IFLNK:
        return "symlink"
    if info.is_dir() or kind == stat.S_IFDIR:
        return "dir"
    if kind in (0, stat.S_IFREG):
        return "file"
    return _special(kind)


def _special(kind: int) -> str:
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return "device file"
    if kind == stat.S_IFIFO:
        return "FIFO"
    return "special file (not a regular file, folder or link)"


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        members = []
        for info in infos:
            kind = _zip_kind(info)
            target = None
            if kind == "symlink":
                if info.file_size > 4096:
                    raise _refuse(archive, info.filename, "symlink target longer than 4096 bytes")
                target = zf.read(info).decode("utf-8", "surrogateescape")
            members.append((info.filename, kind, target))
        _check_all(archive, members)

        for info, (name, kind, target) in zip(infos, members, strict=True):
            path = dest.joinpath(*_parts(name))
            if kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():  # a later member of the same name replaces a link, never writes through it
                path.unlink()
            if kind == "symlink":
                path.symlink_to(target)
                continue
            with zf.open(info) as source, open(path, "wb") as out:  # reading to the end checks the CRC
                shutil.copyfileobj(source, out, 1 << 20)
            mode = _zip_mode(info) & 0o777
            if mode:
                path.chmod(mode & 0o755 | 0o600)


# ----------------------------------------------------------------------------- tar

def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    return "special file (not a regular file, folder or link)"


def _plain(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A copy with regular permission bits only, owned by whoever extracts it (tarfile chowns
    only as root, from uname/gname, else uid/gid; the data filter clears them all)."""
    member = copy.copy(member)
    if member.isdir():
        member.mode = member.mode & 0o755 | 0o700
    elif member.isreg() or member.islnk():
        member.mode = member.mode & 0o755 | 0o600
    member.uid, member.gid = os.getuid(), os.getgid()
    member.uname = member.gname = ""
    return member


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        originals = tf.getmembers()  # reads the whole archive: truncation shows here, before writing
        _check_all(archive, [(m.name, _tar_kind(m), m.linkname or None) for m in originals])
        members = [_plain(m) for m in originals]
        if hasattr(tarfile, "data_filter"):
            try:
                tf.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as exc:
                name = exc.tarinfo.name if exc.tarinfo is not None else "?"
                raise _refuse(archive, name, f"tarfile data filter: {one_line(str(exc))}") from None
        else:
            tf.extractall(dest, members=members)
