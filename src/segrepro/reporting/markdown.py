"""What every paper table's Markdown shares: number formats, the provenance header, the three
verdicts of a claim and their Claims lines, and the atomic write of a table with its CSV.
Torch-free."""

from __future__ import annotations

import math
import re
from pathlib import Path

from segrepro.config.table_specs import DEFAULT_CLAIM_METRIC
from segrepro.core.atomic import write_text
from segrepro.core.errors import SegreproError

MISSING = "–"  # en dash, for a number the paper does not give
MINUS = "−"  # the real minus sign, so that "−0.45" lines up with "+1.23"
HEADER_KEYS = ("dataset", "scale", "backbone", "iterations", "seeds")


def fmt(value: float) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.2f}"


def fmt_delta(value: float) -> str:
    if value is None or math.isnan(value):
        return MISSING
    text = f"{abs(value):.2f}"
    if text == "0.00":
        return text  # no sign on a difference that rounds to nothing
    return ("+" if value > 0 else MINUS) + text


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
_VERDICT_WORDS = "|".join(re.escape(v) for v in VERDICTS)
_CLAIM_LINE = re.compile(
    rf"^- (?P<verdict>{_VERDICT_WORDS}): (?P<claim>.*?) — (?P<evidence>.*) \((?P<paper>[^()]*)\)$"
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
        f"- Dataset: {fmt_header_value(header['dataset'])}",
        f"- Scale: {fmt_header_value(header['scale'])}",
        f"- Backbone: {fmt_header_value(header['backbone'])}",
        f"- Iterations: {fmt_header_value(header['iterations'])}",
        f"- Seeds: {fmt_header_value(header['seeds'])}",
        f"- Commit: {fmt_header_value(commits)}",
    ]
    if header.get("note"):
        lines += ["", str(header["note"])]
    return lines


def write_table(path_md: Path, text: str, frame) -> None:
    """Write the Markdown table and its CSV (same name, .csv) atomically.

    The CSV goes first and the .md last: the workflow treats the .md as the target, so its
    presence implies the CSV is complete.
    """
    path_md = Path(path_md)
    write_text(path_md.with_suffix(".csv"), frame.to_csv(index=False, lineterminator="\n"))
    write_text(path_md, text)
