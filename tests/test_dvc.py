"""Data versioning with DVC: a push/pull round trip through a local-directory remote restores the
data byte for byte, and the committed data.dvc is exactly what `segrepro prepare synthetic` makes.

Every DVC call runs the CLI in a throwaway git repo, offline: analytics, Studio and the user's own
DVC configuration are switched off or redirected so that nothing outside the test is read or hit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from segrepro.data.prepare import prepare_dataset

PROJECT = Path(__file__).resolve().parents[1]
SMALL = {"kind": "synthetic", "generator": {"seed": 0, "width": 48, "height": 32, "train": 6, "val": 2}}

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="DVC repos need git")


@pytest.fixture
def dvc_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("dvc-env")
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_STUDIO_OFFLINE="1",
        # Empty global/system configs: a remote or cache set up by the user must not leak in.
        DVC_GLOBAL_CONFIG_DIR=str(base / "global"),
        DVC_SYSTEM_CONFIG_DIR=str(base / "system"),
        # DVC keeps hash and index databases here; shared ones could answer for the deleted cache.
        DVC_SITE_CACHE_DIR=str(base / "site-cache"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    env.pop("DVC_ROOT", None)
    return env


def run(args, cwd, env, dvc=True):
    command = [sys.executable, "-m", "dvc", *args] if dvc else args
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def new_repo(root: Path, env) -> Path:
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root, env, dvc=False)
    run(["init", "-q"], root, env)
    run(["config", "core.analytics", "false"], root, env)
    return root


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tracked_out(dvc_file: Path) -> dict:
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    assert len(outs) == 1, outs
    return outs[0]


def test_push_pull_round_trip_restores_data(tmp_path, dvc_env):
    repo = new_repo(tmp_path / "repo", dvc_env)
    prepare_dataset("synthetic-tiny", SMALL, repo / "data" / "synthetic-tiny")
    original = file_hashes(repo / "data")
    assert len(original) == 6 + 2 + 6 + 2 + 2 + 1  # images, labels, splits, card

    run(["add", "data"], repo, dvc_env)
    out = tracked_out(repo / "data.dvc")
    assert out["path"] == "data" and out["nfiles"] == len(original)

    remote = tmp_path / "remote"
    run(["remote", "add", "-d", "store", str(remote)], repo, dvc_env)
    run(["push"], repo, dvc_env)
    stored = sum(1 for p in remote.rglob("*") if p.is_file())
    assert stored == len(set(original.values())) + 1  # one object per distinct content + the .dir listing

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(["pull"], repo, dvc_env)

    assert file_hashes(repo / "data") == original
    assert not any(p.is_symlink() for p in (repo / "data").rglob("*"))
    assert "up to date" in run(["status"], repo, dvc_env)


@pytest.mark.slow
def test_committed_data_version_is_regenerated_exactly(tmp_path, dvc_env):
    """Regenerate the demo dataset from params/datasets.yaml and let DVC hash it."""
    committed = tracked_out(PROJECT / "data.dvc")
    declaration = yaml.safe_load((PROJECT / "params" / "datasets.yaml").read_text())["synthetic"]

    repo = new_repo(tmp_path / "repo", dvc_env)
    prepare_dataset("synthetic", declaration, repo / "data" / "synthetic")
    # Hash only: nothing needs to be copied into this throwaway repo's cache.
    run(["add", "--no-commit", "data"], repo, dvc_env)
    regenerated = tracked_out(repo / "data.dvc")

    fields = ("md5", "size", "nfiles", "hash", "path")
    assert {k: regenerated.get(k) for k in fields} == {k: committed.get(k) for k in fields}, (
        "data.dvc no longer matches `segrepro prepare synthetic`: the generator or its declaration "
        "changed, or data/ was added holding other datasets; rerun `dvc add data` on purpose"
    )


def test_dvc_repro_tracks_every_params_file():
    """`dvc repro` must see a change to any paper's registry, scale or dataset declaration."""
    stage = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["tables"]
    tracked = {next(iter(entry)) for entry in stage["params"]}
    files = {str(path.relative_to(PROJECT)) for path in (PROJECT / "params").rglob("*.yaml")}
    assert tracked == files
