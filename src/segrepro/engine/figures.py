"""Paper figures declared under `figures:` in a paper's YAML, drawn from one evaluated run: the
per-class level plot (SaF Fig. C, drawn by segrepro.reporting.saf_report from the metrics) and one
image's pyramid (SaF Fig. A), which runs the trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segrepro.core import paths
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from segrepro.engine.saf_analysis import (
    check_model,
    model_device,
    pixels_from_finest,
    run_pyramid,
)
from segrepro.reporting.saf_report import _save_figure


def draw_figure(spec: dict, config: dict, out: Path) -> None:
    """Draw the figure `spec` (kind, experiment, ...) of the run `config` into the PNG `out`."""
    from segrepro.data.dataset import SegmentationDataset
    from segrepro.reporting.saf_report import plot_levels_per_class
    from segrepro.reporting.tables import load_metrics

    run = (config["scale"], config["dataset"]["name"], config["paper"], config["experiment"], config["seed"])
    if spec["kind"] == "levels_per_class":
        metrics_file = paths.metrics_path(*run, "ss")
        metrics = load_metrics(metrics_file)
        if "levels" not in metrics:
            raise SegreproError(f"{metrics_file}: no per-level analysis (only pyramidal models have one)")
        class_names = list(metrics["per_class_iou"])
        plot_levels_per_class([metrics["levels"]], class_names, out)
    elif spec["kind"] == "pyramid_example":
        from segrepro.engine.checkpoint import load_model

        model, _ = load_model(paths.model_path(*run), device="cpu")
        dataset = SegmentationDataset(config["dataset"]["root"], "val")
        index = spec.get("image", 0)
        if index >= len(dataset):
            raise SegreproError(f"figure image index {index} is out of range: the val split has {len(dataset)} images")
        plot_pyramid_example(model, dataset, index, out, base_size=config["eval"].get("base_size"))
    else:
        raise SegreproError(f"unknown figure kind '{spec['kind']}'")


# ----------------------------------------------------------------------------- SaF Fig. A: one image's pyramid

DONE_COLOUR = (0.5, 0.5, 0.5)  # Fig. A: "done by coarser" cells are grey
MIX_COLOUR = (1.0, 1.0, 1.0)  # mix cells not yet done: left to a finer level
IGNORE_COLOUR = (0.0, 0.0, 0.0)


def class_palette(num_classes: int) -> np.ndarray:
    """A fixed RGB colour in [0, 1] per class (fixed-seed RNG, the same in every figure)."""
    return np.random.default_rng(0).uniform(0.1, 0.95, size=(num_classes, 3))


def _colour(labels: np.ndarray, palette: np.ndarray, ignore: int) -> np.ndarray:
    """Class ids (H,W) -> RGB (H,W,3); ignore (or any id outside the palette) black."""
    out = np.zeros((*labels.shape, 3))
    known = (labels != ignore) & (labels >= 0) & (labels < len(palette))
    out[known] = palette[labels[known]]
    out[~known] = IGNORE_COLOUR
    return out


def _cells_to_pixels(cells: np.ndarray, stride: int, size: tuple[int, int]) -> np.ndarray:
    """Cell grid -> pixels (each cell copied to its stride x stride pixels), cropped to `size`."""
    up = np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)
    return up[: size[0], : size[1]]


def plot_pyramid_example(model, dataset, index: int, out_png, base_size=None) -> None:
    """Fig. A (App. A) for one evaluation image, at the network-input resolution.

    Row 1: raw semantic pyramid (argmax per level). Row 2: raw unity pyramid (probabilities).
    Row 3: per level, the labels it contributes after fusing (Eq. 2); "done by coarser" cells
    grey, mix cells not yet done (probability < tau, left to finer levels) white.
    Row 4: input image, ground truth, fused prediction, and the level each pixel is fused from.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    strides = check_model(model)
    if not 0 <= int(index) < len(dataset):
        raise SegreproError(f"image index {index} is out of range (the dataset has {len(dataset)} images)")
    names = list(dataset.class_names)
    ignore = int(getattr(dataset, "ignore_index", 255))
    device = model_device(model)
    if isinstance(model, torch.nn.Module):
        model.eval()
    image, label, image_id = dataset[int(index)]
    p = run_pyramid(model, image, label, device, base_size, len(names), ignore)
    h, w = p.size
    L, finest = len(strides), strides[-1]
    palette = class_palette(len(names))
    assignment = p.assignment[0].cpu().numpy()
    tau = float(model.tau)

    ncols = max(L, 4)
    aspect = min(max(h / w, 0.4), 2.0)
    fig = Figure(figsize=(2.8 * ncols, 2.8 * 4 * aspect + 0.6), layout="constrained")
    axes = fig.subplots(4, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])  # keep the frame: white mix cells must not melt into the page
        ax.set_yticks([])
    for row, used in ((0, L), (1, L - 1), (2, L), (3, 4)):
        for ax in axes[row, used:]:
            ax.set_axis_off()
    for level, stride in enumerate(strides):
        semantic = p.pyramid.semantic[level][0].argmax(0).cpu().numpy()
        axes[0, level].imshow(_colour(_cells_to_pixels(semantic, stride, (h, w)), palette, ignore),
                              interpolation="nearest")
        axes[0, level].set_title(f"Ŷ({level + 1}) stride {stride}", fontsize=9)
        if level < L - 1:
            probs = p.pyramid.unity[level][0].cpu().numpy()
            axes[1, level].imshow(_cells_to_pixels(probs, stride, (h, w)), cmap="gray", vmin=0.0, vmax=1.0,
                                  interpolation="nearest")
            axes[1, level].set_title(f"Û({level + 1}) (unity if ≥ {tau:g})", fontsize=9)
        else:
            axes[1, level].text(0.5, 0.5, f"Û({level + 1}) ≡ 1\n(finest level:\nevery cell is unity)",
                                ha="center", va="center", fontsize=9, transform=axes[1, level].transAxes)
        # The fused assignment is constant inside a cell of this level, so one sample per cell
        # tells whether the cell is done by a coarser level, contributes, or is left to finer ones.
        factor = stride // finest
        cell_assignment = assignment[::factor, ::factor]
        contribution = _colour(semantic, palette, ignore)
        contribution[cell_assignment < level] = DONE_COLOUR
        contribution[cell_assignment > level] = MIX_COLOUR
        up = np.repeat(np.repeat(contribution, stride, axis=0), stride, axis=1)[:h, :w]
        axes[2, level].imshow(up, interpolation="nearest")
        axes[2, level].set_title(f"level {level + 1} after fuse", fontsize=9)

    mean = IMAGENET_MEAN.reshape(3, 1, 1) / 255.0
    std = IMAGENET_STD.reshape(3, 1, 1) / 255.0
    shown = (p.image[0, :, :h, :w].cpu().numpy() * std + mean).clip(0.0, 1.0).transpose(1, 2, 0)
    truth = p.label[:h, :w].cpu().numpy()
    fused = pixels_from_finest(p.fused, tuple(p.label.shape))[0, :, :h, :w].argmax(0).cpu().numpy()
    axes[3, 0].imshow(shown)
    axes[3, 0].set_title(f"input {image_id}", fontsize=9)
    axes[3, 1].imshow(_colour(truth, palette, ignore), interpolation="nearest")
    axes[3, 1].set_title("ground truth", fontsize=9)
    axes[3, 2].imshow(_colour(fused, palette, ignore), interpolation="nearest")
    axes[3, 2].set_title("fused prediction", fontsize=9)
    levels_cmap = ListedColormap(colormaps["tab10"].colors[:L])
    shown_levels = axes[3, 3].imshow(_cells_to_pixels(assignment, finest, (h, w)), cmap=levels_cmap,
                                     vmin=-0.5, vmax=L - 0.5, interpolation="nearest")
    axes[3, 3].set_title("fused from level", fontsize=9)
    bar = fig.colorbar(shown_levels, ax=axes[3, 3], fraction=0.046, pad=0.04, ticks=range(L))
    bar.set_ticklabels([str(level + 1) for level in range(L)])
    fig.suptitle(f"Specialize and fuse, image {image_id}: grey = done by coarser, white = mix (left to finer)",
                 fontsize=10)
    _save_figure(fig, out_png)
