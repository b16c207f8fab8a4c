"""Paper tables: cell formatting, claim verdicts, spec validation and atomic writes."""

import copy
import json
import pathlib

import pandas as pd
import pytest

from segrepro.config.table_specs import check_table_spec, parse_ref, row_key, table_row_keys
from segrepro.core.errors import SegreproError
from segrepro.core.paths import claims_path
from segrepro.reporting.markdown import (
    CLAIMS_NOTE,
    NOT_DECISIVE,
    NOT_TOLD_APART,
    REPRODUCED,
    header_claims_document,
    read_claims,
    write_files,
)
from segrepro.reporting.tables import build_table, declared_paper_note, load_metrics

SPEC = {
    "title": "Table X. A small test table",
    "metrics": ["miou", "pixel_acc"],
    "rows": [
        {"label": "Baseline", "experiment": "fcn", "protocol": "ss", "paper": {"miou": 37.23, "pixel_acc": 78.01}},
        {"label": "PSPNet", "experiment": "psp50", "protocol": "ss", "paper": {"miou": 41.68, "pixel_acc": 80.04}},
        # No paper pixel accuracy for this row: its cells must show a dash.
        {"label": "PSPNet+MS", "experiment": "psp50", "protocol": "ms", "paper": {"miou": 42.78}},
    ],
    "claims": [
        {"claim": "PSP beats FCN and MS helps", "better": ["psp50", "psp50@ms"], "than": ["fcn", "psp50"]},
        {"claim": "MS is best", "best": "psp50@ms"},
    ],
}

HEADER = {
    "dataset": "ade20k",
    "scale": "tiny",
    "backbone": "resnet50s",
    "iterations": 100,
    "seeds": [0],
    "commits": ["abc1234"],
    "note": "Synthetic numbers for a test.",
}


def runs(mious):
    """Results for one row: one dict per seed, pixel_acc fixed so only mIoU matters."""
    return [{"seed": s, "miou": v, "pixel_acc": 79.0} for s, v in enumerate(mious)]


def one_seed():
    return {
        "fcn@ss": [{"seed": 0, "miou": 36.0, "pixel_acc": 78.01}],
        "psp50@ss": [{"seed": 0, "miou": 42.0, "pixel_acc": 80.5}],
        "psp50@ms": [{"seed": 0, "miou": 41.5, "pixel_acc": 81.0}],
    }


def three_seeds():
    return {
        "fcn@ss": runs([36.0, 37.0, 38.0]),  # mean 37.00, std 1.00
        "psp50@ss": runs([41.0, 42.0, 43.0]),  # mean 42.00, std 1.00
        "psp50@ms": runs([42.0, 42.5, 43.0]),  # mean 42.50, std 0.50: 0.50 above psp50, inside its spread
    }


def table_cells(text):
    """The body rows of the Markdown table, as lists of stripped cells, keyed by the first cell."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def claim_lines(text):
    return [line for line in text.split("## Claims", 1)[1].strip().splitlines() if line.startswith("- ")]


def test_refs_and_keys():
    assert row_key("psp50", "ms") == "psp50@ms"
    assert parse_ref("psp50") == ("psp50", "ss")
    assert parse_ref("psp50@ms") == ("psp50", "ms")
    assert table_row_keys(SPEC) == ["fcn@ss", "psp50@ss", "psp50@ms"]
    with pytest.raises(SegreproError):
        parse_ref("psp50@")


def test_one_seed_cells_and_header():
    text, frame, _ = build_table("test_table", SPEC, one_seed(), HEADER)
    assert text.startswith("# test_table: Table X. A small test table\n")
    for line in ("- Dataset: ade20k", "- Scale: tiny", "- Backbone: resnet50s", "- Iterations: 100",
                 "- Seeds: 0", "- Commit: abc1234", "Synthetic numbers for a test."):
        assert line in text.splitlines()
    assert "| Method | mIoU (%) paper | mIoU (%) reproduced | mIoU (%) Δ | Pixel Acc. (%) paper |" in text
    cells = table_cells(text)
    assert cells["Baseline"] == ["37.23", "36.00", "−1.23", "78.01", "78.01", "0.00"]
    assert cells["PSPNet"] == ["41.68", "42.00", "+0.32", "80.04", "80.50", "+0.46"]
    assert cells["PSPNet+MS"] == ["42.78", "41.50", "−1.28", "–", "81.00", "–"]
    assert list(frame.columns[:3]) == ["label", "experiment", "protocol"]
    assert frame.loc[0, "miou_delta"] == pytest.approx(-1.23)
    assert frame.loc[0, "miou_n_seeds"] == 1
    assert pd.isna(frame.loc[0, "miou_ours_std"])
    assert pd.isna(frame.loc[2, "pixel_acc_paper"]) and pd.isna(frame.loc[2, "pixel_acc_delta"])


def test_one_seed_without_per_image_counts_has_no_interval():
    """Metrics files without per-image counts and one seed: no interval, so no claim is told
    apart (the old rule called "MS helps" false on one number against another)."""
    text, _, _ = build_table("test_table", SPEC, one_seed(), HEADER)
    pairs, best = claim_lines(text)
    assert pairs == (
        "- ➖ not told apart: PSP beats FCN and MS helps — psp50 42.00 vs fcn 36.00: Δ +6.00, no interval; "
        "psp50@ms 41.50 vs psp50 42.00: Δ −0.50, no interval [no interval: one seed and no per-image statistics"
        " (metrics written before they were stored)] (paper's numbers agree)"
    )
    assert best == ("- ➖ not told apart: MS is best — psp50@ms 41.50 vs psp50 42.00: Δ −0.50, no interval "
                    "[no interval: one seed and no per-image statistics (metrics written before they were stored)]"
                    " (paper's numbers agree)")


def test_three_seeds_mean_std_and_spread():
    header = dict(HEADER, seeds=[0, 1, 2], commits=["abc1234", "def5678"])
    text, frame, _ = build_table("test_table", SPEC, three_seeds(), header)
    assert "- Seeds: 0, 1, 2" in text and "- Commit: abc1234, def5678" in text
    cells = table_cells(text)
    assert cells["Baseline"][:3] == ["37.23", "37.00 ± 1.00", "−0.23"]
    assert cells["PSPNet+MS"][:3] == ["42.78", "42.50 ± 0.50", "−0.28"]
    assert cells["PSPNet+MS"][4] == "79.00 ± 0.00"
    assert frame.loc[1, "miou_ours_std"] == pytest.approx(1.0)
    assert frame.loc[1, "miou_n_seeds"] == 3
    pairs, best = claim_lines(text)
    # Seeds only: pooled variance (2·1 + 2·1 + 2·0.25) / 6 = 0.75 with 6 degrees of freedom;
    # half-width t(0.975, 6) · sqrt(0.75 · (1/3 + 1/3)) = 2.4469 · 0.7071 = 1.73.
    assert pairs == (
        "- ➖ not told apart: PSP beats FCN and MS helps — psp50 42.00 vs fcn 37.00: Δ +5.00 ± 1.73; "
        "psp50@ms 42.50 vs psp50 42.00: Δ +0.50 ± 1.73 [no per-image statistics (metrics written before they were"
        " stored): the intervals count the seeds only] (paper's numbers agree)"
    )
    assert best == (
        "- ➖ not told apart: MS is best — psp50@ms 42.50 vs psp50 42.00: Δ +0.50 ± 1.73 "
        "[no per-image statistics (metrics written before they were stored): the intervals count the seeds only]"
        " (paper's numbers agree)"
    )


def test_three_seeds_claims_as_data():
    """The claims JSON of the same table: each pair's Δ (better − than) and half-width, the basis,
    and the verdict and paper note the Markdown line words."""
    header = dict(HEADER, seeds=[0, 1, 2], commits=["abc1234", "def5678"])
    text, _, judged = build_table("test_table", SPEC, three_seeds(), header)
    pairs, best = judged
    assert (pairs["claim"], pairs["verdict"], pairs["paper_note"], pairs["basis"]) == (
        "PSP beats FCN and MS helps", NOT_TOLD_APART, "paper's numbers agree", ["seeds"])
    assert [(p["better"], p["than"], p["ours_better"], p["ours_than"]) for p in pairs["pairs"]] == [
        ("psp50", "fcn", 42.0, 37.0), ("psp50@ms", "psp50", 42.5, 42.0)]
    # Half-width t(0.975, 6) · sqrt(0.75 · 2/3) = 1.7302 (see test_three_seeds_mean_std_and_spread).
    assert [p["delta"] for p in pairs["pairs"]] == pytest.approx([5.0, 0.5])
    assert [p["half_width"] for p in pairs["pairs"]] == pytest.approx([1.7302, 1.7302], abs=1e-4)
    # `best`: the best row against every other one, all stored, not only the rival the line shows.
    assert [(p["better"], p["than"]) for p in best["pairs"]] == [("psp50@ms", "fcn"), ("psp50@ms", "psp50")]
    assert [p["delta"] for p in best["pairs"]] == pytest.approx([5.5, 0.5])
    assert claim_lines(text) == [f"- {c['verdict']}: {c['claim']} — {c['evidence']} ({c['paper_note']})"
                                 for c in judged]


def test_claim_clear_of_spread_and_paper_disagreeing():
    spec = copy.deepcopy(SPEC)
    spec["rows"][2]["paper"]["miou"] = 40.0  # the paper's own numbers now contradict "MS helps"
    spec["claims"] = [{"claim": "PSP beats FCN", "better": ["psp50"], "than": ["fcn"]},
                      {"claim": "MS helps", "better": ["psp50@ms"], "than": ["psp50@ss"]}]
    results = three_seeds()
    results["psp50@ms"] = runs([45.0, 45.5, 46.0])
    text, _, _ = build_table("test_table", spec, results, HEADER)
    first, second = claim_lines(text)
    assert [claim["verdict"] for claim in build_table("test_table", spec, results, HEADER)[2]] == [REPRODUCED] * 2
    assert first == ("- ✅ reproduced: PSP beats FCN — psp50 42.00 vs fcn 37.00: Δ +5.00 ± 1.73 "
                     "[no per-image statistics (metrics written before they were stored): the intervals count the"
                     " seeds only] (paper's numbers agree)")
    assert second == ("- ✅ reproduced: MS helps — psp50@ms 45.50 vs psp50 42.00: Δ +3.50 ± 1.73 "
                      "[no per-image statistics (metrics written before they were stored): the intervals count the"
                      " seeds only] (paper's numbers disagree)")


def test_the_papers_own_margin_is_judged_before_anything_runs():
    """MS is best by 1.10 over psp50 in the paper: decisive; at 41.90 it would lead by 0.22 only,
    inside the ≈1 mIoU run-to-run spread of one recipe."""
    assert declared_paper_note(SPEC, SPEC["claims"][1]) == "paper's numbers agree"
    spec = copy.deepcopy(SPEC)
    spec["rows"][2]["paper"]["miou"] = 41.90
    assert declared_paper_note(spec, spec["claims"][1]) == (
        f"paper's numbers agree by 0.22, within the run-to-run spread: {NOT_DECISIVE}")
    text, _, _ = build_table("test_table", spec, one_seed(), HEADER)  # the built table says the same
    assert claim_lines(text)[1].endswith(f"within the run-to-run spread: {NOT_DECISIVE})")
    spec["rows"][2]["paper"]["miou"] = 41.00
    assert declared_paper_note(spec, spec["claims"][1]) == "paper's numbers disagree"


def test_claim_on_other_metric():
    spec = copy.deepcopy(SPEC)
    spec["claims"] = [{"claim": "PSP has higher accuracy", "better": ["psp50"], "than": ["fcn"], "metric": "pixel_acc"}]
    text, _, _ = build_table("test_table", spec, one_seed(), HEADER)
    assert claim_lines(text) == [
        "- ➖ not told apart: PSP has higher accuracy — Pixel Acc. (%): psp50 80.50 vs fcn 78.01: Δ +2.49, no interval "
        "[no interval: one seed and no per-image statistics (metrics written before they were stored)]"
        " (paper's numbers agree)"
    ]


def test_missing_row_is_an_error():
    results = one_seed()
    del results["psp50@ms"]
    with pytest.raises(SegreproError, match="PSPNet\\+MS"):
        build_table("test_table", SPEC, results, HEADER)
    results["psp50@ms"] = []
    with pytest.raises(SegreproError, match="psp50@ms"):
        build_table("test_table", SPEC, results, HEADER)


def test_missing_metric_is_an_error():
    results = one_seed()
    del results["fcn@ss"][0]["pixel_acc"]
    with pytest.raises(SegreproError, match="pixel_acc"):
        build_table("test_table", SPEC, results, HEADER)


def test_unknown_ref_is_an_error():
    spec = copy.deepcopy(SPEC)
    spec["claims"][0]["than"] = ["fcn", "psp101"]
    with pytest.raises(SegreproError, match="test_table.*psp101"):
        check_table_spec("test_table", spec)
    spec = copy.deepcopy(SPEC)
    spec["claims"][1]["best"] = "fcn@ms"  # fcn is only tested single-scale
    with pytest.raises(SegreproError, match="test_table.*fcn@ms"):
        build_table("test_table", spec, one_seed(), HEADER)


@pytest.mark.parametrize("edit, message", [
    # Cross-references, in segrepro.config.table_specs:
    (lambda s: s["claims"][0]["than"].pop(),
     "claim 'PSP beats FCN and MS helps' has 2 'better' refs but 1 'than' refs"),
    (lambda s: s["rows"].append(dict(s["rows"][0])), "row 'fcn@ss' appears twice"),
    (lambda s: s["claims"].append({"claim": "x", "best": "fcn", "metric": "gmacs"}),
     "claim 'x' uses metric 'gmacs', not among the table's metrics"),
    # Structure, from the schema's `table` (workflow/schemas/params.schema.yaml):
    (lambda s: s["claims"].append({"claim": "x", "best": "fcn", "metric": "boundary_f"}),
     "claims.2.metric: 'boundary_f' is not one of ['miou', 'pixel_acc', 'mean_acc', 'gmacs', 'score']"),
    (lambda s: s.pop("metrics"), "(top level): 'metrics' is a required property"),
    (lambda s: s.update(metrics=["miou", "miou"]), "metrics: ['miou', 'miou'] has non-unique elements"),
    (lambda s: s.update(metrics=["test_fps"]), "metrics.0: 'test_fps' is not one of"),
    (lambda s: s.update(kind="grid"), "kind: 'grid' is not one of ['rows', 'level_matrix', 'efficiency']"),
    (lambda s: s["claims"].append({"claim": "x", "best": "fcn", "better": ["fcn"], "than": ["psp50"]}),
     "claims.2: 'better' is not allowed here (a claim has either 'best' or 'better' and 'than')"),
    (lambda s: s["claims"].append({"claim": "x", "better": ["fcn"]}), "claims.2: 'than' is a required property"),
    (lambda s: s["claims"].append({"claim": "x", "better": ["fcn"], "than": ["ps@p@50"]}),
     "claims.2.than.0: 'ps@p@50' does not match"),
    (lambda s: s["rows"][0].update(experiment="fcn@ms"), "rows.0.experiment: 'fcn@ms' does not match"),
    (lambda s: s["rows"][0].pop("label"), "rows.0: 'label' is a required property"),
    (lambda s: s["rows"][0].update(head="ocr"), "rows.0: 'head' is not allowed here (efficiency rows only)"),
    (lambda s: s["rows"][0]["paper"].update(miou="high"), "rows.0.paper.miou: 'high' is not of type 'number', 'null'"),
    (lambda s: s.update(efficiency={}), "(top level): 'efficiency' is not allowed here"),
])
def test_bad_specs_are_one_line_errors(edit, message):
    spec = copy.deepcopy(SPEC)
    edit(spec)
    with pytest.raises(SegreproError) as err:
        check_table_spec("test_table", spec)
    assert str(err.value).startswith("table 'test_table': ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_spec_error_in_params_names_the_file_and_key(tmp_path):
    """Loading params/ checks the structure with the paper's file (the schema) and the
    cross-references after it: both name the file and the table's key."""
    import shutil

    import yaml

    from segrepro.config.params import load_params

    repo = pathlib.Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "params", tmp_path / "params")
    shutil.copytree(repo / "workflow" / "schemas", tmp_path / "workflow" / "schemas")
    path = tmp_path / "params" / "papers" / "pspnet.yaml"
    registry = yaml.safe_load(path.read_text())
    original = copy.deepcopy(registry)
    registry["tables"]["pspnet_table2"]["kind"] = "level_matrix"  # several rows: the schema refuses it
    path.write_text(yaml.safe_dump(registry))
    with pytest.raises(SegreproError) as err:
        load_params(tmp_path, workflow={"scale": "tiny"})
    assert str(err.value).startswith("params/papers/pspnet.yaml: tables.pspnet_table2.rows: ")
    assert "at most 1 (a level_matrix table analyses exactly one experiment)" in str(err.value)
    registry = copy.deepcopy(original)
    registry["tables"]["pspnet_table2"]["claims"][0]["than"][0] = "psp101"  # a row the table lacks
    path.write_text(yaml.safe_dump(registry))
    with pytest.raises(SegreproError) as err:
        load_params(tmp_path, workflow={"scale": "tiny"})
    assert str(err.value).startswith("params/papers/pspnet.yaml: tables.pspnet_table2: claim ")
    assert "refers to 'psp101', which is not a row of the table" in str(err.value)


def test_real_paper_specs_are_valid():
    import pathlib

    import yaml

    papers = pathlib.Path(__file__).resolve().parents[1] / "params" / "papers"
    for path in sorted(papers.glob("*.yaml")):
        for name, spec in (yaml.safe_load(path.read_text()).get("tables") or {}).items():
            check_table_spec(name, spec)


def test_write_files_is_atomic_and_round_trips(tmp_path):
    text, frame, judged = build_table("test_table", SPEC, three_seeds(), HEADER)
    target = tmp_path / "tables" / "test_table.md"
    document = header_claims_document("test_table", SPEC, HEADER, judged, CLAIMS_NOTE)
    write_files(target, text, frame, document)
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "test_table.claims.json", "test_table.csv", "test_table.md"]
    assert target.read_text(encoding="utf-8") == text
    back = pd.read_csv(target.with_suffix(".csv"))
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    stored = read_claims(claims_path(target))
    assert stored == json.loads(json.dumps(document))
    assert (stored["table"], stored["kind"], stored["scale"], stored["seeds"], stored["dataset"]) == (
        "test_table", "rows", "tiny", [0], "ade20k")
    assert [claim["claim"] for claim in stored["claims"]] == ["PSP beats FCN and MS helps", "MS is best"]
    # A second write replaces every file, again leaving no temp file behind.
    write_files(target, text.replace("ade20k", "cityscapes"), frame, dict(document, dataset="cityscapes"))
    assert "cityscapes" in target.read_text(encoding="utf-8")
    assert read_claims(claims_path(target))["dataset"] == "cityscapes"
    assert len(list(target.parent.iterdir())) == 3


def test_load_metrics(tmp_path):
    good = tmp_path / "metrics.json"
    good.write_text(json.dumps({"miou": 41.0, "pixel_acc": 80.0, "seed": 0}))
    assert load_metrics(good)["miou"] == 41.0
    with pytest.raises(SegreproError, match="missing.json"):
        load_metrics(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SegreproError, match="bad.json"):
        load_metrics(bad)
    wrong = tmp_path / "list.json"
    wrong.write_text("[1, 2]")
    with pytest.raises(SegreproError, match="list.json"):
        load_metrics(wrong)


def test_level_matrix_spec_needs_one_row_and_a_square_paper_matrix():
    spec = {"title": "t", "kind": "level_matrix", "metrics": ["miou"],
            "rows": [{"label": "I", "experiment": "I", "protocol": "ss"}], "paper_matrix": [[1.0, 2.0], [3.0]]}
    with pytest.raises(SegreproError, match="square"):
        check_table_spec("t9", spec)
    two_rows = dict(spec, paper_matrix=None, rows=spec["rows"] + [{"label": "J", "experiment": "J", "protocol": "ss"}])
    with pytest.raises(SegreproError, match="exactly one experiment"):
        check_table_spec("t9", two_rows)
    with pytest.raises(SegreproError, match="'grid' is not allowed here \\(a level_matrix table has no grid\\)"):
        check_table_spec("t9", dict(spec, paper_matrix=None, grid={"rows": ["a"], "columns": ["b"]}))


# ----------------------------------------------------------------------------- computation (HFGD Table 9)

FLOPS_SPEC = {
    "title": "Table 9. Computation",
    "metrics": ["gmacs", "miou"],
    "flops": {"input_size": 513, "num_classes": 59, "scale": "paper"},
    "rows": [
        {"label": "Dilated", "experiment": "d8", "protocol": "ss", "paper": {"gmacs": 100.0, "miou": 50.0}},
        {"label": "Ours", "experiment": "ours", "protocol": "ss", "paper": {"gmacs": 50.0, "miou": 51.0},
         "flops_note": "Our upsampler is wider."},
        {"label": "Other", "experiment": "other", "protocol": "ss", "paper": {"gmacs": 20.0, "miou": 40.0}},
    ],
    "claims": [
        {"claim": "Ours is cheaper than dilation", "metric": "gmacs", "better": ["ours"], "than": ["d8"]},
        {"claim": "Other is the cheapest", "metric": "gmacs", "best": "other"},
    ],
}
COUNTS = {"d8": {"gmacs": 102.0, "backbone_gmacs": 80.0}, "ours": {"gmacs": 60.0, "backbone_gmacs": 30.0},
          "other": {"gmacs": 25.0, "backbone_gmacs": 20.0}}


def flops_results():
    return {f"{e}@ss": [{"seed": 0, "miou": 45.0, "gmacs": c["gmacs"]}] for e, c in COUNTS.items()}


def test_computation_claims_count_lower_as_better():
    text, frame, _ = build_table("t9", FLOPS_SPEC, flops_results(), HEADER, COUNTS)
    claims = text.split("## Claims")[1]
    # A count has no uncertainty: the verdict is its sign, with no interval and no remark.
    assert ("✅ reproduced: Ours is cheaper than dilation — GMACs: ours 60.00 vs d8 102.00: Δ −42.00"
            " (paper's numbers agree)") in claims
    assert ("✅ reproduced: Other is the cheapest — GMACs: other 25.00 vs ours 60.00: Δ −35.00"
            " (paper's numbers agree)") in claims
    assert list(frame["gmacs_delta"]) == pytest.approx([2.0, 10.0, 5.0])


def test_counts_far_from_the_paper_say_why():
    text, _, _ = build_table("t9", FLOPS_SPEC, flops_results(), HEADER, COUNTS)
    section = text.split("GMACs: multiply-adds")[1].split("## Claims")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    # 102 vs 100 is within 3 %: no explanation needed; 60 vs 50 (+20 %) gives the row's note;
    # 25 vs 20 has none recorded, and the table says so.
    assert lines[0] == "- Dilated: 102.00 = backbone 80.00 + rest 22.00; the paper's 100.00 (+2.00 %)"
    assert lines[1].endswith("(+20.00 %). Our upsampler is wider.")
    assert lines[2].endswith("(+25.00 %). Not explained.")
    assert "513² RGB image" in section and "'paper' scale" in section


def test_a_row_counted_as_the_paper_counted_it_says_how():
    counts = dict(COUNTS, other=dict(COUNTS["other"], input_size=512, num_classes=150))
    text, _, _ = build_table("t9", FLOPS_SPEC, flops_results(), HEADER, counts)
    section = text.split("GMACs: multiply-adds")[1].split("## Claims")[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert lines[2].startswith("- Other: 25.00 = backbone 20.00 + rest 5.00 (counted on a 512² image, 150 classes);")
    assert "counted on" not in lines[0]


def test_a_computation_table_needs_its_counts():
    with pytest.raises(SegreproError, match="no counts"):
        build_table("t9", FLOPS_SPEC, flops_results(), HEADER)
