"""MLflow under load: many jobs logging into one SQLite store at once lose nothing, not even when
they all start before the store exists (the schema-creation race); the same through
`segrepro mlflow-server`; and the workflow's `mlflow_uri` reaches the jobs' environment."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import segrepro_command
from test_workflow import snakemake

from segrepro.core.errors import SegreproError
from segrepro.pipeline import tracking

JOBS = 16
STEPS = 50
PAPER = "loadtest"

# One job: imports done, it says it is ready and waits for the common start signal, then logs one
# run the way training does (params and tags at the start, metrics every step, an artifact, FINISHED
# at the end) and prints how many locked writes it had to repeat.
WORKER = f"PAPER, STEPS = {PAPER!r}, {STEPS}\n" + textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow  # noqa: F401  (imported before the start, as a job has long before it logs)
    from segrepro.pipeline import tracking

    index, ready, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    config = {"paper": PAPER, "experiment": f"job{index}", "seed": index,
              "train": {"lr": 0.01, "iterations": STEPS, "crop": [8, 8]}}
    run_dir = Path("results/runs") / f"job{index}"
    ready.touch()
    while not go.exists():
        time.sleep(0.002)
    with tracking.Run(run_dir, config, {"job": str(index)}) as run:
        for step in range(1, STEPS + 1):
            run.log_metrics({"loss": 1.0 / step, "lr": 0.01 * index}, step=step)
        run.log_metrics({"train_seconds": 1.0})
        (run_dir / "note.txt").write_text(f"job {index}\\n")
        run.log_artifact(run_dir / "note.txt")
    print(f"retries={tracking.retries}")
""")


def run_jobs(cwd: Path, uri: str | None, jobs: int = JOBS) -> float:
    """Start `jobs` workers in `cwd`, let them log at the same moment; the seconds they took."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "SEGREPRO_MLFLOW", "PYTEST_CURRENT_TEST")}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    signals = cwd / "signals"
    signals.mkdir()
    go = signals / "go"
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(signals / f"ready{i}"), str(go)],
                         cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(jobs)
    ]
    try:
        deadline = time.monotonic() + 180
        while sum((signals / f"ready{i}").exists() for i in range(jobs)) < jobs:
            failed = [w.communicate()[0][-3000:] for w in workers if w.poll() is not None]
            assert not failed and time.monotonic() < deadline, failed
            time.sleep(0.01)
        began = time.monotonic()
        go.touch()
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        seconds = time.monotonic() - began
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    retries = sum(int(line.split("=")[1]) for output in outputs for line in output.splitlines()
                  if line.startswith("retries="))
    print(f"\n{jobs} jobs x {STEPS} steps logged in {seconds:.1f} s ({retries} locked writes retried)")
    return seconds


def check_runs(client, root: Path, jobs: int = JOBS) -> None:
    """Every job's run is there, FINISHED, with every metric step, its params, tags and artifact."""
    experiment = client.get_experiment_by_name(PAPER)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert sorted(run.info.run_name for run in runs) == sorted(f"job{i}" for i in range(jobs))
    for run in runs:
        index = int(run.info.run_name.removeprefix("job"))
        assert run.info.status == "FINISHED", run.info
        assert run.data.params["train.iterations"] == str(STEPS) and run.data.params["seed"] == str(index)
        assert run.data.tags["job"] == str(index)
        assert run.data.metrics["train_seconds"] == 1.0
        for key in ("loss", "lr"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, STEPS + 1)), (run.info.run_name, key)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
        # The run id the job left in its run folder is the run's.
        assert (root / "results/runs" / run.info.run_name / tracking.RUN_ID_FILE).read_text().strip() \
            == run.info.run_id


@pytest.mark.slow
def test_concurrent_jobs_on_a_new_sqlite_store_lose_nothing(tmp_path):
    """16 processes start logging at the same moment into a store that does not exist yet."""
    assert not (tmp_path / tracking.DEFAULT_DB).exists()
    run_jobs(tmp_path, None)
    import mlflow

    check_runs(mlflow.MlflowClient(f"sqlite:///{tmp_path / tracking.DEFAULT_DB}"), tmp_path)
    # The artifacts lie in the project, next to the store.
    assert len(list((tmp_path / tracking.ARTIFACTS / PAPER).glob("*/artifacts/note.txt"))) == JOBS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_concurrent_jobs_through_the_mlflow_server_lose_nothing(project):
    """`segrepro mlflow-server` serves the project's store; jobs log over HTTP, artifacts included."""
    port = free_port()
    server = subprocess.Popen(segrepro_command("mlflow-server", "--port", str(port), "--workers", "2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # its own group: the server's workers stop with it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the server did not answer"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        run_jobs(project, url, jobs=8)
        import mlflow

        check_runs(mlflow.MlflowClient(url), project, jobs=8)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
    # Written by the server into the project: the store and the uploaded artifacts.
    store = sqlite3.connect(tracking.sqlite_path(os.environ["MLFLOW_TRACKING_URI"]))  # the one served
    assert store.execute("select count(*) from runs where status = 'FINISHED'").fetchone() == (8,)
    assert len(list((project / tracking.ARTIFACTS).rglob("note.txt"))) == 8


def test_a_locked_write_is_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("store failed") from sqlite3.OperationalError("database is locked")
        return "done"

    before = tracking.retries
    assert tracking._retry(flaky) == "done" and len(calls) == 3
    assert tracking.retries == before + 2

    def broken():
        calls.append(1)
        raise ValueError("no such table: runs")

    calls.clear()
    with pytest.raises(ValueError):
        tracking._retry(broken)
    assert len(calls) == 1  # any other error is not retried


def test_a_write_waits_for_another_process_lock(tmp_path, monkeypatch, mlflow_store_template):
    """While another connection holds the database's write lock, logging waits instead of failing."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(mlflow_store_template.read_bytes())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("SEGREPRO_MLFLOW", raising=False)
    run = tracking.Run(tmp_path / "run", {"paper": PAPER, "experiment": "waits"}).__enter__()
    run.log_metrics({"loss": 1.0}, step=1)

    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, holder.execute, ["COMMIT"])
    release.start()
    began = time.monotonic()
    run.__exit__(None, None, None)  # flushes the metric and ends the run, blocked for 2 s
    release.join()
    assert time.monotonic() - began >= 1.5
    finished = tracking.client().get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.metrics == {"loss": 1.0}


def test_sqlite_uris_get_a_busy_timeout():
    assert tracking.with_busy_timeout("sqlite:////a/b.db") == f"sqlite:////a/b.db?timeout={tracking.BUSY_TIMEOUT_S}"
    assert tracking.with_busy_timeout("sqlite:///b.db?timeout=5") == "sqlite:///b.db?timeout=5"
    assert tracking.with_busy_timeout("http://head:5000") == "http://head:5000"
    assert tracking.sqlite_path("sqlite:////a/b.db?timeout=60") == Path("/a/b.db")
    assert tracking.sqlite_path("sqlite:///b.db") == Path("b.db")
    assert tracking.sqlite_path("http://head:5000") is None


def test_an_absent_server_fails_the_store_creation_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("SEGREPRO_MLFLOW", raising=False)
    with pytest.raises(SegreproError, match=r"MLflow server http://127.0.0.1:\d+ does not answer"):
        tracking.init_store(["pspnet"])


def test_server_command_serves_the_project_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no other store named: the project's
    command = tracking.server_command("10.0.0.5", 5001, ["--workers", "2"])
    assert command[1:4] == ["-m", "mlflow", "server"]
    store = command[command.index("--backend-store-uri") + 1]
    assert tracking.sqlite_path(store) == tmp_path / tracking.DEFAULT_DB
    assert command[command.index("--artifacts-destination") + 1] == (tmp_path / tracking.ARTIFACTS).as_uri()
    assert command[command.index("--host") + 1] == "10.0.0.5" and command[-3:] == ["5001", "--workers", "2"]


def test_mlflow_uri_config_sets_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-the-environment.db")
    for unset in (None, "null", ""):
        tracking.use_uri(unset)
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///from-the-environment.db"
    tracking.use_uri("http://head-node:5000")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://head-node:5000"
    with pytest.raises(SegreproError, match="mlflow_uri: 'head-node:5000' is not a URI"):
        tracking.use_uri("head-node:5000")


@pytest.mark.slow
def test_mlflow_uri_config_reaches_the_jobs(project, tmp_path):
    """`--config mlflow_uri=...` sends a training job's run (and onstart's experiments) there,
    not to the store of the environment's MLFLOW_TRACKING_URI."""
    import mlflow

    elsewhere = tmp_path / "elsewhere.db"
    model = "results/runs/tiny/synthetic-tiny/pspnet/fcn/seed0/model.pt"
    result = snakemake(project, model, "--cores", "1", "--config", "scale=tiny",
                       f"mlflow_uri=sqlite:///{elsewhere}", env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    run_id = (project / Path(model).parent / tracking.RUN_ID_FILE).read_text().strip()
    client = mlflow.MlflowClient(f"sqlite:///{elsewhere}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {"pspnet", "saf", "hfgd"} <= {e.name for e in client.search_experiments()}
    # The environment's store (the fixture's) got nothing.
    ours = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert [e.name for e in ours.search_experiments()] == ["Default"]
    result = snakemake(project, model, "-n", "--config", "scale=tiny", "mlflow_uri=head-node:5000",
                       env=dict(os.environ))
    assert result.returncode != 0 and "mlflow_uri: 'head-node:5000' is not a URI" in result.stdout
