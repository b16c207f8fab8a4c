"""Download one raw archive into data/raw/<name>, resuming, and verify it before it gets its name.

A download goes to `<name>.part` and is renamed to `<name>` only once it is verified, so a file at
`<name>` is always complete. A dropped connection is resumed with an HTTP Range request
(RFC 9110 §14: `Range: bytes=N-`, answered by 206 with `Content-Range: bytes N-…`; a server that
ignores the range answers 200 with the whole file, and the download starts over).

Verification (notes-datasets.md, [D]): the exact byte size first, then every checksum the spec
pins (sha256, sha1, md5; all computed in one pass). Archives without a pinned sha256 are checked
against the lock file (params/archives.lock.yaml: archive name -> {sha256, size, url}); the first
download records its sha256 there and every later one must match it.

Archives behind a login (Cityscapes) are never downloaded: the user places them at data/raw/<name>
and they are verified like any other.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from segrepro.core import atomic
from segrepro.core.errors import SegreproError

ALGORITHMS = ("sha256", "sha1", "md5")
LOCK_HEADER = (
    "# sha256 of the archives params/archives.yaml pins no sha256 for, recorded by their first download\n"
    "# (segrepro download); later downloads must match. Commit this file.\n"
)
RETRY_PAUSE_S = 2.0  # times the attempt number, after an attempt that brought no bytes
_PROGRESS_STEP = 0.10  # a progress line every 10 % of the file ...
_PROGRESS_EVERY_S = 30.0  # ... or every 30 s, whichever comes first,
_PROGRESS_MIN_S = 2.0  # but never more often than every 2 s


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Dropped(Exception):
    """The transfer stopped early for a reason a retry may fix (network, short read)."""


def fetch(name: str, spec: dict, raw_dir: Path, lock_path: Path, *, timeout: float = 60,
          retries: int = 3, chunk_size: int = 1 << 20, log=print_to_stderr) -> Path:
    """Make `raw_dir/name` exist and be verified (see the module docstring); return its path."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise SegreproError(f"archive name {name!r} must be a plain file name")
    raw_dir, lock_path = Path(raw_dir), Path(lock_path)
    target = raw_dir / name
    if target.exists():
        verify(name, spec, target, lock_path)
        return target
    if spec.get("login"):
        where = " ".join(str(spec["login"]).split())
        raise SegreproError(f"{name} needs a login and is not downloaded here: get it from {where}, "
                            f"then place it at {target}")
    url = spec.get("url")
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise SegreproError(f"{name}: url {url!r} is not an http(s) URL")

    raw_dir.mkdir(parents=True, exist_ok=True)
    part = raw_dir / f"{name}.part"
    failures = 0
    while True:
        before = _size(part)
        try:
            _download(name, url, part, spec.get("size"), timeout, chunk_size, log)
            break
        except _Dropped as exc:
            failures += 1
            have = _size(part)
            if failures > retries:
                kept = f"{have:,} bytes kept in {part}: run again to resume" if have else "run again to retry"
                raise SegreproError(f"{name}: download from {url} failed {failures} times (last: {exc}); "
                                    f"{kept}") from None
            log(f"{name}: {exc}; retry {failures}/{retries}")
            if have <= before:  # no progress (e.g. cannot connect): give the network a moment
                time.sleep(RETRY_PAUSE_S * failures)

    _verify(name, spec, part, lock_path, downloaded=True)
    with open(part, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(part, target)
    _fsync_dir(raw_dir)
    return target


def verify(name: str, spec: dict, path: Path, lock_path: Path) -> str:
    """Check a file in place (size, pinned checksums, lock; module docstring) and return its
    sha256. A file that fails is left where it is: the error says to replace it."""
    return _verify(name, spec, Path(path), Path(lock_path), downloaded=False)


# ----------------------------------------------------------------------------- transfer

def _download(name: str, url: str, part: Path, size: int | None, timeout: float, chunk_size: int,
              log) -> None:
    """One attempt: continue `part` from where it ends. Raises _Dropped for what a retry may fix."""
    have = _size(part)
    if size is not None and have > size:  # cannot be the start of the right file
        part.unlink()
        have = 0
    if size is not None and have == size and have:  # complete already (e.g. killed before the rename)
        return
    headers = {"User-Agent": "segrepro"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left past `have`: complete if the server's total agrees, else start over.
            if _range_total(exc.headers.get("Content-Range")) == have:
                return
            part.unlink()
            raise _Dropped(f"server refused to resume at byte {have:,}; starting over") from None
        raise SegreproError(f"{name}: HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise _Dropped(f"cannot connect ({reason})") from None

    with response:
        if response.status == 206 and _range_start(response.headers.get("Content-Range")) == have:
            mode = "ab"
        elif response.status == 200:
            if have:
                log(f"{name}: the server ignored the resume request; starting over")
            mode, have = "wb", 0
        else:
            part.unlink(missing_ok=True)
            raise _Dropped(f"unexpected answer {response.status} "
                           f"(Content-Range {response.headers.get('Content-Range')!r}); starting over")
        length = response.headers.get("Content-Length")
        end = have + int(length) if length and length.isdigit() else None
        progress = _Progress(name, size if size is not None else end, log)
        if have:
            log(f"{name}: resuming at {have:,} bytes")
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                    raise _Dropped(f"connection lost at {have:,} bytes ({type(exc).__name__})") from None
                if not chunk:
                    break
                out.write(chunk)
                have += len(chunk)
                progress.update(have)
            out.flush()
            os.fsync(out.fileno())
        if end is not None and have < end:
            raise _Dropped(f"connection closed at {have:,} of {end:,} bytes")
        progress.done(have)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _range_start(header: str | None) -> int | None:
    """N of `Content-Range: bytes N-M/T`."""
    try:
        unit, spans = (header or "").split(" ", 1)
        return int(spans.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _range_total(header: str | None) -> int | None:
    """T of `Content-Range: bytes */T` (the answer to an unsatisfiable range)."""
    try:
        return int((header or "").rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


class _Progress:
    """A line now and then (see _PROGRESS_*), never one per chunk."""

    def __init__(self, name: str, total: int | None, log):
        self.name, self.total, self.log = name, total, log
        self.start = self.last_time = time.monotonic()
        self.last_bytes = 0

    def update(self, have: int) -> None:
        now = time.monotonic()
        if now - self.last_time < _PROGRESS_MIN_S:
            return
        step = self.total is not None and have - self.last_bytes >= _PROGRESS_STEP * self.total
        if step or now - self.last_time >= _PROGRESS_EVERY_S:
            self.log(f"{self.name}: {self._amount(have)}")
            self.last_time, self.last_bytes = now, have

    def done(self, have: int) -> None:
        self.log(f"{self.name}: {self._amount(have)} in {time.monotonic() - self.start:.0f} s")

    def _amount(self, have: int) -> str:
        if self.total:
            return f"{have:,} of {self.total:,} bytes ({100 * have / self.total:.0f} %)"
        return f"{have:,} bytes"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- verification

def _verify(name: str, spec: dict, path: Path, lock_path: Path, *, downloaded: bool) -> str:
    def fail(what: str):
        if downloaded:  # resuming a wrong file cannot fix it
            path.unlink(missing_ok=True)
            raise SegreproError(f"{name}: {what}; the download was deleted, run again to fetch it anew")
        raise SegreproError(f"{name}: {what}; replace {path} with a good copy")

    pinned = {alg: str(spec[alg]).strip().lower() for alg in ALGORITHMS if spec.get(alg)}
    source = spec.get("checksum_source", "params/archives.yaml")
    locked = None if "sha256" in pinned else _read_lock(lock_path).get(name)

    size = path.stat().st_size
    if spec.get("size") is not None:
        if size != int(spec["size"]):
            fail(f"size mismatch: expected {int(spec['size']):,} bytes, got {size:,}")
    elif locked and locked.get("size") is not None and size != int(locked["size"]):
        fail(f"size mismatch against {lock_path}: expected {int(locked['size']):,} bytes, got {size:,}")

    digests = _digests(path, {"sha256", *pinned})
    for alg, expected in pinned.items():
        if digests[alg] != expected:
            fail(f"{alg} mismatch: expected {expected} ({source}), got {digests[alg]}")
    if "sha256" not in pinned:
        recorded = locked["sha256"] if locked else _record(name, spec, size, digests["sha256"], lock_path)
        if recorded != digests["sha256"]:
            fail(f"sha256 mismatch against {lock_path}: expected {recorded}, got {digests['sha256']}")
    return digests["sha256"]


def _digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    hashers = {alg: hashlib.new(alg) for alg in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(block)
    return {alg: hasher.hexdigest() for alg, hasher in hashers.items()}


def _read_lock(lock_path: Path) -> dict:
    if not lock_path.exists():
        return {}
    try:
        entries = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SegreproError(f"{lock_path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(entries, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in entries.values()):
        raise SegreproError(f"{lock_path}: must map archive names to {{sha256, size, url}}")
    return entries


@contextmanager
def _locked(lock_path: Path):
    """Exclusive lock on a sibling `<lock>.lock` file: parallel downloads update the lock one at a time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path.with_name(lock_path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _record(name: str, spec: dict, size: int, sha256: str, lock_path: Path) -> str:
    """Record `name`'s sha256 in the lock unless another process got there first; return the
    sha256 the lock holds for it afterwards."""
    with _locked(lock_path):
        entries = _read_lock(lock_path)
        if name in entries:
            return entries[name]["sha256"]
        entries[name] = {"sha256": sha256, "size": size, "url": spec.get("url")}
        atomic.write_text(lock_path, _lock_header(lock_path) + yaml.safe_dump(entries, sort_keys=True))
        return sha256


def _lock_header(lock_path: Path) -> str:
    """The lock's leading comment as it stands (so an edited header survives), else LOCK_HEADER."""
    if lock_path.exists():
        lines = []
        for line in lock_path.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.startswith("#"):
                break
            lines.append(line if line.endswith("\n") else line + "\n")
        if lines:
            return "".join(lines)
    return LOCK_HEADER
