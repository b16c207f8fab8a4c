"""MLflow logging: one experiment per paper, one MLflow run per training run (named after the
experiment ID), continued by a resumed job and by the evaluations of the same model.

The default store is a SQLite file under results/ (no server); set MLFLOW_TRACKING_URI (or the
workflow's `mlflow_uri`) to use a server instead, e.g. the one `segrepro mlflow-server` starts.
SEGREPRO_MLFLOW=0 turns logging off. The same server is the MLflow UI of the store; `table_runs`,
`runs_url` and `compare_url` link a paper table to its runs there.

Many jobs share one SQLite file, so every write is made to survive contention: the first access of
a process (which creates and migrates a new store) holds a file lock beside the database, the
connections wait for a lock instead of failing at once, a write that still fails with "database is
locked" is retried with backoff, and metrics are buffered and written in batches.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from segrepro.core.errors import SegreproError

DEFAULT_DB = Path("results") / "mlflow.db"
ARTIFACTS = Path("results") / "mlflow-artifacts"
RUN_ID_FILE = "mlflow_run_id"

BUSY_TIMEOUT_S = 60  # how long an SQLite connection waits for another writer's lock
RETRY_FOR_S = 300  # how long a write still failing with "database is locked" is retried
FLUSH_EVERY_S = 15.0  # buffered metrics are written at least this often ...
FLUSH_AT = 500  # ... and whenever this many are waiting (and at the end of the run)
MAX_METRICS, MAX_PARAMS = 1000, 100  # MLflow's limits of one log_batch call


def enabled() -> bool:
    return os.environ.get("SEGREPRO_MLFLOW", "1") not in ("0", "false", "no")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB.resolve()}"
    return with_busy_timeout(uri)


def with_busy_timeout(uri: str) -> str:
    """An SQLite URI whose connections wait up to BUSY_TIMEOUT_S for a lock (Python's default is
    5 s, too short while another process migrates a new store); other URIs unchanged."""
    if not uri.startswith("sqlite:") or re.search(r"[?&]timeout=", uri):
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={BUSY_TIMEOUT_S}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite URI (None for a server or an in-memory database)."""
    path = uri.split("?", 1)[0].removeprefix("sqlite:///")
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        return None
    return Path(path)  # sqlite:////abs/x.db is /abs/x.db, sqlite:///x.db is x.db (relative)


def use_uri(uri: str | None) -> None:
    """The workflow's `mlflow_uri`: set, it becomes MLFLOW_TRACKING_URI of this process, and so of
    every job and onstart command Snakemake starts from it; null keeps the environment's (by
    default the SQLite file under results/)."""
    if uri in (None, "", "null", "None"):
        return
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        raise SegreproError(f"workflow config mlflow_uri: '{uri}' is not a URI (e.g. http://head-node:5000)")
    os.environ["MLFLOW_TRACKING_URI"] = uri


def _locked(err: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is SQLite's "database is locked"."""
    seen = 0
    while err is not None and seen < 10:
        if "database is locked" in str(err) or "database table is locked" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


retries = 0  # how many writes this process had to repeat (the load test reports it)


def _retry(call, *args, **kwargs):
    """call(*args, **kwargs), retried with jittered exponential backoff while SQLite is locked."""
    global retries
    deadline, delay = time.monotonic() + RETRY_FOR_S, 0.05
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not _locked(err) or time.monotonic() > deadline:
                raise
            retries += 1
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


@contextmanager
def _creation_lock(uri: str):
    """Held while a process first opens an SQLite store: creating and migrating a new store from
    several processes at once fails (tables half made). The creator holds the lock file beside the
    database exclusively; a process finding the database there takes it shared, so it waits only
    while a creation is under way. A lock file on the store's filesystem serializes the hosts of
    a shared filesystem too, unlike MLflow's own lock under /tmp."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.exists() and path.stat().st_size > 0
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if exists else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_READY: set[str] = set()


def client():
    """An MlflowClient of the store, which exists (created and migrated) once this returns."""
    import mlflow

    uri = tracking_uri()
    # Also the process's default, so mlflow.MlflowClient() and mlflow.* calls see the same store.
    mlflow.set_tracking_uri(uri)
    if uri in _READY:
        return mlflow.MlflowClient(uri)
    # Constructing the client opens the store, which creates and migrates a new one.
    with _creation_lock(uri):
        store = _retry(mlflow.MlflowClient, uri)
        _retry(store.search_experiments, max_results=1)
    _READY.add(uri)
    return store


def experiment_id(store, paper: str) -> str:
    """The paper's MLflow experiment, created on first use (tolerating a concurrent creator)."""
    found = _retry(store.get_experiment_by_name, paper)
    if found is not None:
        return found.experiment_id
    # A server stores artifacts where it is told to (proxied); a local store next to itself.
    location = None if sqlite_path(tracking_uri()) is None else (ARTIFACTS.resolve() / paper).as_uri()
    try:
        return _retry(store.create_experiment, paper, artifact_location=location)
    except Exception:
        found = _retry(store.get_experiment_by_name, paper)
        if found is None:
            raise
        return found.experiment_id


def init_store(papers: list[str]) -> None:
    """Create the store and every paper's experiment up front, so parallel jobs never race on it."""
    if enabled():
        _check_server(tracking_uri())
        store = client()
        for paper in papers:
            experiment_id(store, paper)


def _check_server(uri: str) -> None:
    """Fail at once, in one line, when a tracking server does not answer (MLflow's client would
    retry for minutes in every job)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            pass
    except OSError as err:
        raise SegreproError(f"MLflow server {uri} does not answer ({err}); start it with "
                            "`segrepro mlflow-server` or set mlflow_uri: null") from None


def served_store() -> str:
    """The store `segrepro mlflow-server` serves: the SQLite file jobs log to without a server, i.e.
    MLFLOW_TRACKING_URI where it names one (so the UI shows the runs a workflow just logged), else
    results/mlflow.db. A server URI there (perhaps this very server's) is no store to serve."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if sqlite_path(uri) is None:
        uri = f"sqlite:///{DEFAULT_DB.resolve()}"
    return with_busy_timeout(uri)


def server_command(host: str = "127.0.0.1", port: int = 5000, options: list[str] | None = None) -> list[str]:
    """`mlflow server` on the project's store (`served_store`), serving the artifacts itself (jobs
    upload through it into results/mlflow-artifacts/, no shared filesystem needed; the runs a
    local store logged keep their file:// artifacts, which the server reads for the UI)."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", served_store(),
            "--serve-artifacts", "--artifacts-destination", ARTIFACTS.resolve().as_uri(),
            "--host", host, "--port", str(port), *(options or [])]


def serve(host: str, port: int, options: list[str] | None = None) -> None:
    """Create the store if needed (under the creation lock), then become the server."""
    command = server_command(host, port, options)
    store = command[command.index("--backend-store-uri") + 1]
    os.environ["MLFLOW_TRACKING_URI"] = store
    # MLflow's server-side jobs (GenAI scorers, trace roll-ups) start about seven more processes
    # beside the server, which the project's runs never use; set this to true to have them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    client()
    print(f"MLflow server and UI on http://{host}:{port} (store {sqlite_path(store)}); jobs log to it with\n"
          f"  snakemake ... --config mlflow_uri=http://{host}:{port}", file=sys.stderr, flush=True)
    os.execv(command[0], command)


# Links into the MLflow UI, a single-page app whose routes follow '#'. A table's runs carry the tag
# table_<table> = yes (set at training), so the UI's search box lines them up; its compare page
# shows their parameters and metrics side by side.

def table_tag(table: str) -> str:
    """The run tag that marks a run as one of `table`'s (value "yes")."""
    return f"table_{table}"


def table_filter(table: str) -> str:
    """The UI's search-box filter (MLflow's search syntax) listing the runs of `table`."""
    return f"tags.{table_tag(table)} = 'yes'"


def runs_url(base_url: str, experiment_id: str, search_filter: str | None = None) -> str:
    """The UI's runs page of an experiment, its search box filled with `search_filter`."""
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}?searchFilter={quote(search_filter, safe='')}" if search_filter else url


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's compare page of the given runs (in this order) of one experiment."""
    runs, experiments = (quote(json.dumps(ids, separators=(",", ":")), safe="")
                         for ids in (list(run_ids), [experiment_id]))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def table_runs(store, table: str, scale: str | None = None, dataset: str | None = None,
               seeds: list[int] | None = None) -> list:
    """The MLflow runs (mlflow.entities.Run) behind `table`, active runs of every experiment whose
    `tables` tag lists it (runs trained before the table_<table> tag existed included), narrowed
    to a scale, dataset and seeds when given. A run folder retrained from scratch (new config)
    starts a new MLflow run, so per experiment ID, scale, dataset and seed only the latest counts.
    Sorted by run name (the experiment ID), then seed."""
    if not re.fullmatch(r"\w+", table):
        raise SegreproError(f"table name {table!r}: only letters, digits and '_' allowed")
    # LIKE narrows on the server ('_' matches any character there); membership is checked below.
    query = [f"tags.tables LIKE '%{table}%'"]
    for key, value in (("scale", scale), ("dataset", dataset)):
        if value is not None:
            if "'" in value:
                raise SegreproError(f"{key} {value!r}: a quote cannot be searched for")
            query.append(f"tags.{key} = '{value}'")
    wanted_seeds = None if seeds is None else {str(seed) for seed in seeds}
    experiments = [e.experiment_id for e in _all_pages(store.search_experiments)]
    latest = {}
    if experiments:
        for run in _all_pages(store.search_runs, experiments, " and ".join(query)):
            tags = run.data.tags
            if table not in tags.get("tables", "").split(","):
                continue
            if wanted_seeds is not None and tags.get("seed") not in wanted_seeds:
                continue
            key = (run.info.experiment_id, run.info.run_name, tags.get("scale"), tags.get("dataset"),
                   tags.get("seed"))
            if key not in latest or run.info.start_time > latest[key].info.start_time:
                latest[key] = run
    return sorted(latest.values(), key=lambda run: (run.info.run_name, _seed(run)))


def _seed(run) -> int:
    seed = run.data.tags.get("seed", "")
    return int(seed) if seed.lstrip("-").isdigit() else -1


def _all_pages(search, *args) -> list:
    """Every result of an MlflowClient search_* call, page after page."""
    found, token = [], None
    while True:
        page = _retry(search, *args, page_token=token)
        found += page
        token = page.token
        if not token:
            return found


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


class Run:
    """An MLflow run tied to a run folder: the run id is stored there, so a resumed training job
    and the later evaluations log into the same MLflow run. Metrics are buffered (see FLUSH_*) and
    written in batches. Without tracking, every call is a no-op."""

    def __init__(self, run_dir: Path, config: dict, tags: dict | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.tags = tags or {}
        self.store = None
        self.run_id: str | None = None
        self._pending: list = []
        self._flushed_at = time.monotonic()
        self._logged: set[tuple[str, int]] | None = None  # (key, step) in the store: log_metrics_once

    def __enter__(self) -> Run:
        if not enabled():
            return self
        from mlflow.entities import Param, RunStatus, RunTag

        store = client()
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is not None and _run_exists(store, run_id):
            _retry(store.update_run, run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run = _retry(store.create_run, experiment_id(store, self.config["paper"]),
                         run_name=self.config["experiment"])
            run_id = run.info.run_id
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.store, self.run_id = store, run_id
        params = [Param(k, v) for k, v in flatten(self.config).items()]
        tags = [RunTag(k, str(v)) for k, v in self.tags.items()]
        for start in range(0, len(params), MAX_PARAMS):
            _retry(store.log_batch, run_id, params=params[start:start + MAX_PARAMS])
        for start in range(0, len(tags), MAX_PARAMS):
            _retry(store.log_batch, run_id, tags=tags[start:start + MAX_PARAMS])
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.store is None:
            return
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.flush()
        _retry(self.store.set_terminated, self.run_id, status)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.store is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        if len(self._pending) >= FLUSH_AT or time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        """log_metrics, leaving out each metric the run already holds at this step: a resumed or
        replayed training (see segrepro.engine.train) then ends with exactly one value per metric and
        step, as an unbroken run, however often it was killed before or after a flush."""
        if self.store is None:
            return
        if self._logged is None:
            self._logged = self._steps_in_store()
        new = {key: value for key, value in metrics.items() if (key, step) not in self._logged}
        self._logged.update((key, step) for key in new)
        if new:
            self.log_metrics(new, step=step)

    def _steps_in_store(self) -> set[tuple[str, int]]:
        keys = _retry(self.store.get_run, self.run_id).data.metrics
        return {(key, metric.step) for key in keys
                for metric in _retry(self.store.get_metric_history, self.run_id, key)}

    def flush(self) -> None:
        """Write the buffered metrics (one transaction per MAX_METRICS of them)."""
        while self._pending:
            _retry(self.store.log_batch, self.run_id, metrics=self._pending[:MAX_METRICS])
            del self._pending[:MAX_METRICS]
        self._flushed_at = time.monotonic()

    def log_artifact(self, path: Path) -> None:
        if self.store is not None:
            _retry(self.store.log_artifact, self.run_id, str(path))


def run_tag(run_dir: Path, key: str) -> str | None:
    """Tag `key` of the MLflow run of a run folder; None when tracking is off, the folder has no
    run or the run no such tag."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not enabled() or not id_file.exists():
        return None
    store = client()
    run_id = id_file.read_text().strip()
    if not _run_exists(store, run_id):
        return None
    return _retry(store.get_run, run_id).data.tags.get(key)


def _run_exists(store, run_id: str) -> bool:
    """Whether the run is there to continue (not deleted); a locked store is waited for, not
    taken for a missing run (which would start a second MLflow run for the same folder)."""
    from mlflow.exceptions import MlflowException

    try:
        run = _retry(store.get_run, run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def attach_files(run_dir: Path, files: list[Path], artifact_path: str) -> None:
    """Log files (a table and its chart) as artifacts under `artifact_path` of the MLflow run of a
    run folder; nothing when tracking is off or the folder has no MLflow run."""
    id_file = Path(run_dir) / RUN_ID_FILE
    if not enabled() or not id_file.exists():
        return
    store = client()
    run_id = id_file.read_text().strip()
    if _run_exists(store, run_id):
        for path in files:
            _retry(store.log_artifact, run_id, str(path), artifact_path)
