"""Paper tables: our numbers beside the paper's, plus a verdict for each of the paper's claims.

A table spec comes from the `tables:` section of a paper's YAML (see params/papers/pspnet.yaml).
A row is one (experiment, test protocol) pair; a claim refers to rows by `experiment` or
`experiment@protocol`, a bare experiment meaning protocol `ss`. A row with `test_server` is a
number only a benchmark's server can compute (SaF Table 2, HFGD Table 14): it reads the submission
zip of segrepro.submit instead of a metrics file and shows where to upload it, with no Δ or claim.

Kept free of torch on purpose: the workflow imports this module while it builds its DAG; pandas is
imported where a frame is made, since every job that loads params/ imports this module too.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segrepro.atomic import write_text
from segrepro.errors import SegreproError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PROTOCOL = "ss"
DEFAULT_CLAIM_METRIC = "miou"
METRIC_NAMES = {"miou": "mIoU (%)", "pixel_acc": "Pixel Acc. (%)", "gmacs": "GMACs", "score": "Score (%)"}
LOWER_IS_BETTER = {"gmacs"}
FLOPS_TOLERANCE = 0.03  # a count further than this from the paper's must say why
MISSING = "–"  # en dash, for a number the paper does not give
MINUS = "−"  # the real minus sign, so that "−0.45" lines up with "+1.23"
ABSENT_MARK = "⚠"  # opens the note on an evaluated split that lacks a class (segrepro.evaluate)
HEADER_KEYS = ("dataset", "scale", "backbone", "iterations", "seeds")
TEST_SERVER_FORMATS = ("ade20k_sceneparsing", "cityscapes")  # the keys of segrepro.submit.SERVERS
SUBMISSION_KEY = "segrepro_submission"  # marks segrepro.submit's manifest in a zip's comment


def row_key(experiment: str, protocol: str) -> str:
    """The key of one table row in the `results` mapping: "exp@protocol"."""
    return f"{experiment}@{protocol}"


def parse_ref(ref: str) -> tuple[str, str]:
    """Split a claim's ref into (experiment, protocol); a bare experiment means protocol `ss`."""
    experiment, sep, protocol = str(ref).partition("@")
    if not sep:
        protocol = DEFAULT_PROTOCOL
    if not experiment or not protocol or "@" in protocol:
        raise SegreproError(f"malformed row reference {ref!r} (expected 'experiment' or 'experiment@protocol')")
    return experiment, protocol


def metric_name(metric: str) -> str:
    """The display name of a metric; an unknown metric shows under its own key."""
    return METRIC_NAMES.get(metric, metric)


def is_test_server(row: dict) -> bool:
    return bool(row.get("test_server"))


def table_row_keys(spec: dict) -> list[str]:
    """The row keys of a table, in row order (what the workflow must compute for it)."""
    return [row_key(row["experiment"], row.get("protocol", DEFAULT_PROTOCOL)) for row in spec["rows"]]


def check_table_spec(name: str, spec: dict) -> None:
    """Validate one table spec eagerly, so a typo fails at DAG-build time and not after training."""
    where = f"table {name!r}"
    if not isinstance(spec, dict):
        raise SegreproError(f"{where}: the spec must be a mapping, got {type(spec).__name__}")
    if spec.get("kind") == "efficiency":
        # segrepro.efficiency is torch-free, as this module must be.
        from segrepro.efficiency import check_efficiency_spec

        check_efficiency_spec(where, spec)
        return
    if not isinstance(spec.get("title"), str) or not spec["title"]:
        raise SegreproError(f"{where}: missing 'title'")
    metrics = spec.get("metrics")
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise SegreproError(f"{where}: 'metrics' must be a non-empty list of metric names")
    if len(set(metrics)) != len(metrics):
        raise SegreproError(f"{where}: 'metrics' lists a metric twice: {metrics}")

    rows = spec.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SegreproError(f"{where}: 'rows' must be a non-empty list")
    keys = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SegreproError(f"{where}: row {i + 1} must be a mapping")
        for field in ("label", "experiment"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise SegreproError(f"{where}: row {i + 1} has no '{field}'")
        protocol = row.get("protocol", DEFAULT_PROTOCOL)
        if not isinstance(protocol, str) or not protocol or "@" in protocol or "@" in row["experiment"]:
            raise SegreproError(f"{where}: row {row['label']!r} has a bad experiment or protocol")
        key = row_key(row["experiment"], protocol)
        if key in keys:
            # A claim's ref must point at exactly one row.
            raise SegreproError(f"{where}: row {key!r} appears twice")
        keys.add(key)
        paper = row.get("paper", {}) or {}
        if not isinstance(paper, dict):
            raise SegreproError(f"{where}: row {row['label']!r}: 'paper' must be a mapping of metric to number")
        for metric, value in paper.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SegreproError(f"{where}: row {row['label']!r}: paper {metric} is not a number: {value!r}")
        if "test_server" in row:
            _check_test_server(where, row)

    _check_grid(where, spec)
    server_rows = {table_row_keys({"rows": [row]})[0] for row in rows if is_test_server(row)}
    if server_rows and (spec.get("grid") or spec.get("flops") or spec.get("kind", "rows") != "rows"):
        raise SegreproError(f"{where}: test-server rows only go in a plain table (no grid, flops or level_matrix)")
    if spec.get("kind", "rows") == "level_matrix":
        if len(rows) != 1:
            raise SegreproError(f"{where}: a level_matrix table analyses exactly one experiment, got {len(rows)} rows")
        matrix = spec.get("paper_matrix") or []
        if any(len(row) != len(matrix) for row in matrix):
            raise SegreproError(f"{where}: 'paper_matrix' must be square (one row and column per level)")

    claims = spec.get("claims", []) or []
    if not isinstance(claims, list):
        raise SegreproError(f"{where}: 'claims' must be a list")
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise SegreproError(f"{where}: claim {i + 1} needs a 'claim' text")
        text = claim["claim"]
        metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
        if metric not in metrics:
            raise SegreproError(f"{where}: claim {text!r} uses metric {metric!r}, not among the table's metrics {metrics}")
        if "best" in claim:
            if "better" in claim or "than" in claim:
                raise SegreproError(f"{where}: claim {text!r} mixes 'best' with 'better'/'than'")
            if len(rows) < 2:
                raise SegreproError(f"{where}: claim {text!r} needs at least two rows to pick a best one")
            refs = [claim["best"]]
        else:
            better, than = claim.get("better"), claim.get("than")
            if not isinstance(better, list) or not isinstance(than, list) or not better:
                raise SegreproError(f"{where}: claim {text!r} needs either 'best' or non-empty 'better' and 'than' lists")
            if len(better) != len(than):
                raise SegreproError(
                    f"{where}: claim {text!r} has {len(better)} 'better' refs but {len(than)} 'than' refs"
                )
            refs = better + than
        for ref in refs:
            try:
                key = row_key(*parse_ref(ref))
            except SegreproError as err:
                raise SegreproError(f"{where}: claim {text!r}: {err}") from None
            if key not in keys:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row of the table")
            if key in server_rows:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, a test-server row: only the server knows its score")


def _check_test_server(where: str, row: dict) -> None:
    server = row["test_server"]
    if not isinstance(server, dict) or set(server) != {"name", "url", "format"} or not all(
            isinstance(v, str) and v for v in server.values()):
        raise SegreproError(f"{where}: row {row['label']!r}: 'test_server' needs exactly 'name', 'url' and 'format'")
    if server["format"] not in TEST_SERVER_FORMATS:
        raise SegreproError(f"{where}: row {row['label']!r}: unknown test-server format {server['format']!r} "
                            f"(known: {', '.join(TEST_SERVER_FORMATS)})")


def _check_grid(where: str, spec: dict) -> None:
    """A grid view needs every row to name one distinct (grid row, grid column) cell."""
    grid = spec.get("grid")
    if grid is None:
        return
    taken = set()
    for row in spec["rows"]:
        cell = tuple(row.get("cell") or ())
        if len(cell) != 2 or cell[0] not in grid["rows"] or cell[1] not in grid["columns"]:
            raise SegreproError(
                f"{where}: row {row['label']!r} needs a 'cell' [grid row, grid column] from "
                f"{grid['rows']} x {grid['columns']}, got {list(cell)}"
            )
        if cell in taken:
            raise SegreproError(f"{where}: two rows fill grid cell {list(cell)}")
        taken.add(cell)


def _grid_lines(spec: dict, stats: dict, paper: dict, order: list[str]) -> list[str]:
    """The table as the paper prints it: one cell per row of the spec, "reproduced (paper)"."""
    grid, metric = spec["grid"], spec["metrics"][0]
    cells = {tuple(row["cell"]): key for row, key in zip(spec["rows"], order)}
    lines = [
        f"{metric_name(metric)}, reproduced (paper):",
        "",
        "| | " + " | ".join(_cell(c) for c in grid["columns"]) + " |",
        "|---|" + ":---:|" * len(grid["columns"]),
    ]
    for grid_row in grid["rows"]:
        values = []
        for column in grid["columns"]:
            key = cells.get((grid_row, column))
            if key is None:
                values.append(MISSING)
                continue
            experiment = key.split("@")[0]
            values.append(f"{experiment}: {_fmt(stats[key][metric][0])} ({_fmt(paper[key].get(metric))})")
        lines.append(f"| {_cell(grid_row)} | " + " | ".join(values) + " |")
    return lines + [""]


def _fmt(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.2f}"


def _fmt_delta(value: float) -> str:
    if value is None or math.isnan(value):
        return MISSING
    text = f"{abs(value):.2f}"
    if text == "0.00":
        return text  # no sign on a difference that rounds to nothing
    return ("+" if value > 0 else MINUS) + text


def _fmt_header_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _short_ref(experiment: str, protocol: str) -> str:
    # Claims name rows the way the YAML does: the protocol only when it is not the default.
    return experiment if protocol == DEFAULT_PROTOCOL else row_key(experiment, protocol)


def _metric_values(name: str, key: str, runs: list[dict], metrics: list[str]) -> dict[str, list[float]]:
    """Each metric's value in every run (seed) of one row, checked to be a finite number."""
    values = {}
    for metric in metrics:
        values[metric] = []
        for run in runs:
            if metric == "score" and metric not in run and all(
                    isinstance(run.get(m), (int, float)) for m in ("miou", "pixel_acc")):
                # The Scene Parsing Benchmark's score: (pixel accuracy + mean IoU) / 2
                # (CSAILVision/sceneparsing README, "Evaluation routines").
                run = dict(run, score=(run["miou"] + run["pixel_acc"]) / 2)
            if metric not in run:
                raise SegreproError(f"table {name!r}: row {key!r}: a result (seed {run.get('seed', '?')}) has no {metric!r}")
            value = run[metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                # A NaN or a string here means a broken run; better to stop than to print "nan".
                raise SegreproError(f"table {name!r}: row {key!r}: {metric} is not a finite number: {value!r}")
            values[metric].append(float(value))
    return values


def _seed_stats(values: dict[str, list[float]]) -> dict[str, tuple[float, float, int]]:
    """(mean, sample std, n) per metric over the seeds of one row; std is NaN with a single seed."""
    stats = {}
    for metric, per_seed in values.items():
        arr = np.asarray(per_seed, dtype=float)
        std = float(arr.std(ddof=1)) if len(arr) > 1 else float("nan")
        stats[metric] = (float(arr.mean()), std, len(arr))
    return stats


# The three verdicts of a claim (segrepro.bootstrap gives each difference its 95 % interval):
# reproduced when every difference the claim rests on lies on the paper's side of zero,
# contradicted when one lies on the other side, not told apart otherwise.
REPRODUCED = "✅ reproduced"
CONTRADICTED = "❌ contradicted"
NOT_TOLD_APART = "➖ not told apart"
VERDICTS = (REPRODUCED, CONTRADICTED, NOT_TOLD_APART)
# The run-to-run spread of one recipe on one benchmark, in mIoU points: the same config retrained
# differs by about 1 (open-mmlab/mmsegmentation#2196: Segmenter ViT-T on ADE20K, 39.99 in the
# model zoo vs 38.83 in the maintainers' regression run; Visual-Attention-Network/SegNeXt#48:
# 1-2 mIoU across seeds, ADE20K the most variable benchmark). A paper's own difference smaller
# than this cannot separate its rows either.
PAPER_MARGIN = 1.0
MARGIN_METRICS = {"miou", "score"}
NOT_DECISIVE = "not decisive in the paper"
CLAIMS_NOTE = (
    "Δ ± h: the difference of the two rows' reproduced means with the half-width of its 95 % interval, "
    "over the test images (paired bootstrap, 1,000 resamples) and the seeds (their spread, pooled over the "
    f"table's rows). {REPRODUCED}: every interval lies on the paper's side of zero; {CONTRADICTED}: one lies "
    f"on the other side; {NOT_TOLD_APART}: otherwise. A paper's own margin under {PAPER_MARGIN:g} mIoU, the "
    f"usual run-to-run spread of one recipe, is marked {NOT_DECISIVE}."
)
_VERDICT_WORDS = "|".join(re.escape(v) for v in VERDICTS)
_CLAIM_LINE = re.compile(
    rf"^- (?P<verdict>{_VERDICT_WORDS}): (?P<claim>.*?) — (?P<evidence>.*) \((?P<paper>[^()]*)\)$"
)
# Why an interval is weaker than images and seeds together (segrepro.bootstrap's bases).
_BASIS_REMARKS = {
    "images": "one seed: the intervals count the test images, not the run-to-run spread",
    "seeds": "no per-image statistics (metrics written before they were stored): the intervals count the seeds only",
    "none": "no interval: one seed and no per-image statistics (metrics written before they were stored)",
}


def verdict_of(intervals: list) -> str:
    """The verdict on intervals of differences oriented so that > 0 is the paper's side
    (segrepro.bootstrap.Interval); a difference without an interval can only leave a claim ➖."""
    if any(iv.half_width is not None and iv.high < 0 for iv in intervals):
        return CONTRADICTED
    if intervals and all(iv.half_width is not None and iv.low > 0 for iv in intervals):
        return REPRODUCED
    return NOT_TOLD_APART


def verdict_line(claim: str, verdict: str, evidence: str, paper_note: str) -> str:
    """One Markdown line of a table's Claims section: the verdict, the claim, our numbers and
    what the paper's own numbers say."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}")
    return f"- {verdict}: {claim} — {evidence} ({paper_note})"


def parse_claims(markdown: str) -> list[dict]:
    """The judged claims of a built table (its `## Claims` section), as dicts with keys verdict
    (one of the three), claim, evidence and paper; lines in another form are skipped."""
    _, found, section = markdown.partition("\n## Claims\n")
    claims = []
    for line in section.split("\n## ", 1)[0].splitlines() if found else []:
        match = _CLAIM_LINE.match(line.strip())
        if match:
            claims.append({key: match[key] for key in ("verdict", "claim", "evidence", "paper")})
    return claims


def paper_note(holds: bool | None, margin: float | None = None, metric: str = DEFAULT_CLAIM_METRIC) -> str:
    """What the paper's own numbers say; `margin`, its smallest difference on the claim's side,
    marks a claim the paper itself could not separate from run-to-run noise."""
    if holds is None:
        return "paper's numbers: incomplete"
    if not holds:
        return "paper's numbers disagree"
    if margin is not None and metric in MARGIN_METRICS and margin < PAPER_MARGIN:
        return f"paper's numbers agree by {margin:.2f}, within the run-to-run spread: {NOT_DECISIVE}"
    return "paper's numbers agree"


def fmt_interval(interval) -> str:
    """ "Δ +0.49 ± 0.83": a difference with the half-width of its interval."""
    text = f"Δ {_fmt_delta(interval.delta)}"
    if interval.basis == "exact":
        return text
    if interval.half_width is None:
        return f"{text}, no interval"
    return f"{text} ± {abs(interval.half_width):.2f}"


def basis_remark(intervals: list) -> str:
    """" [why the intervals are weaker]" where they do not count both images and seeds."""
    weaker = [_BASIS_REMARKS[iv.basis] for iv in intervals if iv.basis in _BASIS_REMARKS]
    return f" [{weaker[0]}]" if weaker else ""


def claim_pairs(claim: dict, order: list[str]) -> list[tuple[str, str]]:
    """The (better, than) row keys a claim rests on: a `best` row against every other row."""
    if "best" in claim:
        best = row_key(*parse_ref(claim["best"]))
        return [(best, key) for key in order if key != best]
    return [(row_key(*parse_ref(b)), row_key(*parse_ref(t))) for b, t in zip(claim["better"], claim["than"])]


def declared_paper_note(spec: dict, claim: dict) -> str:
    """What the paper's own numbers say about a declared claim, from the table spec alone (so a
    claim not yet run already shows whether the paper itself could separate its rows)."""
    metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    order = table_row_keys(spec)
    theirs = {key: (row.get("paper") or {}).get(metric) for row, key in zip(spec["rows"], order)}
    pairs = claim_pairs(claim, order)
    if any(theirs[k] is None for pair in pairs for k in pair):
        return paper_note(None)
    margins = [sign * (theirs[b] - theirs[t]) for b, t in pairs]
    return paper_note(all(m > 0 for m in margins), min(margins), metric)


def _judge_claim(claim: dict, samples, paper: dict, order: list[str]) -> str:
    """One Markdown line: the verdict on a claim, our evidence, and what the paper's numbers say."""
    metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
    # For a lower-is-better metric "better" is smaller: intervals are oriented by `sign`.
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    exact = metric == "gmacs"  # a count of the model, not a measurement
    theirs = {key: paper[key].get(metric) for key in order}

    def oriented(interval):
        from segrepro.bootstrap import Interval

        return Interval(sign * interval.delta, interval.half_width, interval.basis)

    def comparison(b: str, t: str):
        interval = samples.compare(b, t, metric, exact=exact)
        text = (f"{_short_ref(*b.split('@'))} {_fmt(samples.mean(b, metric))} vs "
                f"{_short_ref(*t.split('@'))} {_fmt(samples.mean(t, metric))}: {fmt_interval(interval)}")
        return oriented(interval), text

    pairs = claim_pairs(claim, order)
    if "best" in claim:
        others = [t for _, t in pairs]
        judged = [comparison(b, t) for b, t in pairs]
        # Shown: the strongest competitor (on a tie the earlier row), and any that contradicts.
        rival = max(others, key=lambda k: sign * samples.mean(k, metric))
        shown = [text for (interval, text), (_, t) in zip(judged, pairs)
                 if t == rival or interval.half_width is not None and interval.high < 0]
        evidence = "; ".join(shown)
    else:
        judged = [comparison(b, t) for b, t in pairs]
        evidence = "; ".join(text for _, text in judged)
    intervals = [interval for interval, _ in judged]

    if any(theirs[k] is None for pair in pairs for k in pair):
        paper_holds, margin = None, None
    else:
        margins = [sign * (theirs[b] - theirs[t]) for b, t in pairs]
        paper_holds, margin = all(m > 0 for m in margins), min(margins)

    if metric != DEFAULT_CLAIM_METRIC:
        evidence = f"{metric_name(metric)}: {evidence}"
    evidence += basis_remark(intervals)
    return verdict_line(claim["claim"], verdict_of(intervals), evidence, paper_note(paper_holds, margin, metric))


def _flops_lines(spec: dict, counts: dict, paper: dict, order: list[str]) -> list[str]:
    """How the computation was counted, each row's count split into backbone and head, and why a
    count more than FLOPS_TOLERANCE away from the paper's differs (the row's `flops_note`, or a
    plain statement that nobody explained it)."""
    settings = spec["flops"]
    lines = [
        "",
        f"GMACs: multiply-adds (1e9) of the test-time forward pass on one {settings['input_size']}²"
        " RGB image, counted with torch's FlopCounterMode (FLOPs / 2) on the model as built at the"
        f" '{settings.get('scale', 'paper')}' scale; the paper's counter is undocumented, its values"
        " behave like multiply-adds (fvcore/mmcv \"GFLOPs\").",
        "",
    ]
    for row, key in zip(spec["rows"], order):
        count, theirs = counts[row["experiment"]], paper[key].get("gmacs")
        ours = count["gmacs"]
        line = (f"- {row['label']}: {_fmt(ours)} = backbone {_fmt(count['backbone_gmacs'])}"
                f" + rest {_fmt(ours - count['backbone_gmacs'])}")
        size, classes = count.get("input_size", settings["input_size"]), count.get("num_classes", settings["num_classes"])
        if (size, classes) != (settings["input_size"], settings["num_classes"]):
            line += f" (counted on a {size}² image, {classes} classes)"
        if theirs is not None:
            line += f"; the paper's {_fmt(theirs)} ({_fmt_delta(100 * (ours - theirs) / theirs)} %)"
            if abs(ours - theirs) > FLOPS_TOLERANCE * theirs:
                line += ". " + (row.get("flops_note") or "Not explained.")
        lines.append(line)
    return lines


def _server_cell(server: dict, submissions: list[str]) -> str:
    files = ", ".join(f"`{path}`" for path in submissions)
    each = " (one per seed)" if len(submissions) > 1 else ""
    return f"test-server score: submit {files}{each} to [{server['name']}]({server['url']})"


def _server_notes(spec: dict, results: dict, order: list[str]) -> list[str]:
    """What a table with test-server rows says under itself: where its numbers come from, and
    when the zips are a stand-in (a dataset without an unlabelled test split)."""
    keys = [key for row, key in zip(spec["rows"], order) if is_test_server(row)]
    if not keys:
        return []
    if len(keys) == len(order):
        note = ("Every row of this table is a test-server score: the benchmark's test labels are not public,"
                " so the pipeline writes the file to upload (named in the reproduced column) and the score exists only"
                " once the server has evaluated it; there is no Δ and no claim to check.")
    else:
        note = ("Rows whose cell names a file are test-server scores: the score exists only once the"
                " server has evaluated the file; they have no Δ and no claim.")
    lines = ["", note]
    stand_ins = [run for key in keys for run in results[key] if run.get("stand_in")]
    if stand_ins:
        run = stand_ins[0]
        lines += ["", (f"At this scale dataset '{run['dataset']}' has no unlabelled test split: the zips hold"
                       f" predictions on its '{run['split']}' images, in the benchmark's file format, as a stand-in"
                       " that runs the submission step; they are not submissions.")]
    return lines


def _absent_classes(runs: list[dict]) -> list[str]:
    """The classes without a ground-truth pixel in the split any of these runs was scored on."""
    return list(dict.fromkeys(name for run in runs for name in run.get("classes_without_pixels") or []))


def _absent_notes(results: dict, order: list[str]) -> list[str]:
    """A note under the table when an evaluated split lacks a class: its IoU is undefined there
    (left out of the mean, or 0 where predicted), so the mIoU is not over every class, and a
    wrongly mapped label (a class read as ignore) would look perfect."""
    absent = list(dict.fromkeys(name for key in order for name in _absent_classes(results[key])))
    if not absent:
        return []
    splits = ", ".join(dict.fromkeys(str(run.get("split", "val")) for key in order for run in results[key]))
    rows = [key for key in order if _absent_classes(results[key])]
    which = "every row" if len(rows) == len(order) else "rows " + ", ".join(rows)
    return ["", f"{ABSENT_MARK} The evaluated split ({splits}; {which}) has no ground-truth pixel of "
                f"{', '.join(repr(n) for n in absent)}: its IoU is left out of the mIoU, or 0 where predicted; "
                "check the dataset's label mapping."]


def _cell(text: str) -> str:
    # A '|' inside a label would split the Markdown cell.
    return str(text).replace("|", "\\|")


def check_header(name: str, header: dict) -> None:
    """Every table states its provenance: the keys `header_lines` prints must all be there."""
    missing = [k for k in HEADER_KEYS if k not in header]
    if "commits" not in header and "commit" not in header:
        missing.append("commits")
    if missing:
        raise SegreproError(f"table {name!r}: header lacks {', '.join(missing)}")


def header_lines(name: str, spec: dict, header: dict) -> list[str]:
    """The title and the provenance block every table starts with."""
    commits = header.get("commits", header.get("commit"))
    lines = [
        f"# {name}: {spec['title']}",
        "",
        f"- Dataset: {_fmt_header_value(header['dataset'])}",
        f"- Scale: {_fmt_header_value(header['scale'])}",
        f"- Backbone: {_fmt_header_value(header['backbone'])}",
        f"- Iterations: {_fmt_header_value(header['iterations'])}",
        f"- Seeds: {_fmt_header_value(header['seeds'])}",
        f"- Commit: {_fmt_header_value(commits)}",
    ]
    if header.get("note"):
        lines += ["", str(header["note"])]
    return lines


def build_table(name: str, spec: dict, results: dict[str, list[dict]], header: dict,
                flops: dict | None = None) -> tuple[str, pd.DataFrame]:
    """Render one paper table as Markdown and as a DataFrame (the CSV beside the .md).

    `results` maps row_key(experiment, protocol) to one metric dict per seed (numbers in percent);
    `flops`, for a spec with a `flops` section, the counts of segrepro.flops per experiment.
    Raises SegreproError on a bad spec, a missing row or metric, or a header without a required key.
    """
    check_table_spec(name, spec)
    metrics = spec["metrics"]
    rows = spec["rows"]
    order = table_row_keys(spec)

    check_header(name, header)

    stats, paper, samples = {}, {}, {}
    for row, key in zip(rows, order):
        runs = results.get(key)
        if not runs:
            # Never write a table with holes: a missing row means an upstream step is missing.
            raise SegreproError(f"table {name!r}: no results for row {row['label']!r} ({key})")
        if is_test_server(row):
            if not all(isinstance(run.get("submission"), str) for run in runs):
                raise SegreproError(f"table {name!r}: row {key!r} is a test-server row: it needs submissions, not metrics")
        else:
            values = _metric_values(name, key, runs, metrics)
            stats[key] = _seed_stats(values)
            # What the claims' intervals read: the values and each run's per-image counts, if stored.
            samples[key] = [{**{m: values[m][i] for m in metrics}, "per_image": run.get("per_image")}
                            for i, run in enumerate(runs)]
        paper[key] = {m: (None if v is None else float(v)) for m, v in (row.get("paper") or {}).items()}

    records, lines = [], []
    for row, key in zip(rows, order):
        record = {"label": row["label"], "experiment": row["experiment"], "protocol": key.split("@")[1]}
        cells = [_cell(row["label"])]
        if is_test_server(row):
            submissions = [run["submission"] for run in results[key]]
            record.update({"test_server": row["test_server"]["name"], "submission": "; ".join(submissions)})
            for metric in metrics:
                ref = paper[key].get(metric)
                record.update({f"{metric}_paper": float("nan") if ref is None else ref, f"{metric}_ours_mean": float("nan"),
                               f"{metric}_ours_std": float("nan"), f"{metric}_n_seeds": 0, f"{metric}_delta": float("nan")})
                cells += [_fmt(ref), _cell(_server_cell(row["test_server"], submissions)), MISSING]
            records.append(record)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        for metric in metrics:
            mean, std, n = stats[key][metric]
            ref = paper[key].get(metric)
            delta = float("nan") if ref is None else mean - ref
            record.update({
                f"{metric}_paper": float("nan") if ref is None else ref,
                f"{metric}_ours_mean": mean,
                f"{metric}_ours_std": std,
                f"{metric}_n_seeds": n,
                f"{metric}_delta": delta,
            })
            reproduced = _fmt(mean) if n == 1 else f"{_fmt(mean)} ± {_fmt(std)}"
            cells += [_fmt(ref), reproduced, _fmt_delta(delta)]
        records.append(record)
        lines.append("| " + " | ".join(cells) + " |")

    columns = ["Method"]
    for metric in metrics:
        display = metric_name(metric)
        columns += [f"{display} paper", f"{display} reproduced", f"{display} Δ"]
    table = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] + [":---:"] * (len(columns) - 1)) + "|"]

    text = header_lines(name, spec, header) + [""]
    if spec.get("grid"):
        text += _grid_lines(spec, stats, paper, order)
    text += [*table, *lines]
    text += _absent_notes(results, order)
    text += _server_notes(spec, results, order)
    if spec.get("flops"):
        if not flops:
            raise SegreproError(f"table {name!r} shows computation but no counts were given")
        text += _flops_lines(spec, flops, paper, order)
    claims = spec.get("claims") or []
    if claims:
        from segrepro.bootstrap import RowSamples

        judged = RowSamples(samples, metrics)
        text += ["", "## Claims", "", CLAIMS_NOTE, ""]
        text += [_judge_claim(claim, judged, paper, order) for claim in claims]
    markdown = "\n".join(text) + "\n"

    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    return markdown, frame


def write_table(path_md: Path, text: str, frame) -> None:
    """Write the Markdown table and its CSV (same name, .csv) atomically.

    The CSV goes first and the .md last: the workflow treats the .md as the target, so its
    presence implies the CSV is complete.
    """
    path_md = Path(path_md)
    write_text(path_md.with_suffix(".csv"), frame.to_csv(index=False, lineterminator="\n"))
    write_text(path_md, text)


def load_metrics(path) -> dict:
    """Read one metrics JSON file (one run, one seed); the error names the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise SegreproError(f"metrics file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegreproError(f"metrics file {path} is unreadable or not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SegreproError(f"metrics file {path} does not hold a JSON object")
    return data


def load_run(path) -> dict:
    """One run's metrics file with its per-image counts under "per_image" (None for a metrics file
    written before they were stored); counts that do not add up to the file's mIoU are stale."""
    from segrepro.bootstrap import load_per_image, metric_of_counts, per_image_path

    run = load_metrics(path)
    counts = load_per_image(per_image_path(path)) if run.get("per_image_counts") else None
    if counts is not None and isinstance(run.get("miou"), (int, float)):
        total = {key: counts[key].sum(axis=0).astype(float) for key in ("tp", "fp", "fn")}
        if abs(float(metric_of_counts("miou", **total)) - run["miou"]) > 1e-6:
            raise SegreproError(f"{per_image_path(path)} does not match {path} (mIoU differs): rerun its evaluation")
    return dict(run, per_image=counts)


def load_submission(path) -> dict:
    """The manifest segrepro.submit stores in a submission zip's archive comment, plus the zip's
    path under "submission"; the error names the file."""
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            comment = archive.comment
    except FileNotFoundError:
        raise SegreproError(f"submission {path} does not exist") from None
    except (OSError, zipfile.BadZipFile) as err:
        raise SegreproError(f"submission {path} is not a readable zip: {err}") from None
    try:
        manifest = json.loads(comment.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or SUBMISSION_KEY not in manifest:
        raise SegreproError(f"submission {path} has no segrepro manifest in its zip comment (write it with `segrepro submit`)")
    return dict(manifest, submission=str(path))


def _load_flops(name: str, path: Path) -> dict:
    if not path.is_file():
        raise SegreproError(f"{path}: computation counts not found (run `segrepro flops {name}`)")
    record = load_metrics(path)
    if not isinstance(record.get("models"), dict):
        raise SegreproError(f"{path} holds no model counts")
    return record


def write_paper_table(params, name: str, scale: str, dataset: str | None, seeds: list[int], out: Path,
                      split: str | None = None) -> None:
    """Collect the metrics files of every (row, seed) of a declared table and write it; `split`
    overrides the split its rows report (Params.eval_split)."""
    from segrepro import paths

    paper, spec = params.checked_table(name, scale)
    if spec.get("kind") == "efficiency":
        from segrepro.efficiency import write_efficiency_table

        write_efficiency_table(params, name, spec, scale, out)
        return
    dataset_name = params.table_dataset(name, scale, dataset)
    split = params.eval_split(name, dataset_name, split)
    counts = _load_flops(name, paths.flops_path(name))["models"] if spec.get("flops") else {}
    results = {}
    for row in spec["rows"]:
        key = row_key(row["experiment"], row["protocol"])
        run = (scale, dataset_name, paper, row["experiment"])
        if is_test_server(row):
            results[key] = [load_submission(paths.submission_path(*run, seed, row["protocol"])) for seed in seeds]
            continue
        results[key] = [load_run(paths.metrics_path(*run, seed, row["protocol"], split)) for seed in seeds]
        for seed, metrics in zip(seeds, results[key]):
            if metrics.get("split", "val") != split:
                raise SegreproError(f"{paths.metrics_path(*run, seed, row['protocol'], split)}: scores split "
                                    f"'{metrics.get('split')}', but table {name!r} reports split '{split}'")
        if spec.get("flops"):
            if row["experiment"] not in counts:
                raise SegreproError(f"{paths.flops_path(name)} has no count for {row['experiment']}: run `segrepro flops {name}`")
            results[key] = [dict(run, gmacs=counts[row["experiment"]]["gmacs"]) for run in results[key]]
    runs = [run for per_seed in results.values() for run in per_seed]

    def distinct(values) -> list:
        return list(dict.fromkeys(values))

    registry = params.paper(paper)
    header = {
        "dataset": dataset_name if split == "val" else f"{dataset_name}, split {split}",
        "scale": scale,
        "backbone": distinct(run["backbone"] for run in runs),
        "iterations": distinct(run["iterations"] for run in runs),
        "seeds": list(seeds),
        "commits": distinct(run["train"]["git_commit"] for run in runs),
        "note": f"Paper: {spec.get('reported_protocol', registry['reported_protocol'])}. Ours: {dataset_name} at scale '{scale}'"
        + ("." if scale == "paper" else "; Δ compares different data and model sizes, the claims compare"
           " our rows with each other.")
        + (f" {spec['notes'][scale]}" if scale in spec.get("notes", {}) else ""),
    }
    if spec.get("kind") == "level_matrix":
        from segrepro.saf_report import write_level_table

        missing = [run for run in runs if "levels" not in run]
        if missing:
            raise SegreproError(
                f"table {name!r}: the metrics of {missing[0]['experiment']} (seed {missing[0]['seed']}) have no "
                "per-level analysis: only a pyramidal model evaluated single-scale has one"
            )
        write_level_table(name, spec, [run["levels"] for run in runs], header, out)
        return
    text, frame = build_table(name, spec, results, header, counts)
    chart = chart_path(out)
    write_chart(spec["title"], spec["metrics"], frame, chart)
    write_table(out, text, frame)
    _attach_to_runs(name, runs, [Path(out), Path(out).with_suffix(".csv"), chart])


def chart_path(table_md: Path) -> Path:
    """The bar chart beside a table: results/tables/NAME.chart.png."""
    return Path(table_md).with_name(f"{Path(table_md).stem}.chart.png")


def write_chart(title: str, metrics: list[str], frame, out: Path) -> None:
    """Paper vs ours per row and metric (mean ± std over seeds), from the table's CSV columns."""
    import pandas as pd

    from segrepro.plots import plot_table_chart

    def column(key: str) -> list:
        return [None if pd.isna(v) else float(v) for v in frame[key]] if key in frame else [None] * len(frame)

    panels = {metric_name(m): {"paper": column(f"{m}_paper"), "ours": column(f"{m}_ours_mean"),
                               "std": column(f"{m}_ours_std")} for m in metrics}
    plot_table_chart(title, list(frame["label"]), panels, out)


def _attach_to_runs(name: str, runs: list[dict], files: list[Path]) -> None:
    """The table and its chart as artifacts (tables/NAME/) of every MLflow run behind its rows."""
    from segrepro import paths, tracking

    for run in runs:
        if {"scale", "dataset", "paper", "experiment", "seed"} <= run.keys():
            folder = paths.run_dir(run["scale"], run["dataset"], run["paper"], run["experiment"], run["seed"])
            tracking.attach_files(folder, files, f"tables/{name}")
