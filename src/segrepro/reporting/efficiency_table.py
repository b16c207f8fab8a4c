"""The Markdown of SaF's efficiency tables (Sec. 5.3, Table 5; App. D, Table B), from the
measurements segrepro.measure.efficiency wrote: each row's figures beside the paper's, also divided
by a reference row (the first, or `efficiency.reference`), since timings depend on the device while
those ratios compare across devices. Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from segrepro.config.efficiency_spec import MACHINE_KEYS, METRICS
from segrepro.config.table_specs import check_table_spec
from segrepro.core import paths
from segrepro.core.errors import SegreproError
from segrepro.reporting.markdown import (
    CONTRADICTED,
    NOT_TOLD_APART,
    REPRODUCED,
    claim_line,
    claim_record,
    claims_document,
    escape_cell,
    fmt_ratio,
    fmt_sig,
    pair_record,
    write_files,
)

if TYPE_CHECKING:
    import pandas as pd

# What a measurement record holds besides its rows (the table's header is made of them).
RECORD_KEYS = ("device", "device_name", "threads", "torch", "num_classes", "batch_size", "precision", "model_scale",
               "commit", *MACHINE_KEYS)
# What the probe records of each row's timing besides the metrics (wall and CPU seconds).
TIMING_KEYS = ("test_seconds", "train_seconds", "test_cpu_seconds", "train_cpu_seconds")
# Two figures closer than this (relative) are not told apart: on the 2-core test CPU, runs of both
# tables with the cores to themselves gave timings up to 24 % apart (most within 15 %), peak memory
# within 2 %.
NOISE = 0.10
# A row whose threads ran less than this share of the timed wall time shared the cores with other
# processes: its timings are slower than on an idle machine.
BUSY_SHARE = 0.9


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


def _values(name: str, spec: dict, record: dict) -> tuple[dict, dict]:
    """Ours and the paper's value of every (row id, metric); the paper's may be None."""
    ours, paper = {}, {}
    for row in spec["rows"]:
        measured = record["rows"].get(row["id"])
        if not isinstance(measured, dict):
            raise SegreproError(
                f"table {name!r}: no measurement of row {row['id']!r} (run `segrepro efficiency {name}`)")
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


def _judge_claim(claim: dict, ours: dict, paper: dict, labels: dict) -> dict:
    """The verdict, our numbers, and whether the paper's numbers agree (markdown.claim_record);
    its pairs have no interval: the timing noise band decides instead."""
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
        parts.append(f"{labels[b]} {fmt_sig(x)} {relation} {labels[t]} {fmt_sig(y)}")
    reported = [(paper[b][metric], paper[t][metric]) for b, t in zip(claim["better"], claim["than"])]
    if any(x is None or y is None for x, y in reported):
        note = "paper's numbers: incomplete"
    else:
        note = "paper's numbers agree" if all(better(x, y) for x, y in reported) else "paper's numbers disagree"
    # The timing's own noise band instead of an interval: within it the rows are not told apart.
    verdict = NOT_TOLD_APART if close else REPRODUCED if holds else CONTRADICTED
    mark = f" [within {NOISE:.0%}, the timing noise]" if close else ""
    pairs = [pair_record(b, t, metric, ours[b][metric], ours[t][metric])
             for b, t in zip(claim["better"], claim["than"])]
    return claim_record(claim["claim"], verdict, f"{display}: {'; '.join(parts)}{mark}", note, pairs,
                        basis=["timing noise"], noise=NOISE)


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


def build_efficiency_table(name: str, spec: dict, record: dict) -> tuple[str, pd.DataFrame, list[dict]]:
    """The Markdown table (paper, ours, and both relative to the reference row, per metric) with
    its claims, the CSV's frame, and the judged claims as data (markdown.claim_record)."""
    check_table_spec(name, spec)
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
        cells = [escape_cell(row["label"])]
        entry = {"id": key, "label": row["label"], "experiment": row["experiment"], "head": row.get("head") or "",
                 "resnet_output_stride": row.get("resnet_output_stride") or "", "backbone": measured.get("backbone"),
                 "params_m": measured.get("params_m")}
        for metric in metrics:
            paper_rel, ours_rel = _ratio(paper, key, reference, metric), _ratio(ours, key, reference, metric)
            cells += [fmt_sig(paper[key][metric]), fmt_sig(ours[key][metric]),
                      fmt_ratio(paper_rel), fmt_ratio(ours_rel)]
            entry.update({f"{metric}_paper": paper[key][metric], f"{metric}_ours": ours[key][metric],
                          f"{metric}_paper_rel": paper_rel, f"{metric}_ours_rel": ours_rel})
        for extra in ("train_mem_allocated_gb", "peak_rss_gb", "rss_before_model_gb"):
            if extra in measured:
                entry[extra] = measured[extra]
        entry.update({key_: record[key_] for key_ in ("device", "device_name", "threads", "input_size", "batch_size",
                                                     "precision", "scale", "model_scale")})
        records.append(entry)
        lines.append("| " + " | ".join(cells) + " |")

    text = header_lines(name, spec, dict(record, commits=[record["commit"]])) + [
        "", *lines, "",
        f"rel.: divided by the row '{escape_cell(labels[reference])}' of the same"
        " device; it is what compares across devices."]
    judged = [_judge_claim(claim, ours, paper, labels) for claim in spec.get("claims") or []]
    if judged:
        text += ["", "## Claims", ""] + [claim_line(claim) for claim in judged]
    import pandas as pd  # not at the top: the workflow imports this module while it builds its DAG

    return "\n".join(text) + "\n", pd.DataFrame.from_records(records), judged


def write_efficiency_table(params, name: str, spec: dict, scale: str, out: Path) -> None:
    """results/tables/NAME.md (and .csv) from results/efficiency/NAME.json."""
    record = load_record(name, paths.efficiency_path(name), scale)
    text, frame, judged = build_efficiency_table(name, spec, record)
    rule = (f"Measured on one machine, no interval: two figures within {NOISE:.0%} of each other, the timing"
            " noise, are not told apart.")
    write_files(out, text, frame, claims_document(name, spec, scale, [], judged, rule if judged else None,
                                                  device=record["device_name"], commits=[record["commit"]]))
