"""The MLflow UI, checked in a real (headless) browser: `segrepro mlflow-server` serves the store a
workflow just logged to, bound to 127.0.0.1, and its pages line up a table's runs: the runs page
filtered by the table's tag lists exactly them, the compare page shows each run's metrics as
logged. Also the links the report builds (`tracking.runs_url`, `compare_url`, `table_runs`).

The browser is Debian's `chromium`, installed with apt when missing (as root), else the browser
test is skipped. A screenshot of the compare page is left in test-artifacts/ (or
$SEGREPRO_TEST_ARTIFACTS) for a human to look at.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO
from test_workflow import snakemake

from segrepro.core.errors import SegreproError
from segrepro.pipeline import tracking

TABLE = "pspnet_table2"
PAPER = "pspnet"
SCREENSHOT = "mlflow_ui_compare.png"


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_the_ui_shows(value: float) -> str:
    """A metric value as the MLflow UI prints it (its Utils.formatMetric: exponential below 1e-3,
    then 3, 2 or 1 decimals below 10, below 100 and above, rounded half up, written the way
    JavaScript writes numbers: no trailing '.0', no zero-padded exponent)."""
    if value == 0:
        return "0"
    if math.isnan(value):
        return "NaN"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    scale = 1000 if abs(value) < 10 else 100 if abs(value) < 100 else 10
    rounded = math.floor(value * scale + 0.5) / scale
    return str(int(rounded)) if rounded == int(rounded) else repr(rounded)


def texts(markup: str) -> list[str]:
    """The text of each element of an HTML fragment, in order (scripts and styles left out)."""
    markup = re.sub(r"<(script|style)\b.*?</\1>", "", markup, flags=re.S)
    return [html.unescape(part).strip() for part in re.split(r"<[^>]*>", markup) if part.strip()]


def run_names_row(dom: str) -> list[str]:
    """The compare page's "Run Name:" row, one name per compared run, in the page's order."""
    start = dom.index("Run Name:</th>")
    row = dom[start:dom.index("</tr>", start)]
    return [" ".join(texts(cell)) for cell in re.findall(r"<td\b.*?</td>", row, flags=re.S)]


def metrics_grid(dom: str) -> dict[str, list[str]]:
    """The compare page's Metrics section as metric -> the value shown in each run's column.

    The section is two virtualized grids of absolutely placed cells: the metric names (each a
    "Plot chart" link) and the values; a value belongs to the name at the same `top` and to the
    run whose column is at its `left` (columns in the page's run order)."""
    start = dom.index('aria-label="Metrics - Show diff only"')
    ends = [i for i in (dom.find(">Artifacts<", start), dom.find(">Tags<", start)) if i > 0]
    section = dom[start:min(ends, default=len(dom))]
    names: dict[int, str] = {}
    values: dict[tuple[int, int], str] = {}
    cells = re.findall(r'<div [^>]*?style="([^"]*)"[^>]*>((?:(?!<div\b).)*?)</div>', section, flags=re.S)
    for style, content in cells:  # innermost divs only: a cell holds a link or a span
        left, top = (re.search(rf"(?:^|;)\s*{key}:\s*(\d+)px", style) for key in ("left", "top"))
        if left is None or top is None:
            continue
        text = " ".join(texts(content))
        if 'title="Plot chart"' in content:
            names[int(top.group(1))] = text
        else:
            values[int(top.group(1)), int(left.group(1))] = text
    columns = sorted({left for _, left in values})
    return {name: [values.get((top, left), "") for left in columns] for top, name in names.items()}


def matching_runs(dom: str) -> int:
    """The runs page's count of the runs its filter matches ("<strong>5</strong> matching runs")."""
    found = re.search(r"(\d+)(?:</strong>)?\s*matching runs?\b", dom)
    assert found, "no 'matching runs' count on the page"
    return int(found.group(1))


def listening_addresses(port: int) -> list[str]:
    """The local addresses of the sockets listening on `port` (Linux /proc/net), e.g. ['127.0.0.1']."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, local_port = local.split(":")
            if state != "0A" or int(local_port, 16) != port:  # 0A: LISTEN
                continue
            if table == "tcp":  # one little-endian 32-bit word
                found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:  # four little-endian 32-bit words
                words = bytes.fromhex(address)
                found.append(socket.inet_ntop(socket.AF_INET6, b"".join(
                    words[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


# ----------------------------------------------------------------------------- fast checks

def test_the_server_serves_the_store_the_jobs_log_to(tmp_path, monkeypatch):
    """An SQLite MLFLOW_TRACKING_URI is where the jobs log, so the UI shows it; unset, or pointing
    at a server (perhaps this one), the project's results/mlflow.db."""
    monkeypatch.chdir(tmp_path)
    default = tmp_path / tracking.DEFAULT_DB
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert tracking.sqlite_path(tracking.served_store()) == tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.sqlite_path(tracking.served_store()) == default
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    command = tracking.server_command()
    assert tracking.sqlite_path(command[command.index("--backend-store-uri") + 1]) == default


def test_the_server_binds_loopback_by_default():
    from segrepro.cli import build_parser

    args = build_parser().parse_args(["mlflow-server"])
    assert (args.host, args.port) == ("127.0.0.1", 5000)
    command = tracking.server_command()
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_ui_links():
    base = "http://127.0.0.1:5000/"
    assert tracking.runs_url(base, "2") == "http://127.0.0.1:5000/#/experiments/2/runs"
    url = tracking.runs_url(base, "2", tracking.table_filter("table6"))
    route, query = urllib.parse.urlsplit(url).fragment.split("?")
    assert route == "/experiments/2/runs"
    assert urllib.parse.parse_qs(query) == {"searchFilter": ["tags.table_table6 = 'yes'"]}
    assert " " not in url and "'" not in url  # usable as a Markdown link as is

    url = tracking.compare_url(base, "2", ["a1", "b2"])
    route, query = urllib.parse.urlsplit(url).fragment.split("?")
    assert route == "/compare-runs" and "[" not in url and '"' not in url
    fields = {key: json.loads(value[0]) for key, value in urllib.parse.parse_qs(query).items()}
    assert fields == {"runs": ["a1", "b2"], "experiments": ["2"]}


def test_as_the_ui_shows():
    """The UI's metric formatting (Utils.formatMetric, then JavaScript's Number toString)."""
    assert [as_the_ui_shows(v) for v in (0.0, 3.2140563, 28.727243, 12.5, 0.0019937, 150.04, 45.0)] == \
        ["0", "3.214", "28.73", "12.5", "0.002", "150", "45"]
    assert as_the_ui_shows(0.000123456) == "1.235e-4" and as_the_ui_shows(2.0005) == "2.001"


def test_table_runs(tmp_path, monkeypatch, mlflow_store_template):
    """A table's runs: by exact membership in the `tables` tag, the latest MLflow run per
    experiment ID, scale, dataset and seed, narrowed to a scale and seeds when asked; deleted runs
    and other tables' runs left out."""
    import mlflow

    db = tmp_path / "mlflow.db"
    shutil.copy2(mlflow_store_template, db)
    store = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = store.create_experiment(PAPER, artifact_location=(tmp_path / "artifacts").as_uri())
    other = store.create_experiment("saf", artifact_location=(tmp_path / "artifacts-saf").as_uri())

    def run(name, tables, scale="tiny", seed=0, start=0, experiment_id=experiment):
        tags = {"tables": tables, "scale": scale, "dataset": "synthetic-tiny", "seed": str(seed)}
        return store.create_run(experiment_id, start_time=1_000 + start, tags=tags, run_name=name).info.run_id

    run("fcn", "pspnet_table1,pspnet_table2", start=0)  # an older config of the same run folder
    newest_fcn = run("fcn", "pspnet_table1,pspnet_table2", start=5)
    noaux = [run("fcn_noaux", TABLE, seed=seed, start=seed) for seed in (1, 0)]
    demo_fcn = run("fcn", TABLE, scale="demo")
    run("psp_avg", "pspnet_table1")
    run("fcn_x", "pspnet_table21")  # a name that contains the table's
    run("A", "table6", experiment_id=other)
    store.delete_run(run("fcn_aux03", TABLE, start=9))

    def found(**narrow):
        return [(r.info.run_name, r.data.tags["seed"], r.info.run_id)
                for r in tracking.table_runs(store, TABLE, **narrow)]

    assert found(scale="tiny") == [("fcn", "0", newest_fcn), ("fcn_noaux", "0", noaux[1]),
                                   ("fcn_noaux", "1", noaux[0])]
    assert found(scale="tiny", seeds=[1]) == [("fcn_noaux", "1", noaux[0])]
    assert {run_id for *_, run_id in found()} == {newest_fcn, *noaux, demo_fcn}
    assert found(scale="paper") == [] and tracking.table_runs(store, "tableZ") == []
    with pytest.raises(SegreproError, match="table name 'x or 1': "):
        tracking.table_runs(store, "x or 1")


# ----------------------------------------------------------------------------- the browser

@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's chromium, installed with apt-get (as root) when it is not there."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be here (needs root and apt-get): "
                    "apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200, check=False)
    if done.returncode != 0 and "Unable to locate package" in done.stderr:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600, check=False)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200, check=False)
    if done.returncode != 0 or shutil.which("chromium") is None:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"apt-get install chromium failed: {last}")
    return shutil.which("chromium")


class Browser:
    """Headless chromium, one process per page (a fresh profile of its own each time); the
    virtual-time budget lets the single-page app fetch its data and render before the dump."""

    def __init__(self, executable: str, profile: Path):
        self.executable, self.profile = executable, profile

    def _run(self, url: str, width: int, *action: str) -> str:
        shutil.rmtree(self.profile, ignore_errors=True)
        done = subprocess.run(
            [self.executable, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={self.profile}",
             "--virtual-time-budget=30000", f"--window-size={width},1000", *action, url],
            capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def dom(self, url: str, ready: str, width: int = 1600) -> str:
        """The rendered DOM, once it contains `ready` (up to three loads)."""
        for _ in range(3):
            dom = self._run(url, width, "--dump-dom")
            if ready in dom:
                return dom
        raise AssertionError(f"{url}: no {ready!r} in the page after three loads:\n{' '.join(texts(dom))[:3000]}")

    def screenshot(self, url: str, path: Path) -> None:
        self._run(url, 1600, f"--screenshot={path}")


@pytest.fixture
def ui_server(project):
    """`segrepro mlflow-server` on a free loopback port (the project's command; one worker on a
    laptop's cores), serving the store MLFLOW_TRACKING_URI names; its base URL and port. Stopped
    (with its workers, its own process group) at the end, whatever happened."""
    port = free_port()
    log = project.parent / "mlflow-server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(["segrepro", "mlflow-server", "--port", str(port), "--workers", "1"],
                                  stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer:\n" + log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


@pytest.mark.slow
def test_the_ui_lines_up_a_tables_runs(project, chromium, request, tmp_path):
    import mlflow

    from segrepro.config.params import load_params

    built = snakemake(project, f"results/tables/{TABLE}.md", "--cores", "2", "--config", "scale=tiny",
                      env=dict(os.environ), timeout=900)
    assert built.returncode == 0, built.stdout[-5000:]
    expected = sorted(row["experiment"] for row in load_params(project).table(TABLE)[1]["rows"])

    store = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment_id = store.get_experiment_by_name(PAPER).experiment_id
    # Another table's run in the same experiment, which the table's filter must leave out.
    store.create_run(experiment_id, run_name="psp_max", tags={
        "tables": "pspnet_table1", tracking.table_tag("pspnet_table1"): "yes", "scale": "tiny"})
    runs = tracking.table_runs(store, TABLE, scale="tiny")
    assert [run.info.run_name for run in runs] == expected
    for run in runs:
        assert run.data.tags.get(tracking.table_tag(TABLE)) == "yes", run.info.run_name
        assert "ss_miou" in run.data.metrics, run.info.run_name

    ui_url, port = request.getfixturevalue("ui_server")
    assert listening_addresses(port) == ["127.0.0.1"]  # loopback only, no IPv6 or wildcard socket

    # The artifacts the UI previews: evaluate's ss.json, served from the project's folder.
    first = runs[0]
    listed = get_json(f"{ui_url}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={first.info.run_id}")
    assert "ss.json" in {entry["path"] for entry in listed.get("files", [])}, listed
    artifact = get_json(f"{ui_url}/get-artifact?path=ss.json&run_uuid={first.info.run_id}")
    assert artifact["miou"] == first.data.metrics["ss_miou"]

    browser = Browser(chromium, tmp_path / "chromium-profile")
    loaded = f">{expected[0]}<"  # a run name in an element of its own: the runs are listed
    everything = browser.dom(tracking.runs_url(ui_url, experiment_id), loaded)
    assert {*expected, "psp_max"} <= set(texts(everything)) and matching_runs(everything) == len(expected) + 1
    filtered = browser.dom(tracking.runs_url(ui_url, experiment_id, tracking.table_filter(TABLE)), loaded)
    assert set(expected) <= set(texts(filtered)) and "psp_max" not in texts(filtered)
    assert matching_runs(filtered) == len(expected)

    compare = tracking.compare_url(ui_url, experiment_id, [run.info.run_id for run in runs])
    # Wide enough that the virtualized grids render a column for every run.
    dom = browser.dom(compare, "Run Name:", width=800 + 250 * len(runs))
    assert run_names_row(dom) == expected
    shown = metrics_grid(dom)
    assert "ss_miou" in shown, sorted(shown)
    for column, run in enumerate(runs):
        for metric, value in run.data.metrics.items():
            assert shown[metric][column] == as_the_ui_shows(value), (run.info.run_name, metric, value)

    artifacts = Path(os.environ.get("SEGREPRO_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / SCREENSHOT
    screenshot.unlink(missing_ok=True)
    browser.screenshot(compare, screenshot)
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == (1600, 1000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # a rendered page, not a blank one
