"""Paper figures declared under `figures:` in a paper's YAML, drawn from one evaluated run."""

from __future__ import annotations

from pathlib import Path

from segrepro import paths
from segrepro.errors import SegreproError


def draw_figure(spec: dict, config: dict, out: Path) -> None:
    """Draw the figure `spec` (kind, experiment, ...) of the run `config` into the PNG `out`."""
    from segrepro.data import SegmentationDataset
    from segrepro.saf_report import plot_levels_per_class, plot_pyramid_example
    from segrepro.tables import load_metrics

    run = (config["scale"], config["dataset"]["name"], config["paper"], config["experiment"], config["seed"])
    if spec["kind"] == "levels_per_class":
        metrics_file = paths.metrics_path(*run, "ss")
        metrics = load_metrics(metrics_file)
        if "levels" not in metrics:
            raise SegreproError(f"{metrics_file}: no per-level analysis (only pyramidal models have one)")
        class_names = list(metrics["per_class_iou"])
        plot_levels_per_class([metrics["levels"]], class_names, out)
    elif spec["kind"] == "pyramid_example":
        from segrepro.train import load_model

        model, _ = load_model(paths.model_path(*run), device="cpu")
        dataset = SegmentationDataset(config["dataset"]["root"], "val")
        index = spec.get("image", 0)
        if index >= len(dataset):
            raise SegreproError(f"figure image index {index} is out of range: the val split has {len(dataset)} images")
        plot_pyramid_example(model, dataset, index, out, base_size=config["eval"].get("base_size"))
    else:
        raise SegreproError(f"unknown figure kind '{spec['kind']}'")
