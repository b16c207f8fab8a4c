"""SaF analysis: Table 9 counts, per-level IoU and unity precision/recall on a hand-made pyramid,
the Table 9 writer (fine -> coarse cells, claims, seeds) and the two figures.

The fake model and dataset: strides (16, 8, 4), tau 0.9, 3 classes, two images of 32 rows, "A"
(32 wide) and "B" (24 wide: resized to 32 as Sec. 3.1 asks, source columns 0-11 car, 12-17 sky,
18-23 ignore, which PIL's nearest resize maps onto g0-g1, g2, g3 exactly). Every map varies only
along the width, so the picture is a row of four 8-pixel column groups g0..g3 (256 pixels each):

    image A  label [0, 0, 1, 2]   fused from level [1, 1, 2, 3]
             level-1 argmax [0, 0, 1, 1]   level-2 [0, 1, 1, 2]   level-3 [0, 2, 1, 2]
    image B  label [2, 2, 0, ign] fused from level [2, 3, 1, 1]
             level-1 argmax [0, 0, 0, 0]   level-2 [2, 0, 0, 0]   level-3 [1, 2, 0, 0]

With one-hot logits and 1-D boundaries, bilinear upsampling keeps each pixel's nearest cell,
so the counts below follow from this table by hand.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from segrepro.core.errors import SegreproError
from segrepro.engine.figures import plot_pyramid_example
from segrepro.engine.inference import evaluate
from segrepro.engine.saf_analysis import analyse_levels
from segrepro.models.saf.pyramid import Pyramid, fuse
from segrepro.reporting.saf_report import levels_minus_fused, plot_levels_per_class, write_level_table

STRIDES = (16, 8, 4)
CLASSES = ["sky", "road", "car"]
MARKS = {"A": 0.1, "B": 0.2}  # constant image value that tells the fake model which image it sees
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def one_hot_columns(classes, rows):
    """Logits (1,3,rows,len(classes)): 10 for the column's class, 0 elsewhere."""
    logits = torch.zeros(1, len(CLASSES), rows, len(classes))
    for col, c in enumerate(classes):
        logits[0, c, :, col] = 10.0
    return logits


def unity_columns(probs, rows):
    return torch.tensor(probs, dtype=torch.float32).expand(rows, len(probs)).reshape(1, rows, len(probs)).clone()


PYRAMIDS = {
    # Semantic argmax per column at strides 16, 8, 4; unity probabilities at strides 16, 8.
    "A": ([[0, 1], [0, 1, 1, 2], [0, 0, 2, 2, 1, 1, 2, 2]], [[0.95, 0.2], [0.99, 0.99, 0.95, 0.5]]),
    "B": ([[0, 0], [2, 0, 0, 0], [1, 1, 2, 2, 0, 0, 0, 0]], [[0.2, 0.95], [0.95, 0.3, 0.1, 0.1]]),
}


class FakeSaF:
    """The model contract with hand-made pyramids (32x32 network input only)."""

    strides = STRIDES
    tau = 0.9
    is_pyramidal = True

    def pyramid(self, images):
        assert tuple(images.shape) == (1, 3, 32, 32)
        name = next(k for k, v in MARKS.items() if abs(float(images[0, 0, 0, 0]) - v) < 1e-4)
        semantic, unity = PYRAMIDS[name]
        return Pyramid(
            semantic=[one_hot_columns(c, 32 // s) for c, s in zip(semantic, STRIDES)],
            unity=[unity_columns(u, 32 // s) for u, s in zip(unity, STRIDES)],
            strides=STRIDES,
        )

    def predict(self, images):
        """Fused logits at any size, as SpecializeFuse.predict: resize to 32 x 32 (Sec. 3.1),
        pyramid, Eq. 2, bilinear back to the input size."""
        h, w = images.shape[-2:]
        out = self.pyramid(F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False))
        fused, _ = fuse(out.semantic, out.unity, self.tau)
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)


class TinyDataset:
    class_names = CLASSES
    num_classes = 3
    ignore_index = 255

    def __init__(self):
        label_a = torch.zeros(32, 32, dtype=torch.int64)
        label_a[:, 16:24], label_a[:, 24:] = 1, 2
        label_b = torch.full((32, 24), 2, dtype=torch.int64)
        label_b[:, 12:18], label_b[:, 18:] = 0, 255
        self.items = [
            (torch.full((3, 32, 32), MARKS["A"]), label_a, "A"),
            (torch.full((3, 32, 24), MARKS["B"]), label_b, "B"),
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def write_gt(folder, image_id, unity16, unity8):
    """A stored pyramid as pyramid_store writes it; only the unity maps of levels 1, 2 matter here."""
    arrays = {}
    finest = np.ones((2 * len(unity8), 2 * len(unity8[0])))
    for stride, unity in ((16, unity16), (8, unity8), (4, finest)):
        unity = np.asarray(unity, np.uint8)
        arrays[f"semantic_s{stride}"] = np.full(unity.shape, 255, np.uint8)
        arrays[f"unity_s{stride}"] = unity
    np.savez(folder / f"{image_id}.npz", **arrays)


@pytest.fixture
def gt_dir(tmp_path):
    folder = tmp_path / "pyramids"
    folder.mkdir()
    # A: level 1 -> tp 2 (column 0), tn 1, one don't-care; level 2 -> per valid row tp 2, fp 1, fn 1.
    write_gt(folder, "A", [[1, 0], [1, 255]], [[255] * 4] + [[1, 0, 1, 1]] * 3)
    # B: level 1 -> tp 2, fn 1, tn 1; level 2 -> every row a false positive in column 0.
    write_gt(folder, "B", [[0, 1], [1, 1]], [[0] * 4] * 4)
    return folder


@pytest.fixture
def analysis(gt_dir):
    return analyse_levels(FakeSaF(), TinyDataset(), gt_dir, "cpu")


def approx(values):
    return pytest.approx(values, abs=1e-9)


def test_assignment_and_level_by_assignment(analysis):
    assert analysis["strides"] == [16, 8, 4] and analysis["tau"] == 0.9 and analysis["num_images"] == 2
    # Labelled pixels only (B's g3 is fused from level 1 but is ignore): 3, 2, 2 groups of 256.
    assert analysis["assignment_pixels"] == [768, 512, 512]
    assert analysis["assignment_share"] == approx([300 / 7, 200 / 7, 200 / 7])
    # Rows semantic level l', columns assignment level l, coarse -> fine. E.g. [1][0]: the level-2
    # prediction on A g0, A g1, B g2 (all sky) says sky, road, sky: IoU sky 2/3, road 0 -> 33.33.
    # [2][1]: level 3 on A g2 (road) and B g0 (car) says road twice: road 1/2, car 0 -> 25.
    assert np.array(analysis["level_by_assignment_miou"]) == approx(np.array([
        [100.0, 100 / 3, 0.0],
        [100 / 3, 100.0, 25.0],
        [100 / 3, 25.0, 100.0],
    ]))


def test_per_level_and_fused_iou(analysis):
    # Level 1 over all seven labelled groups: sky tp 3 / (gt 3 + pred 5 - 3) = 60, road 1/2, car 0.
    assert analysis["level_class_iou"]["16"] == approx({"sky": 60.0, "road": 50.0, "car": 0.0})
    assert analysis["level_class_iou"]["8"] == approx({"sky": 50.0, "road": 50.0, "car": 200 / 3})
    assert analysis["level_class_iou"]["4"] == approx({"sky": 200 / 3, "road": 50.0, "car": 50.0})
    assert analysis["level_miou"] == approx([110 / 3, (100 + 200 / 3) / 3, (100 + 200 / 3) / 3])
    # Eq. 2 picks every group's level so that the fused map is right everywhere.
    assert analysis["fused_class_iou"] == approx({"sky": 100.0, "road": 100.0, "car": 100.0})
    assert analysis["fused_miou"] == pytest.approx(100.0)


def test_fused_matches_the_evaluation_path(analysis):
    """The fused numbers come from the same pixels as evaluate(model.predict) at one scale."""
    model = FakeSaF()
    matrix = evaluate(model.predict, TinyDataset(), {"scales": [1.0]}, "cpu", 3, crop_size=64, progress=False)
    assert matrix.summary(CLASSES)["per_class_iou"] == approx(analysis["fused_class_iou"])


def test_unity_precision_recall(analysis):
    level1, level2 = analysis["unity"]
    assert (level1["stride"], level1["tp"], level1["fp"], level1["fn"]) == (16, 4, 0, 1)
    assert (level1["precision"], level1["recall"]) == approx((100.0, 80.0))
    assert (level2["stride"], level2["tp"], level2["fp"], level2["fn"]) == (8, 6, 7, 3)
    assert (level2["precision"], level2["recall"]) == approx((600 / 13, 200 / 3))


def test_unity_undefined_is_none(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    for image_id in ("A", "B"):  # every ground-truth cell don't-care: nothing to count
        write_gt(folder, image_id, [[255] * 2] * 2, [[255] * 4] * 4)
    result = analyse_levels(FakeSaF(), TinyDataset(), folder, "cpu")
    assert all(u["tp"] == u["fp"] == u["fn"] == 0 and u["precision"] is None and u["recall"] is None
               for u in result["unity"])


def test_pyramid_files_must_match(tmp_path, gt_dir):
    (gt_dir / "B.npz").unlink()
    with pytest.raises(SegreproError, match="B.npz"):
        analyse_levels(FakeSaF(), TinyDataset(), gt_dir, "cpu")
    write_gt(gt_dir, "B", [[0] * 4] * 4, [[0] * 8] * 8)  # built for a 64x64 label
    with pytest.raises(SegreproError, match="unity_s16"):
        analyse_levels(FakeSaF(), TinyDataset(), gt_dir, "cpu")
    with pytest.raises(SegreproError, match="not found"):
        analyse_levels(FakeSaF(), TinyDataset(), tmp_path / "nowhere", "cpu")


# ----------------------------------------------------------------------------- Table 9 writer

PAPER = [[33.48, 39.52, 42.13, 38.61], [31.63, 41.17, 45.98, 44.57],
         [27.31, 38.13, 46.34, 47.52], [21.94, 28.94, 40.05, 48.05]]
SPEC = {"title": "Table 9. mIoU over a pair of pyramid levels", "kind": "level_matrix", "metrics": ["miou"],
        "rows": [{"label": "I", "experiment": "I", "protocol": "ss"}], "paper_matrix": PAPER}
HEADER = {"dataset": "ade20k", "scale": "tiny", "backbone": "hrnet", "iterations": 100,
          "seeds": [0, 1], "commits": ["abc1234"]}
# Seed means, coarse -> fine: [semantic l'][assignment l]. Column l=2 is won by l'=1 (47 > 45);
# column l=3 by l'=3 but only by 0.5, inside the seeds' spread (std sqrt(2)).
MEANS = [[50.0, 47.0, 30.0, 20.0],
         [40.0, 45.0, 35.0, 25.0],
         [30.0, 40.0, 40.0, 30.0],
         [20.0, 30.0, 39.5, 35.0]]


def seed_analyses():
    analyses = []
    for offset in (-1.0, 1.0):
        matrix = [[v + offset for v in row] for row in MEANS]
        analyses.append({
            "strides": [32, 16, 8, 4], "tau": 0.9,
            "level_by_assignment_miou": matrix,
            "assignment_share": [10.0 + offset, 20.0, 30.0, 40.0 - offset],
            "unity": [{"stride": s, "precision": 90.0 + offset, "recall": 50.0} for s in (32, 16, 8)],
        })
    analyses[1]["level_by_assignment_miou"][0][3] = None  # one seed without pixels: mean of the other
    return analyses


def md_rows(text):
    lines = [line for line in text.split("## Claims")[0].splitlines() if line.startswith("| ℓ'=")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_level_table_markdown_and_csv(tmp_path):
    out = tmp_path / "table9.md"
    write_level_table("saf_table9", SPEC, seed_analyses(), HEADER, out)
    text = out.read_text()
    assert text.startswith("# saf_table9: Table 9. mIoU over a pair of pyramid levels\n")
    assert "- Seeds: 0, 1" in text and "- Commit: abc1234" in text
    header_line = next(line for line in text.splitlines() if line.startswith("| ℓ' \\ ℓ"))
    assert [c.strip() for c in header_line.strip("|").split("|")][1:] == [
        "ℓ=4 (s4)", "ℓ=3 (s8)", "ℓ=2 (s16)", "ℓ=1 (s32)"]
    rows = md_rows(text)
    # Fine -> coarse rows and columns, ours (paper), column best in bold.
    assert rows[0] == ["ℓ'=4 (s4)", "**35.00 ± 1.41** (33.48)", "39.50 ± 1.41 (39.52)",
                       "30.00 ± 1.41 (42.13)", "20.00 ± 1.41 (38.61)"]
    assert rows[3] == ["ℓ'=1 (s32)", "19.00 (21.94)", "30.00 ± 1.41 (28.94)",
                       "**47.00 ± 1.41** (40.05)", "**50.00 ± 1.41** (48.05)"]

    claims = [line for line in text.split("## Claims", 1)[1].split("## Unity", 1)[0].splitlines()
              if line.startswith("- ")]
    # Two seeds per cell, values ±1: Welch's half-width t(0.975, 2) · sqrt(2/2 + 2/2) = 4.303 · 1.414 = 6.08.
    assert claims[0].startswith("- ➖ not told apart: For every assignment level ℓ")
    assert "1 of 4 columns (paper's numbers agree)" in claims[0]  # only ℓ=1 clears every interval
    assert claims[1] == ("- ➖ not told apart: ℓ=4 (s4): ℓ'=4 has the highest mIoU — ℓ'=4 35.00 vs ℓ'=3 30.00:"
                         " Δ +5.00 ± 6.08 [no interval: one seed, and these cells have no per-image form]"
                         " (paper's numbers agree)")
    assert claims[2] == ("- ➖ not told apart: ℓ=3 (s8): ℓ'=3 has the highest mIoU — ℓ'=3 40.00 vs ℓ'=4 39.50:"
                         " Δ +0.50 ± 6.08 (paper's numbers agree)")
    # The paper's own column ℓ=2: ℓ'=2's 46.34 over ℓ'=3's 45.98, by 0.36 only: under the ≈1 mIoU run-to-run spread.
    assert claims[3] == ("- ➖ not told apart: ℓ=2 (s16): ℓ'=2 has the highest mIoU — ℓ'=2 45.00 vs ℓ'=1 47.00:"
                         " Δ −2.00 ± 6.08 (paper's numbers agree by 0.36, within the run-to-run spread:"
                         " not decisive in the paper)")
    assert claims[4].startswith("- ✅ reproduced: ℓ=1 (s32): ℓ'=1 has the highest mIoU — ℓ'=1 50.00 vs ℓ'=2 40.00:"
                                " Δ +10.00 ± 6.08")

    # The same claims as data: the caption's claim, then one per column with a pair per other level.
    stored = json.loads((tmp_path / "table9.claims.json").read_text())
    assert (stored["kind"], stored["seeds"], stored["scale"]) == ("level_matrix", HEADER["seeds"], HEADER["scale"])
    assert [f"- {c['verdict']}: {c['claim']} — {c['evidence']} ({c['paper_note']})" for c in stored["claims"]] == claims
    column4 = stored["claims"][1]
    assert [(pair["better"], pair["than"]) for pair in column4["pairs"]] == [("ℓ'=4", "ℓ'=3"), ("ℓ'=4", "ℓ'=2"),
                                                                              ("ℓ'=4", "ℓ'=1")]
    assert column4["pairs"][0]["delta"] == pytest.approx(5.0) and column4["pairs"][0]["half_width"] == pytest.approx(
        4.3027 * math.sqrt(2), abs=1e-3)
    assert len(stored["claims"][0]["pairs"]) == sum(len(c["pairs"]) for c in stored["claims"][1:])

    unity = text.split("## Unity", 1)[1]
    assert "| 4 | 4 | 40.00 ± 1.41 | – (no unity head: every cell is unity) |" in unity
    assert "| 1 | 32 | 10.00 ± 1.41 | 90.00 ± 1.41 | 50.00 ± 0.00 |" in unity

    frame = pd.read_csv(out.with_suffix(".csv"))
    assert len(frame) == 16
    cell = frame[(frame.semantic_level == 4) & (frame.assignment_level == 3)].iloc[0]
    assert (cell.semantic_stride, cell.assignment_stride, cell.n_seeds) == (4, 8, 2)
    assert cell.ours_mean == pytest.approx(39.5) and cell.ours_std == pytest.approx(math.sqrt(2))
    assert cell.paper == pytest.approx(39.52)
    lone = frame[(frame.semantic_level == 1) & (frame.assignment_level == 4)].iloc[0]
    assert lone.n_seeds == 1 and lone.ours_mean == pytest.approx(19.0) and math.isnan(lone.ours_std)
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)


def test_level_table_paper_disagreement_and_other_level_count(tmp_path):
    spec = dict(SPEC, paper_matrix=[row[:] for row in PAPER])
    spec["paper_matrix"][0][1] = 50.0  # paper row l'=4 now beats l'=3 in column l=3
    write_level_table("t9", spec, seed_analyses(), HEADER, tmp_path / "a.md")
    claims = (tmp_path / "a.md").read_text().split("## Claims", 1)[1].splitlines()
    assert any(line.startswith("- ➖ not told apart: ℓ=3 (s8)") and line.endswith("(paper's numbers disagree)")
               for line in claims)

    # A two-level run (K): ours is rendered, the paper's 4-level matrix is not set beside it.
    two = [{"strides": [32, 4], "tau": 0.9, "level_by_assignment_miou": [[60.0, 20.0], [40.0, 30.0]],
            "assignment_share": [70.0, 30.0], "unity": [{"stride": 32, "precision": None, "recall": 10.0}]}]
    write_level_table("t9", SPEC, two, HEADER, tmp_path / "b.md")
    text = (tmp_path / "b.md").read_text()
    assert "the paper's matrix is for 4 levels (strides 32, 16, 8, 4), this run has 2" in text
    assert md_rows(text) == [["ℓ'=2 (s4)", "**30.00**", "40.00"], ["ℓ'=1 (s32)", "20.00", "**60.00**"]]
    assert "| 1 | 32 | 70.00 | – | 10.00 |" in text
    # One seed: the diagonal wins both columns on the means, but without an interval nothing is told apart.
    assert "- ➖ not told apart: For every assignment level ℓ" in text
    assert "ℓ'=2 30.00 vs ℓ'=1 20.00: Δ +10.00, no interval [no interval: one seed" in text

    with pytest.raises(SegreproError, match="header lacks"):
        write_level_table("t9", SPEC, two, {"dataset": "x"}, tmp_path / "c.md")
    with pytest.raises(SegreproError, match="no level analyses"):
        write_level_table("t9", SPEC, [], HEADER, tmp_path / "c.md")
    assert not (tmp_path / "c.md").exists()


# ----------------------------------------------------------------------------- figures

def test_levels_minus_fused_means_over_seeds(analysis):
    other = dict(analysis, fused_class_iou=dict(analysis["fused_class_iou"], car=None))
    strides, delta = levels_minus_fused([analysis, other], CLASSES)
    assert strides == [16, 8, 4]
    # Level 1 vs fused (100 everywhere): sky 60 - 100, road 50 - 100, car 0 - 100 (first seed only).
    assert delta[0].tolist() == approx([-40.0, -50.0, -100.0])
    assert delta[2].tolist() == approx([200 / 3 - 100, -50.0, -50.0])


def test_a_class_never_recognised_is_undefined_not_specialised(analysis):
    levels = {stride: dict(ious, car=0.0) for stride, ious in analysis["level_class_iou"].items()}
    missed = dict(analysis, fused_class_iou=dict(analysis["fused_class_iou"], car=0.0), level_class_iou=levels)
    _, delta = levels_minus_fused([missed], CLASSES)
    assert np.isnan(delta[:, 2]).all()  # 0 - 0 would read as "as good as fused"
    assert np.isfinite(delta[:, :2]).all()


def test_figures_are_written(tmp_path, analysis, monkeypatch):
    bars = tmp_path / "fig3.png"
    plot_levels_per_class([analysis], CLASSES, bars)
    first = bars.read_bytes()
    assert first.startswith(PNG_MAGIC) and len(first) > 1000
    plot_levels_per_class([analysis], CLASSES, bars)
    assert bars.read_bytes() == first  # deterministic

    example = tmp_path / "figA.png"
    plot_pyramid_example(FakeSaF(), TinyDataset(), 1, example)
    assert example.read_bytes().startswith(PNG_MAGIC)

    # A failing draw leaves neither the figure nor a temporary file behind.
    from matplotlib.figure import Figure

    def broken(self, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plot_levels_per_class([analysis], CLASSES, tmp_path / "broken.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig3.png", "figA.png", "pyramids"]
