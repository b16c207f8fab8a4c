"""The benchmarks run in their --quick form and write complete, sane figures (not timed tests:
nothing here asserts that anything is fast)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_benchmark(name: str, out, *args: str, timeout: float = 300) -> dict:
    """Run benchmarks/NAME.py --quick --out OUT on the CPU; return its JSON figures, after checking
    that it wrote OUT/NAME.json and OUT/NAME.md (one table, one title) and nothing else but what
    the benchmark names (scaling's PNG)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--quick", "--device", "cpu", "--out", str(out),
         *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith("# ") and markdown.count("\n# ") == 0, markdown  # one title: replaced, not appended
    assert "|---" in markdown
    assert {p.name for p in out.iterdir()} <= {f"{name}.json", f"{name}.md", f"{name}.png"}
    record = json.loads((out / f"{name}.json").read_text())
    assert record["benchmark"] == name
    return record


def test_figures_are_replaced_on_each_run_never_appended(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import write_results
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    write_results(tmp_path / "new", "bench", {"run": 1}, "# first\n\n| a |\n|---|\n| 1 |")
    json_path, md_path = write_results(tmp_path / "new", "bench", {"run": 2}, "# second")
    assert json.loads(json_path.read_text()) == {"run": 2}
    assert md_path.read_text() == "# second\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["bench.json", "bench.md"]  # no temporaries left


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_peers_compares_every_model_with_its_peer(tmp_path):
    record = run_benchmark("peers", tmp_path)
    assert set(record["pairs"]) == {"PSPNet", "SemanticFPN", "DeepLabV3+"}
    assert record["settings"]["repeats"] == 2
    for name, pair in record["pairs"].items():
        assert pair["peer"]["encoder"] == "tu-resnet50s", name  # the same timm backbone as ours
        for side in ("ours", "peer"):
            figures = pair[side]
            for key in ("params_m", "train_step_gflop", "inference_gflop", "train_images_per_s",
                        "inference_images_per_s", "train_tflop_per_s", "peak_mib"):
                assert positive(figures[key]), (name, side, key, figures[key])
            step = figures["train_step_s"]
            assert 0 < step["min"] <= step["median"] <= step["max"]
            # a training step (forward + backward) costs more FLOPs than inference alone
            assert figures["train_step_gflop"] > figures["inference_gflop"]
        for ratio in ("train_ratio", "inference_ratio"):
            r = pair[ratio]
            assert positive(r["min"]) and r["min"] <= r["median"] <= r["max"], (name, ratio, r)
        assert positive(pair["train_work_rate_ratio"])
    assert positive(record["smp_default_pspnet"]["train_step_gflop"])
    # smp's default PSPNet stops after layer2: far less work than the paper's depth-5 network
    assert record["smp_default_pspnet"]["train_step_gflop"] < record["pairs"]["PSPNet"]["peer"]["train_step_gflop"]


def test_scaling_sweeps_sizes_and_levels_and_plots(tmp_path):
    record = run_benchmark("scaling", tmp_path)
    assert [p["size"] for p in record["sizes"]] == [64, 96]
    assert [p["levels"] for p in record["levels"]] == [2, 3, 4]
    assert record["levels"][0]["strides"] == [32, 4]  # experiment K's
    for p in record["sizes"] + record["levels"]:
        assert positive(p["step_s"]["median"]) and positive(p["peak_mib"]) and positive(p["train_step_gflop"])
    gflops = [p["train_step_gflop"] for p in record["sizes"]]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]  # more pixels, more work
    assert (tmp_path / "scaling.png").read_bytes().startswith(PNG_SIGNATURE)


def test_train_speed_runs_what_the_cpu_has_and_says_what_it_skips(tmp_path):
    record = run_benchmark("train_speed", tmp_path)
    assert set(record["variants"]) == {"fp32", "bf16", "bf16 + channels_last", "bf16 + cudnn_benchmark",
                                       "bf16 + compile", "all on"}
    ran = {name: v for name, v in record["variants"].items() if "skipped" not in v}
    assert set(ran) == {"fp32", "bf16 + channels_last"}
    for v in ran.values():
        assert positive(v["it_per_s"]) and v["mfu"] is None  # no known peak for a CPU
    assert all(v["skipped"] for name, v in record["variants"].items() if name not in ran)
    assert positive(record["train_step_gflop"])
    assert "MFU not given" in record["mfu_note"]


@pytest.mark.slow
def test_pipeline_overheads_and_loader_ratio(tmp_path):
    record = run_benchmark("pipeline", tmp_path)
    for scale in ("demo", "paper"):
        assert record["dry_run"][scale]["jobs"] > 10 and positive(record["dry_run"][scale]["seconds"]["median"])
    assert record["noop_rerun"]["target"] == "results/tables/pyramid_stats.md"
    assert positive(record["noop_rerun"]["rerun_seconds"]["median"])
    loading = record["datasets"]["synthetic-tiny"]["loading"]
    assert set(loading) == {"0", "1", "2"}
    assert all(positive(w["images_per_s"]) for w in loading.values())
    assert set(record["training"]) == {"saf/I", "pspnet/psp50", "hfgd/sfpn_identity"}
    for ratio in record["loader_vs_training"].values():
        assert all(positive(ratio[f"{w}_workers"]) for w in (0, 1, 2))
        assert 0 < ratio["inline_share"] < 1


def test_pyramid_gt_times_both_dtypes_against_the_one_read_bound(tmp_path):
    record = run_benchmark("pyramid_gt", tmp_path)
    assert (record["settings"]["batch"], record["settings"]["size"]) == (2, 64)
    assert set(record["inputs"]) == {"uint8", "int64"}
    for figures in record["inputs"].values():
        timing = figures["pyramid_targets_s"]
        assert positive(timing["min"]) and timing["min"] <= timing["median"]
        assert positive(figures["five_d_s"]) and positive(figures["bound_s"])
        # label maps/s is batch / best time, the ratio best time / bound time
        assert math.isclose(figures["label_maps_per_s"], 2 / timing["min"])
        assert math.isclose(figures["ratio_to_bound"], timing["min"] / figures["bound_s"])
    assert record["inputs"]["int64"]["input_mib"] == 8 * record["inputs"]["uint8"]["input_mib"]
