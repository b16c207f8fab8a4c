"""SaF's efficiency tables (Table 5, Table B): the comparison heads, the timing record, the table
rendered from it with its claims, the spec's one-line errors, and a tiny build through the workflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_workflow import job_stats, snakemake

from segrepro.config import efficiency_spec
from segrepro.config.params import load_params
from segrepro.config.schema import schema_defs
from segrepro.config.table_specs import check_table_spec
from segrepro.core import paths
from segrepro.core.errors import SegreproError
from segrepro.measure import efficiency
from segrepro.models.saf import context_heads
from segrepro.models.saf.context_heads import (
    CrissCrossAttention,
    ObjectContextHead,
    build_comparison_model,
)
from segrepro.pipeline import codedeps
from segrepro.reporting import efficiency_table
from segrepro.reporting.markdown import CONTRADICTED, NOT_TOLD_APART, REPRODUCED

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT)


# ----------------------------------------------------------------------------- the heads

def criss_cross(channels: int = 8) -> CrissCrossAttention:
    torch.manual_seed(0)
    block = CrissCrossAttention(channels)
    with torch.no_grad():
        block.gamma.fill_(1.0)  # at its initial 0 the block returns its input unchanged
    return block


def test_criss_cross_attention_starts_as_the_identity():
    x = torch.randn(2, 8, 5, 6)
    assert torch.equal(CrissCrossAttention(8)(x), x)


def test_criss_cross_attention_matches_its_definition():
    """CCNet Sec. 3.2 by hand: position u attends to its column and its row, itself once."""
    block = criss_cross()
    x = torch.randn(1, 8, 4, 5)
    with torch.no_grad():
        out = block(x)
        q, k, v = block.query(x)[0], block.key(x)[0], block.value(x)[0]
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            others = [(r, j) for r in range(height) if r != i] + [(i, c) for c in range(width)]
            energies = torch.stack([q[:, i, j] @ k[:, r, c] for r, c in others])
            weights = torch.softmax(energies, dim=0)
            expected = sum(w * v[:, r, c] for w, (r, c) in zip(weights, others)) + x[0, :, i, j]
            assert torch.allclose(out[0, :, i, j], expected, atol=1e-5), (i, j)


def test_criss_cross_attention_mixes_only_a_pixels_row_and_column_per_recurrence():
    block = criss_cross()
    x = torch.randn(1, 8, 6, 7)
    i, j = 2, 3
    outside, in_row = x.clone(), x.clone()
    outside[:, :, 4, 5] += 10.0  # neither row 2 nor column 3
    in_row[:, :, 2, 5] += 10.0
    with torch.no_grad():
        once = block(x)[..., i, j]
        assert torch.equal(block(outside)[..., i, j], once)
        assert not torch.allclose(block(in_row)[..., i, j], once)
        # The second recurrence (R = 2) reaches every position: (4, 5) -> (2, 5) or (4, 3) -> (2, 3).
        assert not torch.allclose(block(block(outside))[..., i, j], block(block(x))[..., i, j])


def test_ocr_head_on_identical_pixels_gives_identical_outputs():
    """All object regions pool the same pixel representation, so every pixel gets the same context."""
    torch.manual_seed(0)
    head = ObjectContextHead(6, 8, 4, NUM_CLASSES).eval()
    x = torch.randn(1, 6, 1, 1).expand(1, 6, 5, 7).contiguous()
    with torch.no_grad():
        outputs = head(x)
    logits = outputs["semantic"][0]
    assert logits.shape == (1, NUM_CLASSES, 5, 7) and outputs["regions"][0].shape == (1, NUM_CLASSES, 5, 7)
    # away from the border (the 3x3 convolution sees the zero padding there)
    assert torch.allclose(logits[..., 1:-1, 1:-1], logits[..., 2:3, 2:3].expand_as(logits[..., 1:-1, 1:-1]), atol=1e-5)


@pytest.mark.parametrize("head, stride, side", [
    ("plain", None, 16), ("ccnet", None, 16), ("ocr", None, 16), ("plain", 32, 2), ("plain", 8, 8),
])
def test_comparison_models_train_and_predict(params, head, stride, side):
    config = params.resolve("saf", "A_resnet101", "tiny")["model"]
    torch.manual_seed(0)
    model = build_comparison_model(config, NUM_CLASSES, head, stride)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64))
    outputs = model(images)
    assert outputs["semantic"][-1].shape == (2, NUM_CLASSES, side, side)
    loss, parts = model.loss(outputs, labels)
    # OCR adds its soft object regions' loss with weight 0.4 (OCR Sec. 3.4)
    expected = parts["main"] + 0.4 * parts["aux"] if head == "ocr" else parts["main"]
    assert set(parts) == ({"main", "aux"} if head == "ocr" else {"main"}) and torch.allclose(loss, expected)
    loss.backward()
    assert model.eval().predict(images).shape == (2, NUM_CLASSES, 64, 64)


def test_unknown_head_and_stride_are_one_line_errors(params):
    config = params.resolve("saf", "A", "tiny")["model"]
    with pytest.raises(SegreproError, match="unknown comparison head 'aspp'"):
        build_comparison_model(config, NUM_CLASSES, "aspp")
    with pytest.raises(SegreproError, match="output stride 16 is not 8 or 32"):
        build_comparison_model(config, NUM_CLASSES, "plain", 16)


def test_the_table_module_knows_the_heads_without_importing_them():
    assert efficiency_spec.COMPARISON_HEADS == context_heads.HEADS


# ----------------------------------------------------------------------------- code inputs

def test_only_the_efficiency_stage_runs_model_code():
    src = str(ROOT / "src")

    def stage(name, family=None):
        return {str(Path(p).relative_to(src)) for p in codedeps.stage_sources(name, family, source_root=src)}

    table, timing = stage("table"), stage("efficiency", "saf")
    assert "segrepro/reporting/efficiency_table.py" in table
    assert not {"segrepro/measure/efficiency.py", "segrepro/measure/efficiency_probe.py",
                "segrepro/engine/train.py"} & table
    assert not any("models" in p for p in table)
    assert {"segrepro/measure/efficiency.py", "segrepro/measure/efficiency_probe.py", "segrepro/engine/train.py",
            "segrepro/models/saf/context_heads.py",
            "segrepro/models/saf/specialize_fuse.py", "segrepro/models/common/layers.py"} <= timing
    assert not {"segrepro/models/hfgd/hfgd.py", "segrepro/models/pspnet/pspnet.py"} & timing


# ----------------------------------------------------------------------------- jobs

def test_row_jobs_time_the_papers_architectures_at_the_demo_scale(params):
    jobs = efficiency.row_jobs(params, "table5", "demo", "cpu", 2)
    assert {job["model"]["backbone"]["name"] for job in jobs.values()} == {"hrnet_w48"}
    assert not any(job["model"]["backbone"]["pretrained"] for job in jobs.values())
    assert [jobs[row]["head"] for row in ("hrnet48", "ccnet", "anl", "ocr", "ours")] == [
        None, "ccnet", None, "ocr", None]
    assert (jobs["ours"]["model"]["head"]["output"], jobs["anl"]["model"]["head"]["context"]) == ("pyramidal", "anl")
    assert (jobs["ours"]["input_size"], jobs["ours"]["threads"], jobs["ours"]["batch_size"]) == (256, 2, 4)
    assert efficiency.row_jobs(params, "table5", "demo", "cuda", None)["ours"]["input_size"] == 512
    tiny = efficiency.row_jobs(params, "tableB", "tiny", "cpu", None)
    assert {job["model"]["backbone"]["name"] for job in tiny.values()} == {"resnet18"}
    assert [job["resnet_output_stride"] for job in tiny.values()] == [32, 8, None, None]


def test_only_an_efficiency_table_is_timed(params):
    with pytest.raises(SegreproError, match="'table6' is not of kind 'efficiency'"):
        efficiency.row_jobs(params, "table6", "tiny", "cpu", None)


# ----------------------------------------------------------------------------- the table

MEASURED = {  # row id -> (test FPS, train it/s, train memory)
    "hrnet48": (10.0, 1.00, 4.0), "ccnet": (6.0, 0.50, 6.0), "anl": (9.0, 0.90, 4.2),
    "ocr": (8.0, 0.70, 5.0), "ours": (8.2, 0.52, 6.8),
}


def record_of(measured: dict, **changes) -> dict:
    record = {
        "table": "table5", "scale": "demo", "model_scale": "paper", "device": "cpu", "device_name": "Test CPU",
        "threads": 2, "torch": "2.x", "num_classes": 150, "batch_size": 4, "precision": "fp32", "input_size": 256,
        "warmup": 2, "test_images": 10, "train_steps": 5, "commit": "abc", "rows": {
            key: {"test_fps": fps, "train_its": its, "train_mem_gb": mem, "backbone": "hrnet_w48", "params_m": 1.0,
                  "rss_before_model_gb": 0.5, "test_seconds": 10 / fps, "train_seconds": 5 / its,
                  # both threads busy all the time, but for the first row's training (half the time)
                  "test_cpu_seconds": 2 * 10 / fps, "train_cpu_seconds": (1 if key == "hrnet48" else 2) * 5 / its}
            for key, (fps, its, mem) in measured.items()},
    }
    return {**record, **changes}


def test_table_from_a_record(params):
    _, spec = params.table("table5")
    text, frame, judged = efficiency_table.build_efficiency_table("table5", spec, record_of(MEASURED))
    assert "- Device: Test CPU (CPU, 2 torch threads); the paper's: GeForce RTX 2080 Ti" in text
    assert "- Input: 256×256 random images (a CPU times a smaller input" in text
    assert "batch 4" in text and "- Precision: fp32" in text and "peak resident set size" in text
    assert "less what the process held before the model was built (0.50 G:" in text
    # HRNet48: (2 + 5) CPU seconds of 2 threads over 1 + 5 wall seconds
    assert "- CPU share while timed: 58%–100% of the threads' time per row (other processes shared the cores" in text
    # paper, ours, then each divided by the reference row (HRNet48): 21 / 28 = 0.75, 6 / 10 = 0.60
    assert "| HRNet48 + CCNet | 21 | 6 | 0.75× | 0.60× | 1.7 | 0.5 | 0.65× | 0.50× | 9.9 | 6 | 1.21× | 1.50× |" in text
    claims = [line for line in text.splitlines() if line.startswith(("- ✅", "- ❌", "- ➖"))]
    # The same three verdicts as every table; a timing's interval is its 10 % noise band.
    assert claims == [
        "- ✅ reproduced: Our head tests faster than CCNet — Test FPS: HRNet48 + ours 8.2 > HRNet48 + CCNet 6"
        " (paper's numbers agree)",
        "- ➖ not told apart: Our head trains faster than CCNet — Train it/s:"
        " HRNet48 + ours 0.52 > HRNet48 + CCNet 0.5 [within 10%, the timing noise] (paper's numbers agree)",
        "- ❌ contradicted: Our head needs less training memory than CCNet and OCR — Train mem. (G):"
        " HRNet48 + ours 6.8 ≥ HRNet48 + CCNet 6; HRNet48 + ours 6.8 ≥ HRNet48 + OCR 5 (paper's numbers agree)",
    ]
    # The same claims as data (NAME.claims.json): each pair with our two values and their difference.
    assert [claim["verdict"] for claim in judged] == [REPRODUCED, NOT_TOLD_APART, CONTRADICTED]
    assert [f"- {c['verdict']}: {c['claim']} — {c['evidence']} ({c['paper_note']})" for c in judged] == claims
    (fps,) = judged[0]["pairs"]
    assert (fps["better"], fps["than"], fps["metric"], fps["ours_better"], fps["ours_than"]) == \
        ("ours", "ccnet", "test_fps", 8.2, 6.0)
    assert fps["delta"] == pytest.approx(2.2) and fps["half_width"] is None and judged[0]["basis"] == ["timing noise"]
    assert [(pair["than"], pair["delta"]) for pair in judged[2]["pairs"]] == [("ccnet", pytest.approx(0.8)),
                                                                              ("ocr", pytest.approx(1.8))]
    row = frame.set_index("id").loc["ours"]
    assert (row["test_fps_ours"], row["test_fps_paper"], row["test_fps_ours_rel"]) == (8.2, 24.0, pytest.approx(0.82))
    assert (row["head"], row["device"], row["input_size"]) == ("", "cpu", 256)


def test_table_b_divides_by_the_dilated_resnet_and_leaves_missing_paper_numbers_empty(params):
    _, spec = params.table("tableB")
    measured = {"resnet101": (20.0, 2.0, 3.0), "dilated": (5.0, 0.5, 8.0), "decoder": (8.0, 0.8, 6.0),
                "decoder_ours": (6.0, 0.6, 6.5)}
    text, _, _ = efficiency_table.build_efficiency_table("tableB", spec, record_of(measured, table="tableB"))
    # the paper gives no training it/s in Table B; 32 / 24 = 1.33, 8.4 / 9.6 = 0.88
    assert "| ResNet101-decoder | 32 | 8 | 1.33× | 1.60× | – | 0.8 | – | 1.60× | 8.4 | 6 | 0.88× | 0.75× |" in text
    assert text.count("- ✅ reproduced") == 4


def test_a_cuda_record_names_its_memory_measure(params):
    _, spec = params.table("table5")
    record = record_of(MEASURED, device="cuda", device_name="NVIDIA H200", input_size=512, test_images=50)
    text, _, _ = efficiency_table.build_efficiency_table("table5", spec, record)
    assert "- Device: NVIDIA H200 (GPU); the paper's: GeForce RTX 2080 Ti" in text
    assert "- Input: 512×512 random images, 150 classes" in text and "allocator reserved" in text


def test_write_table_needs_the_measurements_of_its_scale(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, spec = params.table("table5")
    out = tmp_path / "table5.md"
    with pytest.raises(SegreproError, match=r"no measurements \(run `segrepro efficiency table5 --scale demo`\)"):
        efficiency_table.write_efficiency_table(params, "table5", spec, "demo", out)
    path = paths.efficiency_path("table5")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record_of(MEASURED, scale="tiny")))
    with pytest.raises(SegreproError, match="measures table 'table5' at scale 'tiny'"):
        efficiency_table.write_efficiency_table(params, "table5", spec, "demo", out)
    path.write_text(json.dumps(record_of({k: v for k, v in MEASURED.items() if k != "ocr"})))
    with pytest.raises(SegreproError, match="no measurement of row 'ocr'"):
        efficiency_table.write_efficiency_table(params, "table5", spec, "demo", out)
    path.write_text(json.dumps(record_of(MEASURED)))
    efficiency_table.write_efficiency_table(params, "table5", spec, "demo", out)
    assert out.is_file() and out.with_suffix(".csv").is_file()


# ----------------------------------------------------------------------------- bad specs

def broken(spec: dict, change) -> dict:
    spec = copy.deepcopy(spec)
    change(spec)
    return spec


@pytest.mark.parametrize("change, message", [
    # The structure, from the schema's efficiency_table (workflow/schemas/params.schema.yaml):
    (lambda s: s["rows"][1].update(head="aspp"), "rows.1.head: 'aspp' is not one of ['plain', 'ccnet', 'ocr']"),
    (lambda s: s["rows"][0].update(resnet_output_stride=8),
     "rows.0: 'head' is a dependency of 'resnet_output_stride'"),
    (lambda s: s["rows"][1].update(resnet_output_stride=16),
     "rows.1.resnet_output_stride: 16 is not one of [8, 32]"),
    (lambda s: s["rows"][0].update(protocol="ms"),
     "rows.0.protocol: 'ms' given, 'ss' expected (only the single-scale test pass is timed)"),
    (lambda s: s["rows"][0]["paper"].update(test_fps=-1),
     "rows.0.paper.test_fps: -1 is less than or equal to the minimum of 0"),
    (lambda s: s["rows"][0]["paper"].update(miou=40.0),
     "rows.0.paper: 'miou' is not one of ['test_fps', 'train_its', 'train_mem_gb']"),
    (lambda s: s["rows"][0].pop("id"), "rows.0: 'id' is a required property"),
    (lambda s: s["claims"][0].pop("metric"), "claims.0: 'metric' is a required property"),
    (lambda s: s["claims"][0].update(best="ours"),
     "claims.0: 'best' is not allowed here (an efficiency claim compares"),
    (lambda s: s["efficiency"]["cpu"].update(input_size=100), "efficiency.cpu.input_size: 100 is not a multiple of 32"),
    (lambda s: s["efficiency"].update(precision="fp16"), "efficiency.precision: 'fp16' is not one of ['fp32', 'bf16']"),
    (lambda s: s.update(metrics=["miou"]), "metrics.0: 'miou' is not one of ['test_fps', 'train_its', 'train_mem_gb']"),
    (lambda s: s.update(grid={"rows": ["a"], "columns": ["b"]}),
     "(top level): 'grid' is not allowed here (an efficiency table has no grid)"),
    # What refers to other keys, in segrepro.config.efficiency_spec:
    (lambda s: s["rows"][2].update(id="ccnet"), "row 'ccnet': the id must be unique"),
    (lambda s: s["claims"][0].update(than=["pspnet"]), "refers to 'pspnet', which is not a row id"),
    (lambda s: s.update(metrics=["test_fps", "train_mem_gb"]),
     "claim 'Our head trains faster than CCNet' needs a 'metric' among the table's"),
    (lambda s: s["claims"][2].update(than=["ccnet"]), "needs 'better' and 'than' lists of row ids of equal length"),
    (lambda s: s["efficiency"].update(reference="nope"), "efficiency.reference 'nope' is not a row id"),
])
def test_bad_spec_is_a_one_line_error(params, change, message):
    _, spec = params.table("table5")
    with pytest.raises(SegreproError) as err:
        check_table_spec("table5", broken(spec, change))
    assert str(err.value).startswith("table 'table5': ") and message in str(err.value) and "\n" not in str(err.value)


def test_the_enumerations_come_from_the_schema():
    defs = schema_defs()
    assert set(efficiency_spec.METRICS) == set(defs["efficiency_metric"]["enum"])
    assert efficiency_spec.COMPARISON_HEADS == tuple(defs["comparison_head"]["enum"])
    assert efficiency_spec.MACHINE_KEYS == tuple(defs["efficiency_machine"]["required"])


def test_bad_spec_in_params_stops_the_cli(project, edit_params, segrepro):
    registry = edit_params("papers/saf.yaml", {})
    rows = registry["tables"]["tableB"]["rows"]
    rows[2]["resnet_output_stride"] = 8  # the decoder row has no comparison head
    edit_params("papers/saf.yaml", {"tables": {"tableB": {"rows": rows}}})
    result = segrepro("efficiency", "tableB", "--scale", "tiny")
    assert result.returncode == 1
    assert result.stderr.strip() == ("segrepro: error: params/papers/saf.yaml: tables.tableB.rows.2: 'head' is a"
                                     " dependency of 'resnet_output_stride'")


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_tiny_table5_through_the_workflow(project, edit_params, segrepro):
    """`snakemake results/tables/table5.md` at the tiny scale: one efficiency job (two rows, each in a
    process of its own, on a small input) and the table; no dataset, no training."""
    registry = edit_params("papers/saf.yaml", {})
    spec = registry["tables"]["table5"]
    rows = [row for row in spec["rows"] if row["id"] in ("hrnet48", "ocr")]
    cpu = {"input_size": 64, "warmup": 1, "test_images": 2, "train_steps": 1}
    claims = [{"claim": "OCR costs training memory", "metric": "train_mem_gb", "better": ["hrnet48"], "than": ["ocr"]}]
    edit_params("papers/saf.yaml", {"tables": {"table5": {"rows": rows, "claims": claims, "efficiency": {"cpu": cpu}}}})

    result = snakemake(project, "--cores", "2", "results/tables/table5.md", "--config", "scale=tiny")
    assert result.returncode == 0, result.stdout[-3000:]
    assert job_stats(result.stdout) == {"efficiency": 1, "table": 1}

    record = json.loads((project / "results/efficiency/table5.json").read_text())
    assert (record["scale"], record["model_scale"], record["device"], record["threads"]) == ("tiny", "tiny", "cpu", 2)
    assert set(record["rows"]) == {"hrnet48", "ocr"}
    assert all(row["test_fps"] > 0 and row["train_its"] > 0 and row["train_mem_gb"] > 0
               and row["train_mem_gb"] == pytest.approx(row["peak_rss_gb"] - row["rss_before_model_gb"])
               for row in record["rows"].values())
    text = (project / "results/tables/table5.md").read_text()
    assert "- Input: 64×64 random images" in text and "| HRNet48 + OCR | 24 |" in text
    assert "OCR costs training memory" in text
    again = snakemake(project, "-n", "--cores", "2", "results/tables/table5.md", "--config", "scale=tiny")
    assert "Nothing to be done" in again.stdout

    # A failing measurement is one line naming the row.
    with pytest.raises(SegreproError) as err:
        job = efficiency.row_jobs(load_params(project), "table5", "tiny", "cpu", 1)["ocr"]
        efficiency.run_probe(dict(job, head="aspp"), "table 'table5', row 'ocr'")
    assert str(err.value) == ("table 'table5', row 'ocr': the measurement failed: unknown comparison head 'aspp'"
                              " (known: plain, ccnet, ocr)")
