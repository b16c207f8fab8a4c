"""Archive download: resume, size and checksum checks, the lock file, login-only archives."""

import hashlib
from pathlib import Path

import pytest
import yaml
from loopback import serve

from segrepro.core.errors import SegreproError
from segrepro.data import download
from segrepro.data.download import fetch, verify

NAME = "archive.zip"
DATA = bytes(range(256)) * 400  # 102,400 bytes


@pytest.fixture(autouse=True)
def no_retry_pause(monkeypatch):
    monkeypatch.setattr(download, "RETRY_PAUSE_S", 0.0)


@pytest.fixture
def dirs(tmp_path) -> tuple[Path, Path]:
    """(raw_dir, lock_path)."""
    return tmp_path / "raw", tmp_path / "params" / "archives.lock.yaml"


def get(spec: dict, dirs, **kwargs) -> Path:
    raw_dir, lock_path = dirs
    return fetch(NAME, spec, raw_dir, lock_path, log=kwargs.pop("log", lambda line: None), **kwargs)


def failure(spec: dict, dirs, **kwargs) -> str:
    with pytest.raises(SegreproError) as caught:
        get(spec, dirs, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and NAME in message
    return message


def only(raw_dir: Path) -> list[str]:
    return sorted(path.name for path in raw_dir.iterdir())


def test_download_verified_against_pinned_sha256(dirs):
    raw_dir, lock_path = dirs
    lines = []
    with serve({NAME: DATA}) as server:
        spec = {"url": server.url(NAME), "size": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
        path = get(spec, dirs, log=lines.append)
        assert path == raw_dir / NAME and path.read_bytes() == DATA
        assert only(raw_dir) == [NAME]
        assert not lock_path.exists()  # a pinned sha256 needs no lock entry
        assert lines and len(lines) < 5  # a few progress lines, not one per chunk
        assert server.requests == [(f"/{NAME}", None)]
        # Present and verified: no second request.
        assert get(spec, dirs, chunk_size=1024) == path
        assert len(server.requests) == 1


def test_md5_and_sha1_only_spec_records_sha256_in_the_lock(dirs):
    raw_dir, lock_path = dirs
    with serve({NAME: DATA}) as server:
        spec = {"url": server.url(NAME), "md5": hashlib.md5(DATA).hexdigest(),
                "sha1": hashlib.sha1(DATA).hexdigest().upper()}  # case does not matter
        assert get(spec, dirs, chunk_size=4096).read_bytes() == DATA
    text = lock_path.read_text()
    assert text.startswith("#")
    assert yaml.safe_load(text) == {NAME: {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA),
                                           "url": spec["url"]}}
    assert verify(NAME, spec, raw_dir / NAME, lock_path) == hashlib.sha256(DATA).hexdigest()


def test_size_mismatch_deletes_the_download(dirs):
    raw_dir, _ = dirs
    with serve({NAME: DATA}) as server:
        message = failure({"url": server.url(NAME), "size": len(DATA) + 1}, dirs)
    assert f"expected {len(DATA) + 1:,} bytes, got {len(DATA):,}" in message and "deleted" in message
    assert only(raw_dir) == []


@pytest.mark.parametrize("algorithm", ["sha256", "sha1", "md5"])
def test_checksum_mismatch_deletes_the_download(dirs, algorithm):
    raw_dir, lock_path = dirs
    wrong = hashlib.new(algorithm, b"other").hexdigest()
    with serve({NAME: DATA}) as server:
        message = failure({"url": server.url(NAME), algorithm: wrong, "checksum_source": "third-party: x"}, dirs)
    actual = hashlib.new(algorithm, DATA).hexdigest()
    assert algorithm in message and wrong in message and actual in message and "deleted" in message
    assert only(raw_dir) == []  # neither raw_dir/NAME nor a .part
    assert not lock_path.exists()  # nothing recorded for a file that failed


def test_truncated_transfer_resumes_on_the_next_call(dirs):
    raw_dir, _ = dirs
    with serve({NAME: DATA}, truncate={NAME: 30_000}) as server:
        spec = {"url": server.url(NAME), "size": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest()}
        message = failure(spec, dirs, retries=0)
    assert spec["url"] in message and "resume" in message
    assert only(raw_dir) == [f"{NAME}.part"]
    assert (raw_dir / f"{NAME}.part").read_bytes() == DATA[:30_000]

    with serve({NAME: DATA}) as server:
        spec["url"] = server.url(NAME)
        assert get(spec, dirs).read_bytes() == DATA
        assert server.requests == [(f"/{NAME}", "bytes=30000-")]
    assert only(raw_dir) == [NAME]


def test_retries_resume_within_one_call(dirs):
    # Every response stops after 40,000 bytes: three requests bring the whole file.
    with serve({NAME: DATA}, truncate={NAME: 40_000}) as server:
        spec = {"url": server.url(NAME), "sha256": hashlib.sha256(DATA).hexdigest()}
        assert get(spec, dirs, retries=2).read_bytes() == DATA
        assert [r for _, r in server.requests] == [None, "bytes=40000-", "bytes=80000-"]


def test_retries_exhausted_keep_the_part(dirs):
    raw_dir, _ = dirs
    with serve({NAME: DATA}, truncate={NAME: 10_000}) as server:
        message = failure({"url": server.url(NAME)}, dirs, retries=2)
        assert len(server.requests) == 3
    assert "3 times" in message
    assert (raw_dir / f"{NAME}.part").stat().st_size == 30_000 and not (raw_dir / NAME).exists()


def test_server_ignoring_range_restarts_cleanly(dirs):
    raw_dir, _ = dirs
    raw_dir.mkdir(parents=True)
    (raw_dir / f"{NAME}.part").write_bytes(b"x" * 5000)  # a stale beginning that must not survive
    lines = []
    with serve({NAME: DATA}, ignore_range=True) as server:
        spec = {"url": server.url(NAME), "sha256": hashlib.sha256(DATA).hexdigest()}
        assert get(spec, dirs, log=lines.append).read_bytes() == DATA
        assert server.requests == [(f"/{NAME}", "bytes=5000-")]
    assert any("ignored" in line for line in lines)
    assert only(raw_dir) == [NAME]


def test_complete_part_is_not_downloaded_again(dirs):
    raw_dir, _ = dirs
    raw_dir.mkdir(parents=True)
    (raw_dir / f"{NAME}.part").write_bytes(DATA)  # as left by a run killed before the rename
    with serve({NAME: DATA}) as server:
        spec = {"url": server.url(NAME), "size": len(DATA), "md5": hashlib.md5(DATA).hexdigest()}
        assert get(spec, dirs).read_bytes() == DATA
        assert server.requests == []
    # Without a size the server answers 416 to the resume at the end: also complete.
    (raw_dir / NAME).rename(raw_dir / f"{NAME}.part")
    with serve({NAME: DATA}) as server:
        assert get({"url": server.url(NAME), "md5": spec["md5"]}, dirs).read_bytes() == DATA
        assert server.requests == [(f"/{NAME}", f"bytes={len(DATA)}-")]


def test_lock_pins_the_first_download(dirs):
    raw_dir, lock_path = dirs
    files = {NAME: DATA}
    with serve(files) as server:
        spec = {"url": server.url(NAME)}
        get(spec, dirs)
        assert yaml.safe_load(lock_path.read_text())[NAME]["sha256"] == hashlib.sha256(DATA).hexdigest()
        (raw_dir / NAME).unlink()
        files[NAME] = DATA[::-1]  # the server now has other bytes of the same size
        message = failure(spec, dirs)
    assert str(lock_path) in message and hashlib.sha256(DATA[::-1]).hexdigest() in message
    assert only(raw_dir) == []
    assert yaml.safe_load(lock_path.read_text())[NAME]["sha256"] == hashlib.sha256(DATA).hexdigest()


def test_lock_keeps_its_header_and_other_entries(dirs):
    _, lock_path = dirs
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("# my header\n# second line\n{}\n")
    with serve({NAME: DATA, "b.tar": b"tar bytes"}) as server:
        get({"url": server.url(NAME)}, dirs)
        fetch("b.tar", {"url": server.url("b.tar")}, dirs[0], lock_path, log=lambda line: None)
    text = lock_path.read_text()
    assert text.startswith("# my header\n# second line\n")
    assert list(yaml.safe_load(text)) == ["archive.zip", "b.tar"]


LOGIN = {"url": "https://www.cityscapes-dataset.com/file-handling/?packageID=1",
         "login": "a Cityscapes account: https://www.cityscapes-dataset.com/downloads/ or csDownload"}


def test_login_archive_missing_names_where_to_place_it(dirs):
    raw_dir, _ = dirs
    message = failure(LOGIN, dirs)
    assert str(raw_dir / NAME) in message and "login" in message and "csDownload" in message


def test_login_archive_placed_by_the_user(dirs):
    raw_dir, lock_path = dirs
    raw_dir.mkdir(parents=True)
    (raw_dir / NAME).write_bytes(DATA)
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(yaml.safe_dump({NAME: {"sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA),
                                                "url": LOGIN["url"]}}))
    assert get(LOGIN, dirs) == raw_dir / NAME

    (raw_dir / NAME).write_bytes(DATA[::-1])  # same size, other bytes
    message = failure(LOGIN, dirs)
    assert "replace" in message and "sha256" in message
    assert (raw_dir / NAME).exists()  # a user's file is never deleted

    (raw_dir / NAME).write_bytes(DATA[:100])
    message = failure(LOGIN, dirs)
    assert f"expected {len(DATA):,} bytes, got 100" in message and (raw_dir / NAME).exists()


def test_http_error_is_one_line(dirs):
    raw_dir, _ = dirs
    with serve({}) as server:
        message = failure({"url": server.url(NAME)}, dirs)
    assert "404" in message and f"/{NAME}" in message
    assert only(raw_dir) == []


def test_non_http_url_refused(dirs):
    assert "http" in failure({"url": "file:///etc/passwd"}, dirs)
