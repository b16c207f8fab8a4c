"""Reading the results: claim verdicts and their summary across papers, the training curve's
validation, the tables' charts, and results/report.html built by the workflow."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import torch
from test_workflow import build_from_nothing, project_env, snakemake

from segrepro.config.params import deep_merge, load_params
from segrepro.core import paths
from segrepro.core.provenance import config_hash, training_config
from segrepro.engine.train import CURVE, LOG, train
from segrepro.reporting import claims
from segrepro.reporting.bootstrap import Interval
from segrepro.reporting.markdown import (
    CONTRADICTED,
    NOT_TOLD_APART,
    REPRODUCED,
    VERDICTS,
    claim_line,
    claim_record,
    header_claims_document,
    verdict_line,
    verdict_of,
    write_files,
)
from segrepro.reporting.tables import build_table

# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("intervals, verdict", [
    ([Interval(1.0, 0.5, "images"), Interval(2.0, 1.9, "images")], REPRODUCED),  # every one above zero
    ([Interval(1.0, 1.5, "images"), Interval(2.0, 0.1, "images")], NOT_TOLD_APART),  # one straddles zero
    ([Interval(1.0, 0.5, "images"), Interval(-2.0, 1.0, "images")], CONTRADICTED),  # one below zero
    ([Interval(3.0, None, "none")], NOT_TOLD_APART),  # no interval: never told apart
    ([Interval(3.0, None, "none"), Interval(-2.0, 1.0, "seeds")], CONTRADICTED),
    ([Interval(-1.0, 0.0, "exact")], CONTRADICTED),  # a count: its sign decides
])
def test_the_verdict_of_intervals(intervals, verdict):
    assert verdict_of(intervals) == verdict


@pytest.mark.parametrize("verdict", VERDICTS)
def test_a_claim_record_words_its_verdict_line(verdict):
    record = claim_record("A > B (both | sides)", verdict, "GMACs: a 1.00 < b 2.00", "paper's numbers agree")
    assert claim_line(record) == verdict_line("A > B (both | sides)", verdict, "GMACs: a 1.00 < b 2.00",
                                              "paper's numbers agree")
    assert claim_line(record) == f"- {verdict}: A > B (both | sides) — GMACs: a 1.00 < b 2.00 (paper's numbers agree)"
    with pytest.raises(ValueError):
        claim_record("A > B", "✔ fine", "x", "y")


SPEC_ROWS = {"psp": 42.0, "fcn": 40.0}


def write_built_table(name: str, spec: dict, mious: dict[str, list[float]], seeds: list[int]) -> None:
    """A table as `segrepro table` writes it, from hand-made results (no training)."""
    results = {f"{row['experiment']}@{row.get('protocol', 'ss')}": [
        {"seed": s, "miou": m, "pixel_acc": 80.0} for s, m in zip(seeds, mious[row["experiment"]])]
        for row in spec["rows"]}
    header = {"dataset": "synthetic-tiny", "scale": "tiny", "backbone": "r", "iterations": 6, "seeds": seeds,
              "commits": ["abc"]}
    text, frame, judged = build_table(name, spec, results, header)
    write_files(paths.table_path(name), text, frame, header_claims_document(name, spec, header, judged, None))


def test_the_claims_summary_takes_built_verdicts_and_lists_the_rest(project, segrepro):
    params = load_params()
    spec = params.paper("pspnet")["tables"]["pspnet_table3"]
    experiments = {row["experiment"] for row in spec["rows"]}
    # Two seeds, every row a point apart with a spread of 2: directions hold, no interval clears zero.
    ranked = {e: [40.0 + i - 1, 40.0 + i + 1] for i, e in enumerate(sorted(experiments))}
    write_built_table("pspnet_table3", spec, ranked, [0, 1])

    records = claims.collect(params, "tiny")
    built = [r for r in records if r["table"] == "pspnet_table3"]
    assert len(built) == len(spec["claims"]) and all(r["seeds"] == "0, 1" and r["scale"] == "tiny" for r in built)
    # Gaps of 1 to 2 against half-widths of t(df) · sqrt(2 · (1/2 + 1/2)) > 2.8: none told apart.
    assert {r["verdict"] for r in built} == {NOT_TOLD_APART}
    others = [r for r in records if r["table"] != "pspnet_table3"]
    assert others and all(r["verdict"] == claims.NOT_YET_RUN for r in others)
    table1 = next(r for r in others if r["table"] == "pspnet_table1")
    assert table1["command"] == "snakemake results/tables/pspnet_table1.md --cores all --config scale=tiny"
    expected = sum(len(claims.declared_claims(spec)) for registry in params.papers.values()
                   for spec in registry["tables"].values())
    assert len(records) == expected
    assert claims.summary_line(records).startswith(f"{expected} claims: ")

    result = segrepro("claims", "--scale", "tiny", "--out", "results/claims.md")
    assert result.returncode == 0, result.stderr
    text = (project / "results/claims.md").read_text()
    assert text == result.stdout and "when every interval lies on the paper's side of zero" in text
    assert f"{len(spec['claims'])} {NOT_TOLD_APART}" in text.split("## pspnet (")[1].splitlines()[0]
    assert text.count("| pspnet_table3 |") == len(spec["claims"])


def test_a_table_built_before_its_claims_were_stored_counts_as_not_yet_run(project):
    """A Markdown table without its claims JSON (built by an older version) is never parsed back:
    `segrepro claims` offers the command that rebuilds it instead of dropping its claims."""
    params = load_params()
    path = paths.table_path("pspnet_table3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# pspnet_table3: x\n\n- Seeds: 0\n\n## Claims\n\n- {REPRODUCED}: a — b (c)\n")
    records = [r for r in claims.collect(params, "tiny") if r["table"] == "pspnet_table3"]
    spec = params.paper("pspnet")["tables"]["pspnet_table3"]
    assert len(records) == len(spec["claims"]) and all(r["verdict"] == claims.NOT_YET_RUN for r in records)


def test_the_claims_summary_reads_the_claims_json_not_the_markdown(project, segrepro):
    """The verdicts come from NAME.claims.json alone: its Markdown twin altered, then removed,
    changes nothing; a broken claims file is a one-line error naming it."""
    params = load_params()
    spec = params.paper("pspnet")["tables"]["pspnet_table3"]
    experiments = sorted({row["experiment"] for row in spec["rows"]})
    write_built_table("pspnet_table3", spec, {e: [40.0 + 5 * i] for i, e in enumerate(experiments)}, [0])
    path = paths.table_path("pspnet_table3")
    before = segrepro("claims", "--scale", "tiny").stdout
    assert before.count("| pspnet_table3 |") == len(spec["claims"]) and claims.NOT_YET_RUN not in \
        "".join(line for line in before.splitlines() if "| pspnet_table3 |" in line)

    path.write_text(path.read_text().replace("## Claims", "## Not claims").replace(REPRODUCED, CONTRADICTED))
    assert segrepro("claims", "--scale", "tiny").stdout == before
    path.unlink()
    assert segrepro("claims", "--scale", "tiny").stdout == before

    document = json.loads(paths.claims_path(path).read_text())
    document["claims"][0]["verdict"] = CONTRADICTED
    document["claims"][0]["evidence"] = "edited evidence"
    paths.claims_path(path).write_text(json.dumps(document))
    edited = [r for r in claims.collect(params, "tiny") if r["table"] == "pspnet_table3"]
    assert (edited[0]["verdict"], edited[0]["evidence"], edited[0]["seeds"]) == (CONTRADICTED, "edited evidence", "0")

    paths.claims_path(path).write_text("{not json")
    result = segrepro("claims", "--scale", "tiny")
    assert result.returncode != 0
    assert "pspnet_table3.claims.json is unreadable or not valid JSON" in result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- training curve

@pytest.mark.parametrize("paper, experiment", [("pspnet", "psp50"), ("saf", "I")])
def test_the_curve_validation_leaves_the_model_unchanged(project, paper, experiment):
    config = load_params().resolve(paper, experiment, "tiny")
    watched = deep_merge(config, {"train": {"val_every": 3, "val_images": 3}})
    unwatched = deep_merge(config, {"train": {"val_every": 0}})
    assert config_hash(training_config(watched)) == config_hash(training_config(unwatched))  # no rerun

    train(watched, project / "watched" / "model.pt", device="cpu")
    train(unwatched, project / "unwatched" / "model.pt", device="cpu")
    a = torch.load(project / "watched" / "model.pt", weights_only=True)["model"]
    b = torch.load(project / "unwatched" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    records = [json.loads(line) for line in (project / "watched" / LOG).read_text().splitlines()]
    checks = [r for r in records if "val_miou" in r]
    assert [r["iteration"] for r in checks] == [3, 6] and all(0 <= r["val_miou"] <= 100 for r in checks)
    assert not any("val_miou" in json.loads(line) for line in (project / "unwatched" / LOG).read_text().splitlines())
    assert (project / "watched" / CURVE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the report

TABLE = "pspnet_table2"


@pytest.fixture(scope="module")
def reported(tmp_path_factory, mlflow_store_template):
    """The tiny pspnet_table2 built from nothing, then results/report.html through the workflow."""
    base = tmp_path_factory.mktemp("report")
    root = build_from_nothing(base, mlflow_store_template, [f"results/tables/{TABLE}.md"])
    env = project_env(base / "mlflow.db")
    result = snakemake(root, "results/report.html", "--cores", "1", "--config", "scale=tiny", env=env)
    assert result.returncode == 0, result.stdout[-5000:]
    return root, env


def images_of(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.slow
def test_the_report_holds_what_is_built_and_says_how_to_build_the_rest(reported):
    root, _ = reported
    page = (root / "results/report.html").read_text()
    assert "<script" not in page and "http://" not in page.replace("http://127.0.0.1:5000", "")  # no server
    for package in ("torch", "timm", "snakemake", "dvc", "mlflow"):
        assert f"<td>{package}</td>" in page
    assert "dataset synthetic-tiny" in page and "content sha256" in page
    assert f'<section class="table" id="{TABLE}">' in page
    assert "snakemake results/tables/pspnet_table1.md --cores all --config scale=tiny" in page
    assert "snakemake results/figures/saf_levels_per_class.png --cores all --config scale=tiny" in page
    experiments = [row["experiment"] for row in load_params(root).paper("pspnet")["tables"][TABLE]["rows"]]
    assert "Runs (5 evaluations)" in page and page.count("MB (RSS)") == len(experiments)
    pictures = images_of(page)  # the table's chart and one curve per run
    assert len(pictures) == 1 + len(experiments) and all(p.startswith(b"\x89PNG") for p in pictures)
    assert (root / f"results/tables/{TABLE}.chart.png").read_bytes() in pictures


@pytest.mark.slow
def test_the_report_is_rebuilt_when_a_table_changes(reported, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(reported[0], root, symlinks=True)
    env = reported[1]
    planned = snakemake(root, "results/report.html", "-n", "--cores", "1", "--config", "scale=tiny", env=env)
    assert "Nothing to be done" in planned.stdout, planned.stdout[-3000:]
    with open(root / f"results/tables/{TABLE}.md", "a") as table:  # a new table (Snakemake compares checksums)
        table.write("\n")
    planned = snakemake(root, "results/report.html", "-n", "--cores", "1", "--config", "scale=tiny", env=env)
    assert re.search(r"^(local)?rule report:", planned.stdout, re.M), planned.stdout[-3000:]


@pytest.mark.slow
def test_charts_and_curves_are_mlflow_artifacts(reported):
    import mlflow

    root, env = reported
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = (root / paths.run_dir("tiny", "synthetic-tiny", "pspnet", "fcn", 0) / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.tags[f"table_{TABLE}"] == "yes" and "val_miou" in run.data.metrics
    top = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert CURVE in top
    tables = {artifact.path for artifact in client.list_artifacts(run_id, f"tables/{TABLE}")}
    assert tables == {f"tables/{TABLE}/{TABLE}{suffix}" for suffix in (".md", ".csv", ".chart.png")}


def test_an_unknown_target_of_the_report_command_is_refused(project, segrepro):
    result = segrepro("report", "--scale", "huge")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "huge" in result.stderr
    assert not (project / "results/report.html").exists()
