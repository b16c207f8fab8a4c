"""How sure a claim is: the difference of two table rows with a 95 % interval that counts both
the test images (a paired bootstrap) and the run-to-run spread (the seeds).

The evaluator stores, beside each metrics JSON, every test image's true positives, false
positives and false negatives per class (segrepro.core.per_image): mIoU, pixel accuracy and the
Scene-Parsing score of any resample of the images follow from the summed counts, exactly as the
evaluator computes them on the whole split.

The interval of Δ = mean over seeds of row b − mean over seeds of row a (docs/notes/notes-verdicts.md):
- images: `RESAMPLES` resamples of the test images with replacement (fixed `SEED`), the same
  resample for every run of both rows (paired: both rows saw the same images), each row's metric
  averaged over its seeds; v_images = the variance of Δ over the resamples.
- seeds: the seeds' sample variance, pooled over the rows of the table (one recipe, one data
  set: one run-to-run spread; pooling gives 2–3 seeds per row enough degrees of freedom),
  v_seeds = s²_pooled (1/n_a + 1/n_b) with Σ(n_row − 1) degrees of freedom.
- Δ ± q sqrt(v_images + v_seeds), q the 97.5 % quantile of Student's t with the
  Welch–Satterthwaite degrees of freedom (v_images counts as known), or of the normal
  distribution with one seed per row.
Resampling the 2–3 seeds themselves (a hierarchical bootstrap) would shrink their spread by
(n−1)/n and use a normal quantile where t's is 1.4–2.2 times wider: too narrow intervals; the
coverage test in tests/test_bootstrap.py checks this scheme at the nominal rate.

Without per-image counts (metrics written before they were stored) only the seeds' part is left;
with one seed and none, there is no interval (`Interval.basis` says which).

Kept free of torch: the table step imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from segrepro.core.errors import SegreproError
from segrepro.core.per_image import COUNT_KEYS

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
BOOTSTRAP_METRICS = ("miou", "pixel_acc", "mean_acc", "score")

# What an interval counts (Interval.basis).
EXACT = "exact"  # a count, not a measurement (GMACs): no uncertainty
IMAGES_AND_SEEDS = "images and seeds"
IMAGES = "images"  # one seed per row: the run-to-run spread is not counted
SEEDS = "seeds"  # no per-image counts: the test images' sampling is not counted
NONE = "none"


def metric_of_counts(metric: str, tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """A metric in percent from summed counts (..., classes) -> (...), as
    segrepro.engine.metrics.ConfusionMatrix.summary computes it: classes with an empty union (for
    mean accuracy: without ground truth) are left out of the mean."""
    if metric == "score":
        # The Scene Parsing Benchmark's score: (pixel accuracy + mean IoU) / 2 (segrepro.reporting.tables).
        return (metric_of_counts("miou", tp, fp, fn) + metric_of_counts("pixel_acc", tp, fp, fn)) / 2
    if metric == "pixel_acc":
        labelled = (tp + fn).sum(axis=-1)
        return 100.0 * tp.sum(axis=-1) / np.where(labelled > 0, labelled, np.nan)
    if metric in ("miou", "mean_acc"):
        denominator = tp + fp + fn if metric == "miou" else tp + fn
        defined = denominator > 0
        ratio = np.divide(tp, denominator, out=np.zeros(np.shape(tp), dtype=float), where=defined)
        n = defined.sum(axis=-1)
        return 100.0 * ratio.sum(axis=-1) / np.where(n > 0, n, np.nan)
    raise SegreproError(f"no per-image form of metric {metric!r} (known: {', '.join(BOOTSTRAP_METRICS)})")


def resample_weights(n_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_images): how often each image is drawn in each resample with replacement."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_images, size=(resamples, n_images))
    drawn += np.arange(resamples)[:, None] * n_images
    return np.bincount(drawn.ravel(), minlength=resamples * n_images).reshape(resamples, n_images).astype(np.float32)


def resampled_metrics(metrics: list[str], counts: dict, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric of one run on every resample: metric -> (resamples,)."""
    # float32 products: counts up to ~1e9 pixels lose < 1e-6 relative, far below any Δ shown.
    sums = {key: (weights @ np.asarray(counts[key], dtype=np.float32)).astype(float) for key in COUNT_KEYS}
    return {metric: metric_of_counts(metric, sums["tp"], sums["fp"], sums["fn"]) for metric in metrics}


@dataclass(frozen=True)
class Interval:
    """Δ (better − than, in the metric's unit) with the half-width of its 95 % interval."""

    delta: float
    half_width: float | None
    basis: str

    @property
    def low(self) -> float:
        return float("nan") if self.half_width is None else self.delta - self.half_width

    @property
    def high(self) -> float:
        return float("nan") if self.half_width is None else self.delta + self.half_width


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t (the normal one for df = inf)."""
    from scipy import stats

    return float(stats.norm.ppf(0.5 + level / 2) if math.isinf(df) else stats.t.ppf(0.5 + level / 2, df))


def combine(delta: float, v_images: float | None, v_seeds: float | None, seed_df: float,
            level: float = LEVEL) -> Interval:
    """Δ ± q sqrt(v_images + v_seeds): the module docstring's scheme."""
    if v_images is None and v_seeds is None:
        return Interval(delta, None, NONE)
    if v_seeds is None:
        return Interval(delta, t_quantile(math.inf, level) * math.sqrt(v_images), IMAGES)
    total = v_seeds + (v_images or 0.0)
    # Welch–Satterthwaite with the images' part as known (infinite degrees of freedom).
    df = math.inf if v_seeds == 0 else total ** 2 / (v_seeds ** 2 / seed_df)
    return Interval(delta, t_quantile(df, level) * math.sqrt(total), SEEDS if v_images is None else IMAGES_AND_SEEDS)


class RowSamples:
    """The runs (one per seed) of every row of a table, ready to compare any two rows.

    `rows` maps a row key to its runs: dicts with the metric values and, where stored, the
    per-image counts under "per_image" (load_per_image's dict)."""

    def __init__(self, rows: dict[str, list[dict]], metrics: list[str], resamples: int = RESAMPLES,
                 seed: int = SEED) -> None:
        self.rows = rows
        self.metrics = metrics
        self._means = {key: {m: float(np.mean([run[m] for run in runs]))
                             for m in metrics if all(m in run for run in runs)}
                       for key, runs in rows.items()}
        self._pooled = {m: _pooled_variance([[run[m] for run in runs] for runs in rows.values()
                                             if all(m in run for run in runs)]) for m in metrics}
        # One resample set for every run of the table: a row's resamples pair with every other row's.
        ids = {key: _shared_ids(runs) for key, runs in rows.items()}
        reference = next((i for i in ids.values() if i is not None), None)
        self._paired = {key for key, i in ids.items() if i is not None and i == reference}
        weights = resample_weights(len(reference), resamples, seed) if reference else None
        resampled = [m for m in metrics if m in BOOTSTRAP_METRICS]
        self._replicates = {}
        for key in self._paired:
            per_run = [resampled_metrics(resampled, run["per_image"], weights) for run in rows[key]]
            self._replicates[key] = {m: np.mean([run[m] for run in per_run], axis=0) for m in resampled}

    def mean(self, key: str, metric: str) -> float:
        return self._means[key][metric]

    def compare(self, better: str, than: str, metric: str, exact: bool = False) -> Interval:
        """Δ = better − than with its interval; `exact` for a counted, not measured, metric."""
        delta = self.mean(better, metric) - self.mean(than, metric)
        if exact:
            return Interval(delta, 0.0, EXACT)
        v_images = None
        if better in self._paired and than in self._paired and metric in self._replicates[better]:
            diffs = self._replicates[better][metric] - self._replicates[than][metric]
            v_images = float(np.var(diffs[np.isfinite(diffs)], ddof=1))
        variance, df = self._pooled[metric]
        v_seeds = None
        if df > 0:
            v_seeds = variance * (1 / len(self.rows[better]) + 1 / len(self.rows[than]))
        return combine(delta, v_images, v_seeds, df)


def _pooled_variance(groups: list[list[float]]) -> tuple[float, int]:
    """(pooled sample variance, degrees of freedom) of the seeds' values of several rows."""
    df = sum(len(values) - 1 for values in groups)
    if df <= 0:
        return float("nan"), 0
    return sum(float(np.var(values, ddof=1)) * (len(values) - 1) for values in groups if len(values) > 1) / df, df


def _shared_ids(runs: list[dict]) -> list[str] | None:
    """The image ids every run of a row was evaluated on, if all have per-image counts on the
    same images; else None (that row's differences then count the seeds only)."""
    counts = [run.get("per_image") for run in runs]
    if not counts or any(c is None for c in counts):
        return None
    ids = counts[0]["image_ids"]
    return ids if all(c["image_ids"] == ids for c in counts) and ids else None


def welch(a: tuple[float, float, int], b: tuple[float, float, int], level: float = LEVEL) -> Interval:
    """Δ = b − a of two (mean, sample std, n) cells from the seeds alone (Welch's t interval);
    no interval unless both have two seeds or more. For values with no per-image form."""
    delta = b[0] - a[0]
    if a[2] < 2 or b[2] < 2 or math.isnan(a[1]) or math.isnan(b[1]):
        return Interval(delta, None, NONE)
    va, vb = a[1] ** 2 / a[2], b[1] ** 2 / b[2]
    if va + vb == 0:
        return Interval(delta, 0.0, SEEDS)
    df = (va + vb) ** 2 / (va ** 2 / (a[2] - 1) + vb ** 2 / (b[2] - 1))
    return Interval(delta, t_quantile(df, level) * math.sqrt(va + vb), SEEDS)
