"""What every table writer shares: number formats, the provenance header, the three verdicts of
a claim with their Claims lines and their records (the claims as data, NAME.claims.json), and the
atomic write of a table with its CSV and its claims. Torch-free.

The writers, one per table kind, are segrepro.reporting.tables (rows), segrepro.reporting.saf_report
(level matrix) and segrepro.reporting.efficiency_table (efficiency), behind tables.write_table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from segrepro.config.table_specs import DEFAULT_CLAIM_METRIC
from segrepro.core.atomic import write_text
from segrepro.core.errors import SegreproError
from segrepro.core.paths import claims_path

MISSING = "–"  # en dash, for a number the paper does not give
MINUS = "−"  # the real minus sign, so that "−0.45" lines up with "+1.23"
HEADER_KEYS = ("dataset", "scale", "backbone", "iterations", "seeds", "commits")


def fmt(value: float, digits: int = 2) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.{digits}f}"


def fmt_delta(value: float) -> str:
    if value is None or math.isnan(value):
        return MISSING
    text = f"{abs(value):.2f}"
    if text == "0.00":
        return text  # no sign on a difference that rounds to nothing
    return ("+" if value > 0 else MINUS) + text


def fmt_sig(value) -> str:
    """Three significant digits (a timing or a memory figure)."""
    return MISSING if value is None else f"{value:.3g}"


def fmt_ratio(value) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def fmt_header_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


# The three verdicts of a claim (segrepro.reporting.bootstrap gives each difference its 95 % interval):
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
# Why an interval is weaker than images and seeds together (segrepro.reporting.bootstrap's bases).
_BASIS_REMARKS = {
    "images": "one seed: the intervals count the test images, not the run-to-run spread",
    "seeds": "no per-image statistics (metrics written before they were stored): the intervals count the seeds only",
    "none": "no interval: one seed and no per-image statistics (metrics written before they were stored)",
}


def verdict_of(intervals: list) -> str:
    """The verdict on intervals of differences oriented so that > 0 is the paper's side
    (segrepro.reporting.bootstrap.Interval); a difference without an interval can only leave a claim ➖."""
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


def claim_record(claim: str, verdict: str, evidence: str, paper_note: str, pairs: list[dict] | None = None,
                 **extra) -> dict:
    """One judged claim as data (an entry of NAME.claims.json): the claim, its verdict, our
    numbers as the Markdown line words them, what the paper's numbers say, and the pairs of rows
    it rests on (pair_record)."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}")
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "paper_note": paper_note,
            "pairs": list(pairs or []), **extra}


def claim_line(record: dict) -> str:
    """The Markdown line of a claim record (verdict_line)."""
    return verdict_line(record["claim"], record["verdict"], record["evidence"], record["paper_note"])


def _number(value):
    # JSON has no NaN: an undefined number is null.
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def pair_record(better: str, than: str, metric: str, ours_better, ours_than, interval=None) -> dict:
    """One difference a claim rests on: the rows, our values, and Δ = better − than with the
    half-width of its interval and what the interval counts (segrepro.reporting.bootstrap's basis;
    None where the claim is judged without one)."""
    return {"better": better, "than": than, "metric": metric, "ours_better": _number(ours_better),
            "ours_than": _number(ours_than),
            "delta": _number(interval.delta if interval is not None else ours_better - ours_than),
            "half_width": None if interval is None else _number(interval.half_width),
            "basis": None if interval is None else interval.basis}


def claims_document(name: str, spec: dict, scale: str, seeds: list, claims: list[dict], rule: str | None,
                    **provenance) -> dict:
    """What NAME.claims.json holds: the table, where its numbers come from, the rule its verdicts
    follow, and one claim_record per judged claim."""
    return {"table": name, "title": spec["title"], "kind": spec.get("kind", "rows"), "scale": str(scale),
            "seeds": list(seeds), **provenance, "rule": rule, "claims": claims}


def header_claims_document(name: str, spec: dict, header: dict, claims: list[dict], rule: str | None) -> dict:
    """The claims JSON of a table built from runs (kinds rows and level_matrix): its header's
    provenance with the judged claims."""
    return claims_document(name, spec, header["scale"], header["seeds"], claims, rule,
                           dataset=header["dataset"], backbone=header["backbone"], iterations=header["iterations"],
                           commits=header["commits"], note=header.get("note"))


def read_claims(path: Path) -> dict:
    """A NAME.claims.json a table writer wrote; the error names the file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SegreproError(f"{path} is unreadable or not valid JSON: {err} (rebuild its table)") from None
    if not isinstance(document, dict) or not isinstance(document.get("claims"), list) or not all(
            isinstance(c, dict) and {"claim", "verdict", "evidence", "paper_note"} <= c.keys()
            for c in document["claims"]):
        raise SegreproError(f"{path} holds no list of judged claims (rebuild its table)")
    return document


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
    text = f"Δ {fmt_delta(interval.delta)}"
    if interval.basis == "exact":
        return text
    if interval.half_width is None:
        return f"{text}, no interval"
    return f"{text} ± {abs(interval.half_width):.2f}"


def basis_remark(intervals: list) -> str:
    """" [why the intervals are weaker]" where they do not count both images and seeds."""
    weaker = [_BASIS_REMARKS[iv.basis] for iv in intervals if iv.basis in _BASIS_REMARKS]
    return f" [{weaker[0]}]" if weaker else ""


def escape_cell(text: str) -> str:
    # A '|' inside a label would split the Markdown cell.
    return str(text).replace("|", "\\|")


def check_header(name: str, header: dict) -> None:
    """Every table states its provenance: the keys `header_lines` prints must all be there."""
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise SegreproError(f"table {name!r}: header lacks {', '.join(missing)}")


def header_lines(name: str, spec: dict, header: dict) -> list[str]:
    """The title and the provenance block every table starts with."""
    lines = [
        f"# {name}: {spec['title']}",
        "",
        f"- Dataset: {fmt_header_value(header['dataset'])}",
        f"- Scale: {fmt_header_value(header['scale'])}",
        f"- Backbone: {fmt_header_value(header['backbone'])}",
        f"- Iterations: {fmt_header_value(header['iterations'])}",
        f"- Seeds: {fmt_header_value(header['seeds'])}",
        f"- Commit: {fmt_header_value(header['commits'])}",
    ]
    if header.get("note"):
        lines += ["", str(header["note"])]
    return lines


def write_files(path_md: Path, text: str, frame, claims: dict | None = None) -> None:
    """Write the Markdown table, its CSV (same name, .csv) and, for a paper table, its claims as
    data (NAME.claims.json, claims_document) atomically.

    The CSV and the claims go first and the .md last: the workflow treats the .md as the target, so
    its presence implies the other files are complete.
    """
    path_md = Path(path_md)
    write_text(path_md.with_suffix(".csv"), frame.to_csv(index=False, lineterminator="\n"))
    if claims is not None:
        write_text(claims_path(path_md), json.dumps(claims, indent=1, ensure_ascii=False) + "\n")
    write_text(path_md, text)
