"""Paper tables: our numbers beside the paper's, plus a verdict for each of the paper's claims.

A table spec comes from the `tables:` section of a paper's YAML (see params/papers/pspnet.yaml).
A row is one (experiment, test protocol) pair; a claim refers to rows by `experiment` or
`experiment@protocol`, a bare experiment meaning protocol `ss`. A row with `test_server` is a
number only a benchmark's server can compute (SaF Table 2, HFGD Table 14): it reads the submission
zip of segrepro.engine.submit instead of a metrics file and shows where to upload it, with no Δ or claim.

Kept free of torch on purpose: the workflow imports this module while it builds its DAG; pandas is
imported where a frame is made, since every job that loads params/ imports this module too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segrepro.config.table_specs import (
    DEFAULT_CLAIM_METRIC,
    DEFAULT_PROTOCOL,
    check_table_spec,
    is_test_server,
    parse_ref,
    row_key,
    table_row_keys,
)
from segrepro.core.errors import SegreproError
from segrepro.core.paths import SUBMISSION_KEY
from segrepro.reporting.markdown import (
    CLAIMS_NOTE,
    MISSING,
    basis_remark,
    check_header,
    claim_line,
    claim_record,
    escape_cell,
    fmt,
    fmt_delta,
    fmt_interval,
    header_claims_document,
    header_lines,
    pair_record,
    paper_note,
    verdict_of,
    write_files,
)

if TYPE_CHECKING:
    import pandas as pd

METRIC_NAMES = {"miou": "mIoU (%)", "pixel_acc": "Pixel Acc. (%)", "gmacs": "GMACs", "score": "Score (%)"}
LOWER_IS_BETTER = {"gmacs"}
FLOPS_TOLERANCE = 0.03  # a count further than this from the paper's must say why
ABSENT_MARK = "⚠"  # opens the note on an evaluated split that lacks a class (segrepro.engine.evaluate)


def metric_name(metric: str) -> str:
    """The display name of a metric; an unknown metric shows under its own key."""
    return METRIC_NAMES.get(metric, metric)


def _grid_lines(spec: dict, stats: dict, paper: dict, order: list[str]) -> list[str]:
    """The table as the paper prints it: one cell per row of the spec, "reproduced (paper)"."""
    grid, metric = spec["grid"], spec["metrics"][0]
    cells = {tuple(row["cell"]): key for row, key in zip(spec["rows"], order)}
    lines = [
        f"{metric_name(metric)}, reproduced (paper):",
        "",
        "| | " + " | ".join(escape_cell(c) for c in grid["columns"]) + " |",
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
            values.append(f"{experiment}: {fmt(stats[key][metric][0])} ({fmt(paper[key].get(metric))})")
        lines.append(f"| {escape_cell(grid_row)} | " + " | ".join(values) + " |")
    return lines + [""]


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
                raise SegreproError(
                    f"table {name!r}: row {key!r}: a result (seed {run.get('seed', '?')}) has no {metric!r}")
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


def _judge_claim(claim: dict, samples, paper: dict, order: list[str]) -> dict:
    """The verdict on a claim, our evidence, what the paper's numbers say, and every pair of rows
    it rests on with its interval (markdown.claim_record)."""
    metric = claim.get("metric", DEFAULT_CLAIM_METRIC)
    # For a lower-is-better metric "better" is smaller: intervals are oriented by `sign`.
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    exact = metric == "gmacs"  # a count of the model, not a measurement
    theirs = {key: paper[key].get(metric) for key in order}

    def oriented(interval):
        from segrepro.reporting.bootstrap import Interval

        return Interval(sign * interval.delta, interval.half_width, interval.basis)

    def comparison(b: str, t: str):
        interval = samples.compare(b, t, metric, exact=exact)
        text = (f"{_short_ref(*b.split('@'))} {fmt(samples.mean(b, metric))} vs "
                f"{_short_ref(*t.split('@'))} {fmt(samples.mean(t, metric))}: {fmt_interval(interval)}")
        # The pair as data carries Δ = better − than as measured, not oriented by `sign`.
        data = pair_record(_short_ref(*b.split("@")), _short_ref(*t.split("@")), metric,
                           samples.mean(b, metric), samples.mean(t, metric), interval)
        return oriented(interval), text, data

    pairs = claim_pairs(claim, order)
    if "best" in claim:
        others = [t for _, t in pairs]
        judged = [comparison(b, t) for b, t in pairs]
        # Shown: the strongest competitor (on a tie the earlier row), and any that contradicts.
        rival = max(others, key=lambda k: sign * samples.mean(k, metric))
        shown = [text for (interval, text, _), (_, t) in zip(judged, pairs)
                 if t == rival or interval.half_width is not None and interval.high < 0]
        evidence = "; ".join(shown)
    else:
        judged = [comparison(b, t) for b, t in pairs]
        evidence = "; ".join(text for _, text, _ in judged)
    intervals = [interval for interval, _, _ in judged]

    if any(theirs[k] is None for pair in pairs for k in pair):
        paper_holds, margin = None, None
    else:
        margins = [sign * (theirs[b] - theirs[t]) for b, t in pairs]
        paper_holds, margin = all(m > 0 for m in margins), min(margins)

    if metric != DEFAULT_CLAIM_METRIC:
        evidence = f"{metric_name(metric)}: {evidence}"
    evidence += basis_remark(intervals)
    return claim_record(claim["claim"], verdict_of(intervals), evidence, paper_note(paper_holds, margin, metric),
                        [data for _, _, data in judged], basis=sorted({iv.basis for iv in intervals}))


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
        line = (f"- {row['label']}: {fmt(ours)} = backbone {fmt(count['backbone_gmacs'])}"
                f" + rest {fmt(ours - count['backbone_gmacs'])}")
        size = count.get("input_size", settings["input_size"])
        classes = count.get("num_classes", settings["num_classes"])
        if (size, classes) != (settings["input_size"], settings["num_classes"]):
            line += f" (counted on a {size}² image, {classes} classes)"
        if theirs is not None:
            line += f"; the paper's {fmt(theirs)} ({fmt_delta(100 * (ours - theirs) / theirs)} %)"
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


def build_table(name: str, spec: dict, results: dict[str, list[dict]], header: dict,
                flops: dict | None = None) -> tuple[str, pd.DataFrame, list[dict]]:
    """Render one paper table of kind `rows` as Markdown, as a DataFrame (the CSV beside the .md)
    and as its judged claims (markdown.claim_record, the claims JSON beside it).

    `results` maps row_key(experiment, protocol) to one metric dict per seed (numbers in percent);
    `flops`, for a spec with a `flops` section, the counts of segrepro.measure.flops per experiment.
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
                raise SegreproError(
                    f"table {name!r}: row {key!r} is a test-server row: it needs submissions, not metrics")
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
        cells = [escape_cell(row["label"])]
        if is_test_server(row):
            submissions = [run["submission"] for run in results[key]]
            record.update({"test_server": row["test_server"]["name"], "submission": "; ".join(submissions)})
            for metric in metrics:
                ref = paper[key].get(metric)
                record.update({f"{metric}_paper": float("nan") if ref is None else ref,
                               f"{metric}_ours_mean": float("nan"), f"{metric}_ours_std": float("nan"),
                               f"{metric}_n_seeds": 0, f"{metric}_delta": float("nan")})
                cells += [fmt(ref), escape_cell(_server_cell(row["test_server"], submissions)), MISSING]
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
            reproduced = fmt(mean) if n == 1 else f"{fmt(mean)} ± {fmt(std)}"
            cells += [fmt(ref), reproduced, fmt_delta(delta)]
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
    judged_claims = []
    if claims:
        from segrepro.reporting.bootstrap import RowSamples

        judged = RowSamples(samples, metrics)
        judged_claims = [_judge_claim(claim, judged, paper, order) for claim in claims]
        text += ["", "## Claims", "", CLAIMS_NOTE, ""]
        text += [claim_line(claim) for claim in judged_claims]
    markdown = "\n".join(text) + "\n"

    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    return markdown, frame, judged_claims


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
    from segrepro.core.per_image import load_per_image, per_image_path
    from segrepro.reporting.bootstrap import metric_of_counts

    run = load_metrics(path)
    counts = load_per_image(per_image_path(path)) if run.get("per_image_counts") else None
    if counts is not None and isinstance(run.get("miou"), (int, float)):
        total = {key: counts[key].sum(axis=0).astype(float) for key in ("tp", "fp", "fn")}
        if abs(float(metric_of_counts("miou", **total)) - run["miou"]) > 1e-6:
            raise SegreproError(f"{per_image_path(path)} does not match {path} (mIoU differs): rerun its evaluation")
    return dict(run, per_image=counts)


def load_submission(path) -> dict:
    """The manifest segrepro.engine.submit stores in a submission zip's archive comment, plus the zip's
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
        raise SegreproError(
            f"submission {path} has no segrepro manifest in its zip comment (write it with `segrepro submit`)")
    return dict(manifest, submission=str(path))


def _load_flops(name: str, path: Path) -> dict:
    if not path.is_file():
        raise SegreproError(f"{path}: computation counts not found (run `segrepro flops {name}`)")
    record = load_metrics(path)
    if not isinstance(record.get("models"), dict):
        raise SegreproError(f"{path} holds no model counts")
    return record


def write_table(params, name: str, scale: str, dataset: str | None, seeds: list[int], out: Path,
                split: str | None = None) -> None:
    """The one entry point of the table writers: results/tables/NAME.md with its CSV and its claims
    (NAME.claims.json), written by the writer of the spec's `kind`: rows (write_rows_table),
    level_matrix (saf_report.write_level_table) or efficiency (efficiency_table.write_efficiency_table).
    `split` overrides the split the rows report (Params.eval_split)."""
    paper, spec = params.checked_table(name, scale)
    kind = spec.get("kind", "rows")
    if kind == "efficiency":
        from segrepro.reporting.efficiency_table import write_efficiency_table

        write_efficiency_table(params, name, spec, scale, out)
        return
    runs, results, header, counts = _collect_runs(params, name, paper, spec, scale, dataset, seeds, split)
    if kind == "level_matrix":
        from segrepro.reporting.saf_report import write_level_table

        missing = [run for run in runs if "levels" not in run]
        if missing:
            raise SegreproError(
                f"table {name!r}: the metrics of {missing[0]['experiment']} (seed {missing[0]['seed']}) have no "
                "per-level analysis: only a pyramidal model evaluated single-scale has one"
            )
        write_level_table(name, spec, [run["levels"] for run in runs], header, out)
        return
    write_rows_table(name, spec, runs, results, header, counts, out)


def write_rows_table(name: str, spec: dict, runs: list[dict], results: dict, header: dict, counts: dict,
                     out: Path) -> None:
    """A table of kind `rows`: its Markdown, CSV, claims JSON and chart, attached to its runs."""
    text, frame, judged = build_table(name, spec, results, header, counts)
    chart = chart_path(out)
    write_chart(spec["title"], spec["metrics"], frame, chart)
    write_files(out, text, frame, header_claims_document(name, spec, header, judged, CLAIMS_NOTE if judged else None))
    _attach_to_runs(name, runs, [Path(out), Path(out).with_suffix(".csv"), chart])


def _collect_runs(params, name: str, paper: str, spec: dict, scale: str, dataset: str | None, seeds: list[int],
                  split: str | None) -> tuple[list[dict], dict, dict, dict]:
    """The metrics (or submissions) of every (row, seed) of a table built from runs, keyed by row,
    with the header that states their provenance and the table's computation counts."""
    from segrepro.core import paths

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
                raise SegreproError(
                    f"{paths.flops_path(name)} has no count for {row['experiment']}: run `segrepro flops {name}`")
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
        "note": f"Paper: {spec.get('reported_protocol', registry['reported_protocol'])}."
        f" Ours: {dataset_name} at scale '{scale}'"
        + ("." if scale == "paper" else "; Δ compares different data and model sizes, the claims compare"
           " our rows with each other.")
        + (f" {spec['notes'][scale]}" if scale in spec.get("notes", {}) else ""),
    }
    return runs, results, header, counts


def chart_path(table_md: Path) -> Path:
    """The bar chart beside a table: results/tables/NAME.chart.png."""
    return Path(table_md).with_name(f"{Path(table_md).stem}.chart.png")


def write_chart(title: str, metrics: list[str], frame, out: Path) -> None:
    """Paper vs ours per row and metric (mean ± std over seeds), from the table's CSV columns."""
    import pandas as pd

    from segrepro.reporting.plots import plot_table_chart

    def column(key: str) -> list:
        return [None if pd.isna(v) else float(v) for v in frame[key]] if key in frame else [None] * len(frame)

    panels = {metric_name(m): {"paper": column(f"{m}_paper"), "ours": column(f"{m}_ours_mean"),
                               "std": column(f"{m}_ours_std")} for m in metrics}
    plot_table_chart(title, list(frame["label"]), panels, out)


def _attach_to_runs(name: str, runs: list[dict], files: list[Path]) -> None:
    """The table and its chart as artifacts (tables/NAME/) of every MLflow run behind its rows."""
    from segrepro.core import paths
    from segrepro.pipeline import tracking

    for run in runs:
        if {"scale", "dataset", "paper", "experiment", "seed"} <= run.keys():
            folder = paths.run_dir(run["scale"], run["dataset"], run["paper"], run["experiment"], run["seed"])
            tracking.attach_files(folder, files, f"tables/{name}")
