"""results/report.html: one self-contained page (no server; images inlined) of everything built —
the environment, the claims summary, every table with its chart, every figure, and per run its
wall time, device, peak memory and training curve. What is not built yet is listed with the
command that builds it.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import yaml

from segrepro.core import paths
from segrepro.core.atomic import write_text
from segrepro.core.devices import device_name
from segrepro.core.provenance import cpu_model, git_commit
from segrepro.pipeline import tracking
from segrepro.reporting import claims
from segrepro.reporting.tables import chart_path

LOCAL_UI = "http://127.0.0.1:5000"  # where `segrepro mlflow-server` serves the UI by default
PACKAGES = ("torch", "torchvision", "timm", "snakemake", "dvc", "mlflow", "pandas", "numpy", "segrepro")
STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#f3f3f3}code{background:#f3f3f3;padding:0 .2em}img{max-width:100%}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}.missing{color:#888}
section.table{border-top:2px solid #ddd;margin-top:1.5em}
"""


# ----------------------------------------------------------------------------- what is there

def environment() -> dict[str, str]:
    """Package versions, hardware, the commit and the data version (data.dvc and dataset cards)."""
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cpu": cpu_model(), "cpu cores": str(os.cpu_count())}
    env["gpus"] = ", ".join(device_name(torch.device("cuda", i)) for i in range(torch.cuda.device_count())) or "none"
    for package in PACKAGES:
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    env["git commit"] = git_commit()
    env["data version (data.dvc)"] = _dvc_version(Path("data.dvc"))
    for card in sorted(paths.DATA.glob("*/dataset.yaml")):
        fingerprint = (yaml.safe_load(card.read_text()) or {}).get("content_sha256", "?")
        env[f"dataset {card.parent.name}"] = f"content sha256 {str(fingerprint)[:16]}…"
    return env


def _dvc_version(path: Path) -> str:
    if not path.exists():
        return "no data.dvc"
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return f"md5 {outs[0].get('md5', '?')} ({outs[0].get('nfiles', '?')} files)"


def evaluated_runs() -> list[dict]:
    """Every metrics file under results/metrics/ (one per run and protocol), newest layout only."""
    runs = []
    for path in sorted((paths.RESULTS / "metrics").glob("*/*/*/*/seed*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being written by a running job: the next report has it
        if isinstance(record, dict) and "miou" in record and "train" in record:
            runs.append(dict(record, metrics_file=str(path)))
    return runs


# ----------------------------------------------------------------------------- rendering

def markdown_to_html(text: str) -> str:
    """The Markdown the table writers produce: headings, bullet lists, pipe tables, paragraphs,
    **bold** and `code`."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # the page has its own h1/h2
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_pipe_table(block))
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _pipe_table(block: list[str]) -> str:
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]
            for row in block]
    head, body = rows[0], [row for row in rows[1:] if not all(set(c) <= set(":-") for c in row)]
    cells = "".join(f"<th>{_inline(c)}</th>" for c in head)
    lines = [f"<table><tr>{cells}</tr>"]
    lines += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
    return "\n".join(lines) + "</table>"


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(rows: list[list[str]], head: list[str] | None = None) -> str:
    lines = ["<table>" + ("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" if head else "")]
    lines += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(lines) + "</table>"


def _claims_section(records: list[dict]) -> str:
    parts = [f"<p>{html.escape(claims.RULE)}</p>",
             f"<p><strong>{html.escape(claims.summary_line(records))}</strong></p>"]
    head = ["paper", "table", "claim", "verdict", "our numbers", "seeds (scale)", "paper's numbers"]
    # A claim not run yet: its table's build command is in the Tables section.
    rows = [[r["paper"], r["table"], r["claim"], r["verdict"], r["evidence"] or "–",
             f"{r['seeds'] or '–'} ({r['scale']})", r["paper_note"]] for r in records]
    return "\n".join(parts) + _table_html(rows, head)


def _compare_links(built: dict[str, dict[str, str]]) -> dict[str, str]:
    """Per built table (name -> its claims JSON, which holds its scale and seeds), the MLflow UI's
    compare page of the runs behind it; none when tracking is off or no store exists yet (a report
    never creates one)."""
    uri = tracking.tracking_uri()
    database = tracking.sqlite_path(uri)
    if not tracking.enabled() or not built or (database is not None and not database.exists()):
        return {}
    store = tracking.client()
    base = uri.split("?")[0] if uri.startswith(("http://", "https://")) else LOCAL_UI
    links = {}
    for name, header in built.items():
        seeds = [int(seed) for seed in header.get("seeds") or []] or None
        runs = tracking.table_runs(store, name, scale=header.get("scale"), seeds=seeds)
        if runs:
            links[name] = tracking.compare_url(base, runs[0].info.experiment_id, [run.info.run_id for run in runs])
    return links


def _tables_section(params, scale: str | None) -> str:
    default_scale = params.workflow["scale"]
    built = {name: claims.built_claims(name) for name in params.table_names() if paths.table_path(name).exists()}
    built = {name: document for name, document in built.items() if document is not None}
    links = _compare_links(built)
    parts = []
    for paper, registry in params.papers.items():
        parts.append(f"<h3>{html.escape(registry['title'])} ({paper})</h3>")
        for name, spec in registry["tables"].items():
            path = paths.table_path(name)
            if not path.exists():
                command = claims.build_command(path, scale if scale and scale != default_scale else None)
                parts.append(f'<p class="missing">{name}: {html.escape(spec["title"])} — not built: '
                             f"<code>{html.escape(command)}</code></p>")
                continue
            body = [f'<section class="table" id="{name}">', markdown_to_html(path.read_text())]
            if name in links:
                body.append(f'<p><a href="{html.escape(links[name])}">Compare these runs in the MLflow UI</a>'
                            " (with <code>segrepro mlflow-server</code> running)</p>")
            for picture in (chart_path(path), path.with_suffix(".png")):
                if picture.exists():
                    body.append(_image(picture, f"{name} chart"))
            parts.append("\n".join(body) + "</section>")
    return "\n".join(parts)


def _figures_section(params, scale: str | None) -> str:
    default_scale = params.workflow["scale"]
    parts = []
    for name in params.figure_names():
        path = paths.figure_path(name)
        if path.exists():
            parts.append(f"<h4>{name}</h4>{_image(path, name)}")
        else:
            command = claims.build_command(path, scale if scale and scale != default_scale else None)
            parts.append(f'<p class="missing">{name} — not built: <code>{html.escape(command)}</code></p>')
    return "\n".join(parts)


def _runs_section(runs: list[dict], workdir: Path) -> str:
    """Per evaluated run: wall times, devices and peak memory, then its training curve."""
    from segrepro.pipeline.train_log import plot_training_curve, read_log

    head = ["scale", "dataset", "paper", "experiment", "seed", "protocol", "mIoU", "iterations", "train time",
            "train device", "peak memory", "eval time", "eval device", "commit"]
    rows = []
    for run in sorted(runs, key=lambda r: (r["scale"], r["paper"], r["experiment"], r["seed"], r["protocol"])):
        train = run["train"]
        peak = train.get("peak_memory_mb") or run.get("eval_peak_memory_mb")
        memory = f"{peak:.0f} MB (GPU)" if peak else (
            f"{train['peak_rss_mb']:.0f} MB (RSS)" if train.get("peak_rss_mb") else "not recorded")
        rows.append([run["scale"], run["dataset"], run["paper"], run["experiment"], run["seed"], _scored(run),
                     f"{run['miou']:.2f}", train.get("iterations", run.get("iterations", "?")),
                     _duration(train.get("train_seconds")), train.get("device", "?"), memory,
                     _duration(run.get("eval_seconds")), run.get("eval_device", "?"), train.get("git_commit", "?")])
    parts = [_table_html(rows, head)]

    by_run: dict[tuple, dict[str, float]] = {}
    for run in runs:
        key = (run["scale"], run["dataset"], run["paper"], run["experiment"], run["seed"])
        by_run.setdefault(key, {})[_scored(run)] = run["miou"]
    parts.append("<h3>Training curves</h3>")
    for key, finals in sorted(by_run.items()):
        log = paths.run_dir(*key) / paths.TRAIN_LOG
        if not log.exists():
            continue
        picture = workdir / f"curve-{len(parts)}.png"
        title = f"{key[2]}/{key[3]} seed {key[4]} ({key[0]}, {key[1]})"
        plot_training_curve(read_log(log), picture, title, finals)
        parts.append(f"<details><summary>{html.escape(title)}</summary>{_image(picture, title)}</details>")
    return "\n".join(parts)


def _scored(run: dict) -> str:
    """A run's protocol, with the split it scored when that is not val (e.g. "ss (test)")."""
    split = run.get("split", "val")
    return run["protocol"] if split == "val" else f"{run['protocol']} ({split})"


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def write_report(params, out: Path, scale: str | None = None, dataset: str | None = None,
                 seeds: list[int] | None = None) -> None:
    """Gather what results/ holds into one HTML file at `out` (written atomically). `scale`
    only changes the commands printed for what is not built; `dataset` and `seeds` are accepted
    for symmetry with the table command and shown in the header."""
    if scale:
        params.scale(scale)  # an unknown scale stops here, before anything is written
    env = environment()
    records = claims.collect(params, scale)
    runs = evaluated_runs()
    chosen = {"scale": scale or params.workflow["scale"],
              "dataset": dataset or params.workflow["dataset"] or "each paper's",
              "seeds": ", ".join(map(str, seeds or params.seeds(scale or params.workflow["scale"])))}
    with tempfile.TemporaryDirectory() as scratch:
        body = [
            "<h1>segrepro report</h1>",
            f"<p>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; workflow settings: "
            + ", ".join(f"{k} {html.escape(str(v))}" for k, v in chosen.items()) + ".</p>",
            "<h2>Environment</h2>", _table_html([[k, v] for k, v in env.items()]),
            "<h2>Claims</h2>", _claims_section(records),
            "<h2>Tables</h2>", _tables_section(params, scale),
            "<h2>Figures</h2>", _figures_section(params, scale),
            f"<h2>Runs ({len(runs)} evaluations)</h2>",
            "<p>Wall time, device and peak memory as each job recorded them (GPU: torch's peak allocation;"
            " CPU: the process's peak resident memory). Compare runs interactively in the MLflow UI:"
            " <code>segrepro mlflow-server</code>, then http://127.0.0.1:5000.</p>",
            _runs_section(runs, Path(scratch)),
        ]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>segrepro report</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    write_text(Path(out), page)
