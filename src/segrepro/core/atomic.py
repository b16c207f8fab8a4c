"""Atomic writes: a file is either absent, the old version, or complete; never half-written.

Everything the workflow treats as an output (models, metrics, tables, dataset cards) goes through
here, so a killed job cannot leave a file that looks finished.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0666 less the process's umask
    (tempfile.mkstemp creates 0600 whatever the umask, which would hide every output from the
    group on a shared cluster)."""
    with _UMASK_LOCK:  # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _writer_tag() -> str:
    """Host and PID of this process, in the name of its temporary files: a later run tells a dead
    writer's leftovers (a kill during a save) from a live one's."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path in the target's folder; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_with(path: Path | str, writer: Callable[[Path], None]) -> None:
    """Atomically write through a function that writes to a given path (e.g. torch.save)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def link_or_copy(source: Path | str, path: Path | str) -> None:
    """Make `path` a second name of the file `source` (a hard link: no extra disk; a copy where
    the filesystem has none), atomically: `path` is absent, the old file, or the whole new one."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{_writer_tag()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            with atomic_path(tmp) as copy:
                shutil.copyfile(source, copy)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path | str, everyone: bool = False) -> list[Path]:
    """Delete the temporary files `atomic_path` left in `folder` when its writer was killed (a
    full-size `.model.pt.HOST-PID.XXXX.tmp` otherwise stays forever): those of dead processes of
    this host, or with `everyone` every one (the caller holds the folder's lock, so no writer of
    it is alive anywhere). Returns the files removed."""
    host = socket.gethostname().split(".")[0]
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        writer = re.search(r"\.([^.]+)-(\d+)\.[^.]+\.tmp$", tmp.name)
        if not everyone and not (writer and writer.group(1) == host and not _alive(int(writer.group(2)))):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def build_directory(path: Path | str):
    """Yield an empty hidden sibling folder to fill; on success it replaces the folder `path`,
    on any error it is removed. A killed job leaves at most a hidden `.NAME.partial-PID`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
