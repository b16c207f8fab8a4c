"""The claims' uncertainty: per-image counts (compact, exact), the paired bootstrap with the
seeds' spread on constructed runs whose true difference is known (coverage, shrinking with more
images), and the three verdicts of a table: on intervals, not on means; from old metrics files
without per-image counts; end to end on a tiny build with two seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segrepro.core import per_image
from segrepro.engine.metrics import ConfusionMatrix
from segrepro.reporting import bootstrap
from segrepro.reporting.markdown import CONTRADICTED, NOT_DECISIVE, NOT_TOLD_APART, REPRODUCED, read_claims
from segrepro.reporting.tables import build_table, load_run

# ----------------------------------------------------------------------------- per-image counts


def test_per_image_counts_by_hand():
    cm = ConfusionMatrix(3, ignore_index=255, per_image=True)
    # image 1: truth [0 0 1 255], prediction [0 1 1 2] -> class 0: tp 1 fn 1; class 1: tp 1 fp 1
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 255]))
    # image 2: truth [2 2], prediction [2 0] -> class 2: tp 1 fn 1; class 0: fp 1
    cm.update(torch.tensor([2, 0]), torch.tensor([2, 2]))
    counts = cm.per_image_counts()
    assert counts["tp"].tolist() == [[1, 1, 0], [0, 0, 1]]
    assert counts["fp"].tolist() == [[0, 1, 0], [1, 0, 0]]
    assert counts["fn"].tolist() == [[1, 0, 0], [0, 0, 1]]


def test_metrics_of_summed_counts_equal_the_confusion_matrix():
    rng = np.random.default_rng(1)
    cm = ConfusionMatrix(5, per_image=True)
    for _ in range(7):
        truth = torch.as_tensor(rng.integers(0, 5, size=(9, 11)))
        truth[truth == 4] = 255  # class 4 never labelled: its IoU is 0 where predicted, else undefined
        cm.update(torch.as_tensor(rng.integers(0, 5, size=(9, 11))), truth)
    summary = cm.summary()
    totals = {key: value.sum(axis=0).astype(float) for key, value in cm.per_image_counts().items()}
    for metric in ("miou", "pixel_acc", "mean_acc"):
        assert bootstrap.metric_of_counts(metric, **totals) == pytest.approx(summary[metric], abs=1e-9)


def test_per_image_file_of_ade20k_size_is_small_and_exact(tmp_path):
    """2,000 images x 150 classes, ~12 classes per image with up to 512x683 pixels each."""
    rng = np.random.default_rng(0)
    n, k = 2000, 150
    counts = {key: np.zeros((n, k), np.int64) for key in per_image.COUNT_KEYS}
    for i in range(n):
        present = rng.choice(k, size=12, replace=False)
        for key in per_image.COUNT_KEYS:
            counts[key][i, present] = rng.integers(0, 512 * 683 // 12, size=12)
    path = tmp_path / "ss.per_image.npz"
    ids = [f"ADE_val_{i:08d}" for i in range(n)]
    per_image.write_per_image(path, counts, ids)
    assert path.stat().st_size < 3 * 2**20
    loaded = per_image.load_per_image(path)
    assert loaded["image_ids"] == ids
    assert all(np.array_equal(loaded[key], counts[key]) for key in per_image.COUNT_KEYS)


# ----------------------------------------------------------------------------- constructed runs

def constructed_runs(rng, n_images: int, n_seeds: int, delta: float, image_spread: float, seed_spread: float):
    """Two methods on n_images images of 4 classes, n_seeds runs each. Per image and class a
    union of u pixels of which Binomial(u, p) are correct; method b's p is a's + delta + an
    image's own effect (mean 0), each run adds its seed's effect (mean 0). The population mIoU
    difference is therefore exactly 100 * delta."""
    base = np.array([0.45, 0.55, 0.5, 0.6])
    union = rng.integers(20, 400, size=(n_images, 4)) * (rng.random((n_images, 4)) < 0.8)
    image_effect = rng.normal(0, image_spread, size=(n_images, 1))
    rows = {}
    for method, shift in (("a", 0.0), ("b", delta)):
        runs = []
        for _ in range(n_seeds):
            p = np.clip(base + shift + (image_effect if method == "b" else 0) + rng.normal(0, seed_spread), 0, 1)
            tp = rng.binomial(union, p)
            wrong = union - tp
            fp = wrong // 2
            counts = {"image_ids": [str(i) for i in range(n_images)], "tp": tp, "fp": fp, "fn": wrong - fp}
            totals = {key: counts[key].sum(axis=0).astype(float) for key in per_image.COUNT_KEYS}
            runs.append({"miou": float(bootstrap.metric_of_counts("miou", **totals)), "per_image": counts})
        rows[method] = runs
    return rows


@pytest.mark.parametrize("n_seeds, seed_spread", [(1, 0.0), (3, 0.01)])
def test_interval_covers_the_true_difference_at_the_nominal_rate(n_seeds, seed_spread):
    """Over 200 constructions the 95 % interval holds the true Δ (2 mIoU) about 95 % of the
    time: with one seed (images only) and with three seeds whose spread matters."""
    rng = np.random.default_rng(2024)
    truth, covered, trials = 2.0, 0, 200
    for _ in range(trials):
        rows = constructed_runs(rng, 120, n_seeds, 0.02, 0.04, seed_spread)
        interval = bootstrap.RowSamples(rows, ["miou"], resamples=400).compare("b", "a", "miou")
        assert interval.basis == ("images" if n_seeds == 1 else "images and seeds")
        covered += interval.low <= truth <= interval.high
    assert 0.9 <= covered / trials <= 0.99, covered / trials


def test_interval_shrinks_with_more_images():
    rng = np.random.default_rng(7)

    def half_width(n_images: int) -> float:
        widths = [bootstrap.RowSamples(constructed_runs(rng, n_images, 1, 0.02, 0.04, 0.0), ["miou"])
                  .compare("b", "a", "miou").half_width for _ in range(5)]
        return float(np.mean(widths))

    small, large = half_width(50), half_width(400)
    # sqrt(8) ~ 2.8 times narrower in theory.
    assert large < 0.5 * small, (small, large)


def test_bootstrap_of_a_large_table_takes_seconds():
    """7 rows x 3 seeds of 2,000 images x 150 classes, 1,000 resamples."""
    import time

    rng = np.random.default_rng(3)
    n, k = 2000, 150
    ids = [str(i) for i in range(n)]

    def run():
        tp = rng.integers(0, 1000, size=(n, k)) * (rng.random((n, k)) < 0.08)
        counts = {"image_ids": ids, "tp": tp, "fp": tp // 3, "fn": tp // 4}
        return {"miou": 50.0, "per_image": counts}

    rows = {f"r{i}": [run() for _ in range(3)] for i in range(7)}
    began = time.process_time()
    samples = bootstrap.RowSamples(rows, ["miou"])
    samples.compare("r1", "r0", "miou")
    assert time.process_time() - began < 30


# ----------------------------------------------------------------------------- verdicts in a table

SPEC = {
    "title": "two rows",
    "metrics": ["miou"],
    "rows": [{"label": "A", "experiment": "a", "protocol": "ss", "paper": {"miou": 40.0}},
             {"label": "B", "experiment": "b", "protocol": "ss", "paper": {"miou": 40.5}}],
    "claims": [{"claim": "B beats A", "better": ["b"], "than": ["a"]}],
}
HEADER = {"dataset": "synthetic-tiny", "scale": "tiny", "backbone": "r", "iterations": 6, "seeds": [0],
          "commits": ["abc1234"]}


def noisy_pair(rng, delta: float, n_images: int = 40):
    """Rows a and b of one seed on the same images: b's accuracy per image a's + delta + noise."""
    rows = constructed_runs(rng, n_images, 1, delta, 0.15, 0.0)
    return {"a@ss": rows["a"], "b@ss": rows["b"]}


def claim_line(results) -> dict:
    """The one judged claim (as data) of a two-row table; its Markdown line says the same."""
    text, _, judged = build_table("t", SPEC, results, HEADER)
    (claim,) = judged
    assert f"- {claim['verdict']}: {claim['claim']} — {claim['evidence']} ({claim['paper_note']})" in text.splitlines()
    return claim


def test_a_claim_ahead_on_means_is_not_told_apart_with_its_interval():
    rng = np.random.default_rng(5)
    results = noisy_pair(rng, 0.003)
    means = {key: runs[0]["miou"] for key, runs in results.items()}
    assert means["b@ss"] > means["a@ss"]  # the old rule: ✅ on the direction of the means alone
    claim = claim_line(results)
    assert claim["verdict"] == NOT_TOLD_APART
    (pair,) = claim["pairs"]
    assert 0 < pair["delta"] < pair["half_width"] and pair["basis"] == "images"
    assert f"Δ +{pair['delta']:.2f} ± {pair['half_width']:.2f}" in claim["evidence"]
    assert "one seed: the intervals count the test images" in claim["evidence"]


def test_clear_differences_are_reproduced_or_contradicted():
    rng = np.random.default_rng(6)
    assert claim_line(noisy_pair(rng, 0.15, 200))["verdict"] == REPRODUCED
    assert claim_line(noisy_pair(rng, -0.15, 200))["verdict"] == CONTRADICTED


def test_a_paper_margin_under_one_miou_is_not_decisive_in_the_paper():
    claim = claim_line(noisy_pair(np.random.default_rng(5), 0.15, 200))
    assert claim["paper_note"] == f"paper's numbers agree by 0.50, within the run-to-run spread: {NOT_DECISIVE}"


def test_old_metrics_without_per_image_statistics_still_make_a_table(tmp_path):
    """A metrics file from before the counts were stored loads with per_image None; one seed
    then gives no interval (➖, saying why), two seeds an interval from the seeds alone."""
    old = {"miou": 45.0, "pixel_acc": 80.0, "seed": 0}
    path = tmp_path / "ss.json"
    path.write_text(json.dumps(old))
    assert load_run(path)["per_image"] is None

    one_seed = {"a@ss": [dict(old)], "b@ss": [dict(old, miou=50.0)]}
    claim = claim_line(one_seed)
    assert claim["verdict"] == NOT_TOLD_APART
    assert "Δ +5.00, no interval" in claim["evidence"] and "no per-image statistics" in claim["evidence"]

    two_seeds = {"a@ss": [dict(old, miou=45.0), dict(old, miou=45.4)],
                 "b@ss": [dict(old, miou=50.0), dict(old, miou=50.4)]}
    claim = claim_line(two_seeds)
    assert claim["verdict"] == REPRODUCED
    assert "the intervals count the seeds only" in claim["evidence"]


def test_stale_per_image_counts_are_refused(tmp_path):
    rows = constructed_runs(np.random.default_rng(1), 10, 1, 0.0, 0.0, 0.0)
    run = rows["a"][0]
    path = tmp_path / "ss.json"
    path.write_text(json.dumps({"miou": run["miou"] + 1.0, "per_image_counts": "ss.per_image.npz"}))
    per_image.write_per_image(per_image.per_image_path(path), run["per_image"], run["per_image"]["image_ids"])
    with pytest.raises(Exception, match="does not match"):
        load_run(path)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_three_verdicts_end_to_end_with_two_seeds(project, edit_params):
    """A two-row table built from nothing at the tiny scale with two seeds (8 runs trained and
    evaluated for real): the evaluator stores per-image counts, and the table judges a claim, its
    mirror (better and than swapped) and a row against itself on intervals over the images and
    both seeds: Δ ± h decides the verdict, the mirror gets the opposite one, the row against
    itself is never told apart, and `segrepro claims` counts what the table says."""
    edit_params("papers/pspnet.yaml", {"tables": {"pspnet_table2": {
        "rows": [{"label": "FCN", "experiment": "fcn", "protocol": "ss",
                  "paper": {"miou": 37.23, "pixel_acc": 78.01}},
                 {"label": "PSPNet", "experiment": "psp50", "protocol": "ss",
                  "paper": {"miou": 41.68, "pixel_acc": 80.04}}],
        "claims": [{"claim": "PSP over FCN", "better": ["psp50"], "than": ["fcn"]},
                   {"claim": "FCN over PSP", "better": ["fcn"], "than": ["psp50"]},
                   {"claim": "PSP over itself", "better": ["psp50"], "than": ["psp50"]}],
    }}})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "results/tables/pspnet_table2.md", "--cores", "2",
                             "--config", "scale=tiny", "seeds=[0,1]"], cwd=project, capture_output=True, text=True,
                            timeout=1800, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    for experiment in ("fcn", "psp50"):
        for seed in (0, 1):
            metrics = project / f"results/metrics/tiny/synthetic-tiny/pspnet/{experiment}/seed{seed}/ss.json"
            run = load_run(metrics)  # refuses counts that do not add up to the file's mIoU
            assert run["per_image"]["tp"].shape == (run["num_images"], len(run["per_class_iou"]))

    document = read_claims(project / "results/tables/pspnet_table2.claims.json")
    judged = {claim["claim"]: claim for claim in document["claims"]}
    assert (document["scale"], document["seeds"]) == ("tiny", [0, 1])
    assert len(judged) == 3

    def delta_and_half_width(claim):
        assert "[" not in claim["evidence"], claim  # images and seeds both counted: no weaker basis
        (pair,) = claim["pairs"]
        assert claim["basis"] == [pair["basis"]] == ["images and seeds"]
        return pair["delta"], pair["half_width"]

    claim, mirror, itself = judged["PSP over FCN"], judged["FCN over PSP"], judged["PSP over itself"]
    delta, half = delta_and_half_width(claim)
    assert f"Δ {'+' if delta > 0 else '−'}{abs(delta):.2f} ± {half:.2f}" in claim["evidence"]
    assert delta_and_half_width(mirror) == pytest.approx((-delta, half), abs=0.011)
    expected = REPRODUCED if delta - half > 0 else CONTRADICTED if delta + half < 0 else NOT_TOLD_APART
    assert claim["verdict"] == expected
    assert mirror["verdict"] == {REPRODUCED: CONTRADICTED, CONTRADICTED: REPRODUCED}.get(expected, NOT_TOLD_APART)
    assert itself["verdict"] == NOT_TOLD_APART and delta_and_half_width(itself)[0] == 0.0

    summary = subprocess.run([sys.executable, "-m", "segrepro.cli", "claims", "--scale", "tiny"], cwd=project,
                             capture_output=True, text=True, env=env)
    assert summary.returncode == 0, summary.stderr
    section = summary.stdout.split("## pspnet (", 1)[1].splitlines()[0]
    for verdict in (REPRODUCED, CONTRADICTED, NOT_TOLD_APART):
        assert f" {sum(c['verdict'] == verdict for c in judged.values())} {verdict}" in section, section
