"""Every claim the tables check, across the three papers: reproduced, contradicted, not told
apart, or not yet run, with our numbers and the seeds behind each.

The verdicts are the ones the table writers stored as data beside each built table
(results/tables/NAME.claims.json, segrepro.reporting.markdown.claims_document); a table without
that file (not built yet, or built before its claims were stored) contributes its declared claims as
"not yet run", with the command that builds it. Nothing is read back from the Markdown.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from segrepro.core import paths
from segrepro.reporting.markdown import (
    CONTRADICTED,
    NOT_DECISIVE,
    NOT_TOLD_APART,
    PAPER_MARGIN,
    REPRODUCED,
    VERDICTS,
    escape_cell,
    fmt_header_value,
    read_claims,
)
from segrepro.reporting.tables import declared_paper_note

NOT_YET_RUN = "⏳ not yet run"
# What the listing tallies: a table's verdicts, or its claims not run yet.
STATES = (*VERDICTS, NOT_YET_RUN)
RULE = ("Each difference a claim rests on carries a 95 % interval over the test images (paired bootstrap) "
        f"and the seeds (their spread): '{REPRODUCED}' when every interval lies on the paper's side of zero, "
        f"'{CONTRADICTED}' when one lies on the other side, '{NOT_TOLD_APART}' otherwise. With one seed the "
        "intervals count the test images only; without per-image statistics the seeds only, and with neither "
        f"a claim stays '{NOT_TOLD_APART}'. '{NOT_DECISIVE}': the paper's own margin is under "
        f"{PAPER_MARGIN:g} mIoU, the usual run-to-run spread of one recipe.")
LEVEL_MATRIX_CLAIM = "For every assignment level ℓ, the semantic level ℓ' = ℓ has the highest mIoU"


def built_claims(name: str) -> dict | None:
    """The claims JSON of a built table (its provenance and judged claims), None if there is none."""
    path = paths.claims_path(paths.table_path(name))
    return read_claims(path) if path.exists() else None


def build_command(target: Path, scale: str | None) -> str:
    option = f" --config scale={scale}" if scale else ""
    return f"snakemake {target} --cores all{option}"


def declared_claims(spec: dict) -> list[str]:
    if spec.get("kind") == "level_matrix":
        return [LEVEL_MATRIX_CLAIM]
    return [claim["claim"] for claim in spec.get("claims") or []]


def collect(params, scale: str | None = None) -> list[dict]:
    """One record per claim of every table of every paper, in the registries' order: paper, table,
    title, claim, verdict, evidence (our numbers), paper_note (what the paper's numbers say),
    seeds, scale, and for a table not built yet the command that builds it."""
    default_scale = params.workflow["scale"]
    records = []
    for paper, registry in params.papers.items():
        for name, spec in registry["tables"].items():
            base = {"paper": paper, "table": name, "title": spec["title"]}
            path = paths.table_path(name)
            built = built_claims(name)
            if built is not None:
                seeds = fmt_header_value(built.get("seeds") or [])
                for claim in built["claims"]:
                    records.append({**base, "claim": claim["claim"], "verdict": claim["verdict"],
                                    "evidence": claim["evidence"], "paper_note": claim["paper_note"],
                                    "seeds": seeds, "scale": built.get("scale", "?")})
                continue
            command = build_command(path, scale if scale and scale != default_scale else None)
            # The paper's own numbers are known before anything runs (a plain table's claims).
            notes = ([declared_paper_note(spec, claim) for claim in spec.get("claims") or []]
                     if spec.get("kind", "rows") == "rows" else [])
            for i, text in enumerate(declared_claims(spec)):
                records.append({**base, "claim": text, "verdict": NOT_YET_RUN,
                                "evidence": "", "paper_note": notes[i] if i < len(notes) else "",
                                "seeds": "", "scale": scale or default_scale, "command": command})
    return records


def counts(records: list[dict]) -> dict[str, int]:
    tally = Counter(record["verdict"] for record in records)
    return {verdict: tally.get(verdict, 0) for verdict in STATES}


def summary_line(records: list[dict]) -> str:
    tally = counts(records)
    undecided = sum(NOT_DECISIVE in record["paper_note"] for record in records)
    return (f"{len(records)} claims: " + ", ".join(f"{tally[v]} {v}" for v in STATES)
            + f"; {undecided} {NOT_DECISIVE}")


def to_markdown(records: list[dict]) -> str:
    """The claims summary as Markdown: the counting rule, totals, then one table per paper."""
    lines = ["# Claims of the three papers, checked", "", RULE, "", f"**{summary_line(records)}**"]
    for paper in dict.fromkeys(record["paper"] for record in records):
        mine = [record for record in records if record["paper"] == paper]
        lines += ["", f"## {paper} ({summary_line(mine)})", "",
                  "| table | claim | verdict | our numbers | seeds (scale) | paper's numbers |",
                  "|---|---|---|---|---|---|"]
        for record in mine:
            evidence = record["evidence"] or f"build: `{record['command']}`"
            seeds = f"{record['seeds']} ({record['scale']})" if record["seeds"] else f"– ({record['scale']})"
            lines.append(f"| {record['table']} | {escape_cell(record['claim'])} | {record['verdict']} "
                         f"| {escape_cell(evidence)} | {seeds} | {escape_cell(record['paper_note'])} |")
    return "\n".join(lines) + "\n"


