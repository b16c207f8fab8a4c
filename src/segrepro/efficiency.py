"""SaF's efficiency tables (Sec. 5.3, Table 5; App. D, Table B): each row's model timed on the
machine at hand, beside the paper's GeForce RTX 2080 Ti figures.

`segrepro efficiency NAME` times the rows of a table of kind `efficiency` and writes
results/efficiency/NAME.json; `segrepro table NAME` renders it. A row names an experiment (its
architecture, as built at the table's model scale, random init), optionally a comparison head
(`head`: segrepro.models.context_heads) and the plain ResNet instead of App. D's decoder
(`resnet_output_stride`). Each row runs in a fresh process (segrepro.efficiency_probe), so that
its peak memory is its own.

Timings depend on the device, so the table shows each row also divided by a reference row (the
first, or `efficiency.reference`): those ratios compare across devices, ours beside the paper's.

This module must stay free of torch and of the models, at import time and in every import it makes
(even a lazy one): the workflow imports it (through segrepro.tables) while it builds its DAG, and
the table stage's code inputs (segrepro.codedeps) would otherwise include every model file. The
probe is started by module name, not imported.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from segrepro import atomic, paths
from segrepro.errors import SegreproError
from segrepro.provenance import git_commit
from segrepro.tables import CONTRADICTED, MISSING, NOT_TOLD_APART, REPRODUCED, verdict_line, write_table

if TYPE_CHECKING:
    import pandas as pd

PROBE = "segrepro.efficiency_probe"
# metric -> (display name, higher is better)
METRICS = {
    "test_fps": ("Test FPS", True),
    "train_its": ("Train it/s", True),
    "train_mem_gb": ("Train mem. (G)", False),
}
COMPARISON_HEADS = ("plain", "ccnet", "ocr")  # segrepro.models.context_heads.HEADS (it imports torch)
RESNET_OUTPUT_STRIDES = (8, 32)
PRECISIONS = ("fp32", "bf16")
MACHINES = ("cuda", "cpu")
MACHINE_KEYS = ("input_size", "warmup", "test_images", "train_steps")
# What a measurement record holds besides its rows (the table's header is made of them).
RECORD_KEYS = ("device", "device_name", "threads", "torch", "num_classes", "batch_size", "precision", "model_scale",
               "commit", *MACHINE_KEYS)
# What the probe records of each row's timing besides the metrics (wall and CPU seconds).
TIMING_KEYS = ("test_seconds", "train_seconds", "test_cpu_seconds", "train_cpu_seconds")
ROW_ID = re.compile(r"^[A-Za-z0-9_]+$")
# Two figures closer than this (relative) are not told apart: on the 2-core test CPU, runs of both
# tables with the cores to themselves gave timings up to 24 % apart (most within 15 %), peak memory
# within 2 %.
NOISE = 0.10
# A row whose threads ran less than this share of the timed wall time shared the cores with other
# processes: its timings are slower than on an idle machine.
BUSY_SHARE = 0.9


def efficiency_path(table: str) -> Path:
    """The measurements of an efficiency table's rows."""
    return paths.RESULTS / "efficiency" / f"{table}.json"


# ----------------------------------------------------------------------------- the spec

def check_efficiency_spec(where: str, spec: dict) -> None:
    """Validate a table of kind `efficiency` eagerly (at DAG-build time), one line per problem."""
    if not isinstance(spec.get("title"), str) or not spec["title"]:
        raise SegreproError(f"{where}: missing 'title'")
    metrics = spec.get("metrics")
    if not isinstance(metrics, list) or not metrics or any(m not in METRICS for m in metrics):
        raise SegreproError(f"{where}: 'metrics' must be a non-empty list of {', '.join(METRICS)}, got {metrics!r}")
    if len(set(metrics)) != len(metrics):
        raise SegreproError(f"{where}: 'metrics' lists a metric twice: {metrics}")
    _check_settings(where, spec.get("efficiency"))

    rows = spec.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SegreproError(f"{where}: 'rows' must be a non-empty list")
    ids = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SegreproError(f"{where}: row {i + 1} must be a mapping")
        for field in ("id", "label", "experiment"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise SegreproError(f"{where}: row {i + 1} has no '{field}'")
        name = f"{where}: row '{row['id']}'"
        if not ROW_ID.match(row["id"]) or row["id"] in ids:
            raise SegreproError(f"{name}: the id must be unique and made of letters, digits and '_'")
        ids.add(row["id"])
        if row.get("protocol", "ss") != "ss":
            raise SegreproError(f"{name}: only the single-scale test pass is timed: protocol must be 'ss'")
        head = row.get("head")
        if head is not None and head not in COMPARISON_HEADS:
            raise SegreproError(f"{name}: unknown head {head!r} (known: {', '.join(COMPARISON_HEADS)})")
        stride = row.get("resnet_output_stride")
        if stride is not None and (stride not in RESNET_OUTPUT_STRIDES or head is None):
            raise SegreproError(f"{name}: 'resnet_output_stride' must be 8 or 32 and needs a 'head' "
                                "(SaF's own model has no plain-ResNet extractor)")
        paper = row.get("paper") or {}
        if not isinstance(paper, dict):
            raise SegreproError(f"{name}: 'paper' must be a mapping of metric to number")
        for metric, value in paper.items():
            if metric not in METRICS:
                raise SegreproError(f"{name}: paper metric {metric!r} is not one of {', '.join(METRICS)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SegreproError(f"{name}: paper {metric} is not a positive number: {value!r}")
    reference = spec["efficiency"].get("reference", rows[0]["id"])
    if reference not in ids:
        raise SegreproError(f"{where}: efficiency.reference {reference!r} is not a row id")

    claims = spec.get("claims") or []
    if not isinstance(claims, list):
        raise SegreproError(f"{where}: 'claims' must be a list")
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise SegreproError(f"{where}: claim {i + 1} needs a 'claim' text")
        text = claim["claim"]
        if claim.get("metric") not in metrics:
            raise SegreproError(f"{where}: claim {text!r} needs a 'metric' among the table's {metrics}")
        better, than = claim.get("better"), claim.get("than")
        if "best" in claim or not isinstance(better, list) or not isinstance(than, list) or not better \
                or len(better) != len(than):
            raise SegreproError(f"{where}: claim {text!r} needs 'better' and 'than' lists of row ids of equal length")
        for ref in better + than:
            if ref not in ids:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row id")


def _check_settings(where: str, settings) -> None:
    if not isinstance(settings, dict):
        raise SegreproError(f"{where}: an efficiency table needs an 'efficiency' mapping")
    if not isinstance(settings.get("paper_device"), str) or not settings["paper_device"]:
        raise SegreproError(f"{where}: efficiency.paper_device must name the paper's device")
    for key in ("num_classes", "batch_size"):
        if not _positive_int(settings.get(key)):
            raise SegreproError(f"{where}: efficiency.{key} must be a positive integer")
    if settings.get("precision") not in PRECISIONS:
        raise SegreproError(f"{where}: efficiency.precision must be one of {', '.join(PRECISIONS)}")
    model_scale = settings.get("model_scale", {})
    if not isinstance(model_scale, dict) or not all(isinstance(v, str) for v in model_scale.values()):
        raise SegreproError(f"{where}: efficiency.model_scale must map a scale to the scale whose models it times")
    for machine in MACHINES:
        values = settings.get(machine)
        if not isinstance(values, dict) or set(values) != set(MACHINE_KEYS):
            raise SegreproError(f"{where}: efficiency.{machine} needs exactly {', '.join(MACHINE_KEYS)}")
        if not all(_positive_int(values[key]) for key in MACHINE_KEYS) or values["input_size"] % 32:
            raise SegreproError(f"{where}: efficiency.{machine}: positive integers, input_size a multiple of 32")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_scale(spec: dict, scale: str) -> str:
    """The scale whose models a run at `scale` times (the demo scale times the paper's)."""
    return spec["efficiency"].get("model_scale", {}).get(scale, scale)


# ----------------------------------------------------------------------------- measuring

def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def row_jobs(params, name: str, scale: str, device: str, threads: int | None) -> dict[str, dict]:
    """The probe's job for each row (by id): the model as built at the model scale, without
    pretrained weights (random init: nothing is downloaded), and the machine's settings."""
    paper, spec = params.table(name)
    if spec.get("kind") != "efficiency":
        raise SegreproError(f"table '{name}' is not of kind 'efficiency': it has nothing to time")
    settings = spec["efficiency"]
    models_at = model_scale(spec, scale)
    params.scale(scale)
    machine = settings["cuda" if device.startswith("cuda") else "cpu"]
    jobs = {}
    for row in spec["rows"]:
        config = params.resolve(paper, row["experiment"], models_at)
        model = dict(config["model"], backbone=dict(config["model"]["backbone"], pretrained=False))
        jobs[row["id"]] = {
            "model": model, "head": row.get("head"), "resnet_output_stride": row.get("resnet_output_stride"),
            "num_classes": settings["num_classes"], "batch_size": settings["batch_size"],
            "precision": settings["precision"], "train": config["train"], "device": device,
            "threads": threads, **machine,
        }
    return jobs


def run_probe(job: dict, where: str) -> dict:
    """One row's measurement, in a fresh process; its failure becomes one line."""
    result = subprocess.run([sys.executable, "-m", PROBE], input=json.dumps(job), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise SegreproError(f"{where}: the measurement failed: {lines[-1].removeprefix('segrepro: error: ')}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_table(params, name: str, scale: str, device: str | None = None, threads: int | None = None) -> dict:
    """Time every row of an efficiency table; the record segrepro.efficiency writes as JSON."""
    device = device or _default_device()
    jobs = row_jobs(params, name, scale, device, threads)
    _, spec = params.table(name)
    rows = {}
    for row in spec["rows"]:
        job = jobs[row["id"]]
        began = time.monotonic()
        measured = run_probe(job, f"table '{name}', row '{row['id']}'")
        rows[row["id"]] = dict(measured, experiment=row["experiment"], head=job["head"],
                               resnet_output_stride=job["resnet_output_stride"],
                               backbone=job["model"]["backbone"]["name"], seconds=time.monotonic() - began)
        print(f"{name}/{row['id']}: {measured['test_fps']:.3g} FPS, {measured['train_its']:.3g} it/s, "
              f"{measured['train_mem_gb']:.3g} G ({rows[row['id']]['seconds']:.0f} s)", flush=True)
    first = next(iter(rows.values()))
    settings = spec["efficiency"]
    machine = "cuda" if device.startswith("cuda") else "cpu"
    return {
        "table": name, "scale": scale, "model_scale": model_scale(spec, scale), "device": device,
        "device_name": first["device_name"], "threads": first["threads"], "torch": first["torch"],
        "num_classes": settings["num_classes"], "batch_size": settings["batch_size"],
        "precision": settings["precision"] if machine == "cuda" else "fp32", **settings[machine],
        "commit": git_commit(), "rows": rows,
    }


def cmd_efficiency(params, args) -> None:
    """`segrepro efficiency NAME [--scale] [--device] [--threads] [--out]`."""
    scale = args.scale or params.workflow["scale"]
    out = args.out or efficiency_path(args.name)
    record = measure_table(params, args.name, scale, args.device, args.threads)
    atomic.write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- the table

def load_record(name: str, path: Path, scale: str) -> dict:
    """The measurements of a table at `scale`; the error says which command makes them."""
    path = Path(path)
    again = f"run `segrepro efficiency {name} --scale {scale}`"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegreproError(f"{path}: no measurements ({again})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegreproError(f"{path} is unreadable or not valid JSON: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("rows"), dict):
        raise SegreproError(f"{path} holds no row measurements ({again})")
    if record.get("table") != name or record.get("scale") != scale:
        raise SegreproError(f"{path} measures table {record.get('table')!r} at scale {record.get('scale')!r} ({again})")
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        raise SegreproError(f"{path} lacks {', '.join(missing)} ({again})")
    return record


def _fmt(value) -> str:
    return MISSING if value is None else f"{value:.3g}"


def _fmt_ratio(value) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _values(name: str, spec: dict, record: dict) -> tuple[dict, dict]:
    """Ours and the paper's value of every (row id, metric); the paper's may be None."""
    ours, paper = {}, {}
    for row in spec["rows"]:
        measured = record["rows"].get(row["id"])
        if not isinstance(measured, dict):
            raise SegreproError(f"table {name!r}: no measurement of row {row['id']!r} (run `segrepro efficiency {name}`)")
        missing = [key for key in TIMING_KEYS if not isinstance(measured.get(key), (int, float))]
        if missing:
            raise SegreproError(f"table {name!r}: the measurement of row {row['id']!r} lacks {', '.join(missing)}")
        ours[row["id"]], paper[row["id"]] = {}, {}
        for metric in spec["metrics"]:
            value = measured.get(metric)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SegreproError(f"table {name!r}: row {row['id']!r}: {metric} is not a positive number: {value!r}")
            ours[row["id"]][metric] = float(value)
            reported = (row.get("paper") or {}).get(metric)
            paper[row["id"]][metric] = None if reported is None else float(reported)
    return ours, paper


def _ratio(values: dict, row: str, reference: str, metric: str):
    value, base = values[row][metric], values[reference][metric]
    return None if value is None or base is None else value / base


def _judge_claim(claim: dict, ours: dict, paper: dict, labels: dict) -> str:
    """One Markdown line: the verdict, our numbers, and whether the paper's numbers agree."""
    metric = claim["metric"]
    display, higher_is_better = METRICS[metric]

    def better(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    holds, close, parts = True, False, []
    for b, t in zip(claim["better"], claim["than"]):
        x, y = ours[b][metric], ours[t][metric]
        ok = better(x, y)
        holds = holds and ok
        close = close or abs(x - y) < NOISE * max(x, y)
        relation = (">" if ok else "≤") if higher_is_better else ("<" if ok else "≥")
        parts.append(f"{labels[b]} {_fmt(x)} {relation} {labels[t]} {_fmt(y)}")
    reported = [(paper[b][metric], paper[t][metric]) for b, t in zip(claim["better"], claim["than"])]
    if any(x is None or y is None for x, y in reported):
        note = "paper's numbers: incomplete"
    else:
        note = "paper's numbers agree" if all(better(x, y) for x, y in reported) else "paper's numbers disagree"
    # The timing's own noise band instead of an interval: within it the rows are not told apart.
    verdict = NOT_TOLD_APART if close else REPRODUCED if holds else CONTRADICTED
    mark = f" [within {NOISE:.0%}, the timing noise]" if close else ""
    return verdict_line(claim["claim"], verdict, f"{display}: {'; '.join(parts)}{mark}", note)


def header_lines(name: str, spec: dict, record: dict) -> list[str]:
    """What was measured where: device, input, batch, precision, memory measure, models."""
    settings = spec["efficiency"]
    cuda = str(record["device"]).startswith("cuda")
    size = record["input_size"]
    reported = spec.get("reported_protocol")
    backbones = ", ".join(dict.fromkeys(row["backbone"] for row in record["rows"].values()))
    if cuda:
        memory = ("the peak memory torch's CUDA allocator reserved during the training steps"
                  " (allocated, the tensors' own peak, is in the CSV; the CUDA context is not counted)")
        precision = f"{record['precision']} (cuDNN's default TF32 convolutions)" if record["precision"] == "fp32" \
            else f"{record['precision']} autocast, as the trainer"
    else:
        before = [row.get("rss_before_model_gb") for row in record["rows"].values()]
        if not all(isinstance(value, (int, float)) for value in before):
            raise SegreproError(f"table {name!r}: a CPU measurement lacks rss_before_model_gb")
        low, high = f"{min(before):.2f}", f"{max(before):.2f}"
        held = low if low == high else f"{low}–{high}"
        memory = ("the peak resident set size of a fresh process per row, less what the process held before"
                  f" the model was built ({held} G: the interpreter and the libraries; the whole peak is in the CSV)")
        precision = "fp32"
    threads = f"{record['threads']} torch thread" + ("s" if record["threads"] != 1 else "")
    device = "GPU" if cuda else f"CPU, {threads}"
    smaller = "" if cuda else " (a CPU times a smaller input than the paper's GPU)"
    shares = [] if cuda else [cpu_share(row, record["threads"]) for row in record["rows"].values()]
    return [
        f"# {name}: {spec['title']}",
        "",
        f"- Device: {record['device_name']} ({device}); the paper's: {settings['paper_device']}",
        f"- Input: {size}×{size} random images{smaller}, {record['num_classes']} classes",
        f"- Testing: batch 1, FPS over {record['test_images']} images after {record['warmup']} warm-up ones",
        f"- Training: batch {record['batch_size']}, it/s over {record['train_steps']} steps after"
        f" {record['warmup']} warm-up ones (the trainer's step: forward, loss, backward, SGD update)",
        f"- Precision: {precision}",
        f"- Memory (G = 2^30 bytes): {memory}",
        *([_share_line(shares)] if shares else []),
        f"- Models: as built at scale '{record['model_scale']}' ({backbones}), random init; table scale"
        f" '{record['scale']}'; torch {record['torch']}",
        f"- Commit: {record['commit']}",
        *([""] + [f"Paper: {reported}."] if reported else []),
    ]


def cpu_share(row: dict, threads: int) -> float:
    """The share of the timed wall time a CPU row's threads were running (1: the cores were its own)."""
    cpu = row["test_cpu_seconds"] + row["train_cpu_seconds"]
    return cpu / ((row["test_seconds"] + row["train_seconds"]) * threads)


def _share_line(shares: list[float]) -> str:
    line = f"- CPU share while timed: {min(shares):.0%}–{max(shares):.0%} of the threads' time per row"
    if min(shares) < BUSY_SHARE:
        line += " (other processes shared the cores: those rows' timings are slower than on an idle machine)"
    return line


def build_efficiency_table(name: str, spec: dict, record: dict) -> tuple[str, pd.DataFrame]:
    """The Markdown table (paper, ours, and both relative to the reference row, per metric) with
    its claims, and the CSV's frame."""
    check_efficiency_spec(f"table {name!r}", spec)
    metrics = spec["metrics"]
    ours, paper = _values(name, spec, record)
    labels = {row["id"]: row["label"] for row in spec["rows"]}
    reference = spec["efficiency"].get("reference", spec["rows"][0]["id"])

    columns = ["Method"]
    for metric in metrics:
        display = METRICS[metric][0]
        columns += [f"{display} paper", f"{display} measured", f"{display} paper rel.", f"{display} measured rel."]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + [":---:"] * (len(columns) - 1)) + "|"]
    records = []
    for row in spec["rows"]:
        key, measured = row["id"], record["rows"][row["id"]]
        cells = [_cell(row["label"])]
        entry = {"id": key, "label": row["label"], "experiment": row["experiment"], "head": row.get("head") or "",
                 "resnet_output_stride": row.get("resnet_output_stride") or "", "backbone": measured.get("backbone"),
                 "params_m": measured.get("params_m")}
        for metric in metrics:
            paper_rel, ours_rel = _ratio(paper, key, reference, metric), _ratio(ours, key, reference, metric)
            cells += [_fmt(paper[key][metric]), _fmt(ours[key][metric]), _fmt_ratio(paper_rel), _fmt_ratio(ours_rel)]
            entry.update({f"{metric}_paper": paper[key][metric], f"{metric}_ours": ours[key][metric],
                          f"{metric}_paper_rel": paper_rel, f"{metric}_ours_rel": ours_rel})
        for extra in ("train_mem_allocated_gb", "peak_rss_gb", "rss_before_model_gb"):
            if extra in measured:
                entry[extra] = measured[extra]
        entry.update({key_: record[key_] for key_ in ("device", "device_name", "threads", "input_size", "batch_size",
                                                     "precision", "scale", "model_scale")})
        records.append(entry)
        lines.append("| " + " | ".join(cells) + " |")

    text = header_lines(name, spec, record) + ["", *lines, "",
                                               f"rel.: divided by the row '{_cell(labels[reference])}' of the same"
                                               " device; it is what compares across devices."]
    claims = spec.get("claims") or []
    if claims:
        text += ["", "## Claims", ""] + [_judge_claim(claim, ours, paper, labels) for claim in claims]
    import pandas as pd  # not at the top: the workflow imports this module while it builds its DAG

    return "\n".join(text) + "\n", pd.DataFrame.from_records(records)


def write_efficiency_table(params, name: str, spec: dict, scale: str, out: Path) -> None:
    """results/tables/NAME.md (and .csv) from results/efficiency/NAME.json."""
    record = load_record(name, efficiency_path(name), scale)
    text, frame = build_efficiency_table(name, spec, record)
    write_table(out, text, frame)
