"""Crashes anywhere, then the plain rerun: kill -9 the trainer or the Snakemake controller at
chosen moments (told by files appearing, not by sleeps), run the README's command again, and
find the model, train_log.jsonl and MLflow run of an unbroken build, with no finished training
repeated. Also: the run folder's lock, a torn log line, stale temporary files, file modes under
a umask, the workflow profile, and the one-line refusal of an unknown target."""

from __future__ import annotations

import copy
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, copy_project, edit_yaml, segrepro_command
from test_train import tiny_config

from segrepro.core import atomic, paths
from segrepro.engine.checkpoint import CHECKPOINT, COMPLETE
from segrepro.engine.train import LOCK, LOG, train
from segrepro.pipeline import tracking

RUN = ("tiny", TINY, "pspnet", "psp50", 0)
MODEL = str(paths.model_path(*RUN))
# 12 iterations, a checkpoint every 4 and a log line every 3: a checkpoint (4, 8) between two log
# lines, so a resumed run must carry the loss window over to log the unbroken run's mean.
TRAIN = {"iterations": 12, "checkpoint_every": 4, "log_every": 3, "val_every": 6, "num_workers": 0}


# ----------------------------------------------------------------------------- helpers

def make_project(base: Path, tiny_dataset: Path, store_template: Path) -> tuple[Path, dict]:
    root = base / "project"
    copy_project(root)
    shutil.copytree(tiny_dataset, root / "data" / TINY)
    edit_yaml(root / "params" / "scales.yaml", {"tiny": {"train": TRAIN}})
    shutil.copy2(store_template, base / "mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}"}
    env.pop("SEGREPRO_MLFLOW", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return root, env


def snakemake_command(*args: str) -> list[str]:
    """The README's command (the profile adds the rest), for one training."""
    return [sys.executable, "-m", "snakemake", MODEL, "--cores", "2", "--config", "scale=tiny", *args]


def snakemake(root: Path, env: dict) -> subprocess.CompletedProcess:
    """The README's command, run to its end."""
    return subprocess.run(snakemake_command(), cwd=root, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, check=False)


def wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"ended before {what}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout} s")


def trainer_pid(run_dir: Path) -> int | None:
    """The PID the trainer wrote into its lock file (None before that)."""
    try:
        holder = re.match(r"PID (\d+) on ", (run_dir / LOCK).read_text())
    except FileNotFoundError:
        return None
    return int(holder.group(1)) if holder else None


def wait_until_unlocked(run_dir: Path, timeout: float = 120) -> None:
    """Until no trainer holds the folder (an orphan of a killed controller ends on its own)."""
    def free() -> bool:
        with open(run_dir / LOCK, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    wait_for(free, "end of the orphaned trainer", timeout=timeout)


def mlflow_runs(env: dict) -> tuple:
    """The MLflow client of the build's store and the runs of psp50 in it."""
    import mlflow

    store = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in store.search_experiments()]
    return store, store.search_runs(experiments, "tags.experiment = 'psp50'") if experiments else []


def outcome(root: Path, env: dict) -> dict:
    """What a build left: the model's tensors, the log's text, the MLflow run (status, every
    metric's (step, value) history, train_seconds only as present), the folder's files."""
    run_dir = root / paths.run_dir(*RUN)
    record = torch.load(run_dir / "model.pt", weights_only=True)
    store, runs = mlflow_runs(env)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one run folder"
    [run] = runs
    metrics = {key: sorted((m.step, m.value) for m in store.get_metric_history(run.info.run_id, key))
               for key in run.data.metrics}
    metrics["train_seconds"] = [step for step, _ in metrics["train_seconds"]]
    return {"model": record["model"], "iterations": record["summary"]["iterations"],
            "log": (run_dir / LOG).read_text(), "status": run.info.status, "metrics": metrics,
            "run_id_file": (run_dir / tracking.RUN_ID_FILE).read_text().strip() == run.info.run_id,
            "files": sorted(p.name for p in run_dir.iterdir() if p.name != paths.PROGRESS)}


def assert_same(ours: dict, unbroken: dict) -> None:
    assert ours["model"].keys() == unbroken["model"].keys()
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], unbroken["model"][k])]
    assert not different, f"tensors differ: {different[:5]}"
    for key in ("iterations", "log", "status", "metrics", "run_id_file", "files"):
        assert ours[key] == unbroken[key], key


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_dataset, mlflow_store_template) -> dict:
    """The run trained without a crash (by its job's command, without Snakemake around it)."""
    root, env = make_project(tmp_path_factory.mktemp("unbroken"), tiny_dataset, mlflow_store_template)
    result = subprocess.run(segrepro_command("train", "--paper", "pspnet", "--experiment", "psp50", "--scale",
                                             "tiny", "--seed", "0", "--threads", "1"),
                            cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    done = outcome(root, env)
    assert done["status"] == "FINISHED" and done["iterations"] == TRAIN["iterations"]
    return done


def checkpoint_at(iteration: int):
    def reached(run_dir: Path) -> bool:
        try:
            return torch.load(run_dir / CHECKPOINT, weights_only=True)["iteration"] >= iteration
        except Exception:  # absent, or being replaced
            return False

    return reached


def finished(run_dir: Path) -> bool:
    return (run_dir / COMPLETE).exists()


def build_and_kill(root: Path, env: dict, reached, victim: str) -> str:
    """Start the README's command; once `reached(run_dir)`, kill -9 the trainer or the
    controller (Snakemake) alone. Returns the build's output."""
    run_dir = root / paths.run_dir(*RUN)
    build = subprocess.Popen(snakemake_command(), cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: run_dir.is_dir() and reached(run_dir), "the moment", build)
        pid = wait_for(lambda: trainer_pid(run_dir), "the trainer's PID")
        assert b"segrepro" in Path(f"/proc/{pid}/cmdline").read_bytes(), "the trainer ended first"
        os.kill(pid if victim == "trainer" else build.pid, signal.SIGKILL)
        output = build.communicate(timeout=120)[0]  # a killed trainer fails the job; a killed controller is gone
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
    assert build.returncode != 0, output[-3000:]
    wait_until_unlocked(run_dir)  # the orphan of a killed controller finishes its training
    return output


def train_log(root: Path) -> str:
    return (root / "logs" / "train" / "tiny" / TINY / "pspnet" / "psp50" / "seed0.log").read_text()


@pytest.mark.slow  # 4 builds of one tiny run: 2.5 min on 2 cores shared with other work (load 10)
def test_a_trainer_killed_three_times_then_the_plain_rerun_ends_as_an_unbroken_build(
        unbroken, tmp_path, tiny_dataset, mlflow_store_template):
    root, env = make_project(tmp_path, tiny_dataset, mlflow_store_template)
    run_dir = root / paths.run_dir(*RUN)
    build_and_kill(root, env, lambda d: (d / CHECKPOINT).exists(), "trainer")
    # The rerun resumes from the first checkpoint (4); killed at the second (8).
    output = build_and_kill(root, env, checkpoint_at(8), "trainer")
    assert "resuming pspnet/psp50 from iteration 4" in train_log(root)
    assert f"train pspnet/psp50 seed0 (tiny, {TINY}): resumed at iteration 4 of 12" in output, output
    # Killed after the finished model was saved, before it was published as model.pt.
    build_and_kill(root, env, finished, "trainer")
    assert not (run_dir / "model.pt").exists()

    rerun = snakemake(root, env)
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert "published, not trained again" in train_log(root)  # nothing trained twice
    assert "finished earlier (its complete.pt), published without training" in rerun.stdout, rerun.stdout
    assert_same(outcome(root, env), unbroken)
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / CHECKPOINT).exists()


@pytest.mark.slow  # 2 builds of one tiny run each: 70 s on 2 cores shared with other work (load 10)
@pytest.mark.parametrize("moment", ["trainer-started", "first-checkpoint", "model-finished"])
def test_a_killed_controller_then_the_plain_rerun_ends_as_an_unbroken_build(
        moment, unbroken, tmp_path, tiny_dataset, mlflow_store_template):
    reached = {"trainer-started": lambda d: trainer_pid(d) is not None,
               "first-checkpoint": lambda d: (d / CHECKPOINT).exists(), "model-finished": finished}[moment]
    root, env = make_project(tmp_path, tiny_dataset, mlflow_store_template)
    run_dir = root / paths.run_dir(*RUN)
    build_and_kill(root, env, reached, "controller")
    # The orphaned trainer finished: its model is complete, and no controller saw it finish
    # (Snakemake marks it incomplete and left its lock).
    assert (run_dir / COMPLETE).exists() and (run_dir / "model.pt").exists()
    assert list((root / ".snakemake" / "locks").glob("*.lock"))

    rerun = snakemake(root, env)
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    assert "published, not trained again" in train_log(root)  # not retrained
    assert "it/s" not in train_log(root)
    assert_same(outcome(root, env), unbroken)
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / CHECKPOINT).exists()


# ----------------------------------------------------------------------------- one trainer per run

def test_a_second_trainer_on_a_locked_run_stops_naming_the_holder(project, segrepro):
    run_dir = project / paths.run_dir(*RUN)
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"handle = open({str(run_dir / LOCK)!r}, 'a+')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "handle.write(f'PID {os.getpid()} on testhost\\n'); handle.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = segrepro("train", "--paper", "pspnet", "--experiment", "psp50", "--scale", "tiny",
                          "--device", "cpu", "--threads", "1")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"segrepro: error: {paths.run_dir(*RUN)} is being trained by PID {holder.pid} on testhost "
        f"(lock {paths.run_dir(*RUN) / LOCK}); wait for it to end or stop it, then run again"], result.stderr
    assert not (run_dir / "model.pt").exists() and not (run_dir / LOG).exists()


# ----------------------------------------------------------------------------- a torn log line

def test_a_torn_last_log_line_is_dropped_and_written_again(project, edit_params, monkeypatch):
    import segrepro.engine.checkpoint as checkpoint

    edit_params("scales.yaml", {"tiny": {"train": TRAIN}})
    config = tiny_config()
    # An unbroken run, keeping its checkpoint of iteration 8 (deleted at its end).
    checkpoints, save = {}, checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda obj, path: (
        checkpoints.setdefault(obj.get("iteration"), copy.deepcopy(obj)) if Path(path).name == CHECKPOINT
        else None, save(obj, path)))
    reference = project / "results" / "reference" / "model.pt"
    train(config, reference, device="cpu")
    unbroken_log = (reference.parent / LOG).read_text()

    # A run killed after its checkpoint at 8, in the middle of writing the line of iteration 9.
    run_dir = project / paths.run_dir(*RUN)
    run_dir.mkdir(parents=True)
    torch.save(checkpoints[8], run_dir / CHECKPOINT)
    lines = unbroken_log.splitlines(keepends=True)
    kept = "".join(line for line in lines if json.loads(line)["iteration"] <= 8)
    torn = next(line for line in lines if json.loads(line)["iteration"] == 9)[:17]
    (run_dir / LOG).write_text(kept + torn)

    summary = train(config, run_dir / "model.pt", device="cpu")
    assert summary["resumed_from"] == 8
    assert (run_dir / LOG).read_text() == unbroken_log
    ours = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    theirs = torch.load(reference, weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_torn_line_in_the_middle_of_the_log_is_an_error_naming_it(tmp_path):
    from segrepro.core.errors import SegreproError
    from segrepro.pipeline.train_log import read_log

    log = tmp_path / LOG
    log.write_text('{"iteration": 3, "loss": 1.0}\n{"iteration": 6, "lo\n{"iteration": 9, "loss": 0.5}\n')
    with pytest.raises(SegreproError, match=f"{LOG}: line 2 is not JSON"):
        read_log(log)
    log.write_text('{"iteration": 3, "loss": 1.0}\n{"iteration": 6, "loss": 0.7}')  # no newline: torn
    assert read_log(log) == [{"iteration": 3, "loss": 1.0}]


# ----------------------------------------------------------------------------- files

def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    host = atomic._writer_tag().rsplit("-", 1)[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        names = {"dead": f".model.pt.{host}-{dead}.ab12cd34.tmp", "live": f".model.pt.{host}-{live.pid}.ef56gh78.tmp",
                 "elsewhere": f".model.pt.otherhost-{dead}.ij90kl12.tmp", "model": "model.pt"}
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        removed = atomic.remove_stale_temporaries(tmp_path)
        assert [path.name for path in removed] == [names["dead"]]
        removed = atomic.remove_stale_temporaries(tmp_path, everyone=True)  # the folder's lock is held
        assert sorted(path.name for path in removed) == sorted([names["live"], names["elsewhere"]])
        assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]
    finally:
        live.kill()
        live.wait()


def test_a_trainer_removes_what_a_killed_save_left(project, edit_params):
    edit_params("scales.yaml", {"tiny": {"train": {"iterations": 2}}})
    run_dir = project / paths.run_dir(*RUN)
    run_dir.mkdir(parents=True)
    leftover = run_dir / ".checkpoint.pt.otherhost-123.x1y2z3.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train(tiny_config(), run_dir / "model.pt", device="cpu")
    assert not leftover.exists()


def test_outputs_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "table.md", "| a |\n")
        atomic.write_with(tmp_path / "model.pt", lambda tmp: torch.save({"x": 1}, tmp))
        atomic.link_or_copy(tmp_path / "model.pt", tmp_path / "published.pt")
        os.umask(0o027)
        atomic.write_text(tmp_path / "private.md", "x")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {"table.md": 0o644, "model.pt": 0o644, "published.pt": 0o644, "private.md": 0o640}


# ----------------------------------------------------------------------------- the workflow

def test_the_workflow_profile_is_applied(project):
    """Its settings show in a run: Snakemake says it uses it, and a failed job's log (the one-line
    error of segrepro) is on the terminal (show-failed-logs), not only in logs/."""
    (project / "data" / TINY / "splits" / "train.txt").write_text("")  # training cannot start
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", MODEL, "--cores", "1", "--config", "scale=tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "Using workflow specific profile profiles/default" in result.stdout, result.stdout
    assert re.search(r"^segrepro: error: .+", result.stdout, re.MULTILINE), result.stdout[-3000:]
    assert "segrepro train --paper pspnet" in result.stdout  # printshellcmds


def test_an_unknown_target_is_one_line(project):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/tables/nope.md", "--cores", "1", "--config", "scale=tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stdout.splitlines() if "nope" in line]
    assert len(ours) == 1 and ours[0].startswith("segrepro: unknown table 'nope' in target results/tables/nope.md")
    assert "Traceback" not in result.stdout and len(result.stdout.splitlines()) <= 4, result.stdout


def test_progress_lines_of_a_training(tmp_path):
    import io

    from segrepro.pipeline import controller

    runs = tmp_path / "runs"
    run_dir = runs / "demo" / "synthetic" / "pspnet" / "psp50" / "seed0"
    run_dir.mkdir(parents=True)
    out = io.StringIO()
    watcher = controller._Watcher(runs, out, since=100.0)
    base = {"run": "pspnet/psp50", "iterations": 800, "resumed_from": 0, "pid": 7, "started": 100.0, "loss": None}
    lines = [dict(base, state="started", iteration=0, updated=100.0),
             dict(base, state="running", iteration=240, updated=121.0, loss=1.4123)]
    (run_dir / paths.PROGRESS).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"run": "pspn')
    watcher.poll()
    watcher.poll()  # nothing new: nothing printed twice, the half-written line not at all
    (run_dir / paths.PROGRESS).open("a").write('et/psp50"}\n' + json.dumps(dict(base, state="done", iteration=800,
                                                                                 updated=170.0)) + "\n")
    watcher.poll()
    assert out.getvalue().splitlines() == [
        "train pspnet/psp50 seed0 (demo, synthetic): started at iteration 0 of 800",
        # 21 s for 240 iterations: 49 s for the 560 left.
        "train pspnet/psp50 seed0 (demo, synthetic): 30% (240/800 iterations, loss 1.412; 0:21 so far,"
        " about 0:49 left)",
        "train pspnet/psp50 seed0 (demo, synthetic): done, 800 iterations (1:10)",
    ]
