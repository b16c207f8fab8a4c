"""The one evaluator: a trained model, a test protocol (scales, flip), a labelled split -> a
metrics JSON file, logged into the model's MLflow run (a split other than val under its own
metric names, `<split>_<protocol>_miou`, so that a test number never reads as a val one)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from segrepro.core import atomic, paths
from segrepro.core import per_image as per_image_counts
from segrepro.core.devices import pick_device
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import git_commit
from segrepro.data.dataset import SegmentationDataset, load_card
from segrepro.engine import inference
from segrepro.engine.checkpoint import load_model
from segrepro.pipeline import tracking


def evaluate_run(config: dict, model_path: Path, protocol: str, output: Path,
                 device: str | None = None, split: str = "val") -> dict:
    """Evaluate the model at `model_path` on the dataset's `split` with `protocol` (a key of the
    run's eval.protocols) and write the metrics JSON to `output`. Returns the metrics."""
    settings = config["eval"]
    if protocol not in settings["protocols"]:
        raise SegreproError(
            f"unknown test protocol '{protocol}' (scale '{config['scale']}' defines: "
            f"{', '.join(settings['protocols'])})"
        )
    dev = pick_device(device)
    model, record = load_model(model_path, device=str(dev))
    card = load_card(config["dataset"]["root"])
    if split not in card["splits"]:
        raise SegreproError(
            f"dataset '{config['dataset']['name']}' has no split '{split}' (it has: {', '.join(card['splits'])}); "
            "a table's split comes from --config split, the table's `split` or the dataset's `eval_split`")
    dataset = SegmentationDataset(config["dataset"]["root"], split)
    if dataset.num_classes != record["num_classes"]:
        raise SegreproError(
            f"{model_path}: trained for {record['num_classes']} classes, dataset "
            f"{config['dataset']['name']} has {dataset.num_classes}"
        )
    began = time.time()
    matrix = inference.evaluate(
        model.predict, dataset, settings["protocols"][protocol], dev, dataset.num_classes,
        ignore_index=dataset.ignore_index, crop_size=settings["crop_size"],
        base_size=settings.get("base_size"), per_image=True,
    )
    seconds = time.time() - began
    summary = matrix.summary(dataset.class_names)
    absent = classes_without_pixels(matrix.matrix, dataset.class_names)
    if absent:
        # The issue this guards against: labels read wrongly (a class mapped to ignore) score 100 %.
        print(f"segrepro: note: split '{split}' of {config['dataset']['name']} has no ground-truth pixel of "
              f"{', '.join(repr(n) for n in absent)}: its IoU is left out of the mean, or 0 where predicted",
              file=sys.stderr)
    metrics = {
        "paper": config["paper"], "experiment": config["experiment"], "scale": config["scale"],
        "dataset": config["dataset"]["name"], "seed": config["seed"], "split": split,
        "protocol": protocol, "protocol_settings": settings["protocols"][protocol],
        **summary,
        "num_images": len(dataset),
        "classes_without_pixels": absent,
        "confusion_matrix": matrix.matrix.tolist(),
        "train": record["summary"],
        "eval_seconds": seconds,
        "eval_device": str(dev),
        "git_commit": git_commit(),
        "backbone": describe_backbone(config["model"]["backbone"]),
        "iterations": config["train"]["iterations"],
    }
    if protocol == "ss" and getattr(model, "is_pyramidal", False):
        # SaF: the unity head against the precomputed pyramids, Table 9 and Fig. 3 (Sec. 5.5).
        from segrepro.engine.saf_analysis import analyse_levels

        metrics["levels"] = analyse_levels(
            model, dataset, paths.pyramid_dir(config["dataset"]["name"], split), dev,
            base_size=settings.get("base_size"),
        )
    if dev.type == "cuda":
        metrics["eval_peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    # Per test image and class TP/FP/FN, for the claims' paired bootstrap (segrepro.reporting.bootstrap);
    # written before the metrics file, whose presence means the evaluation is complete.
    per_image = per_image_counts.per_image_path(output)
    per_image_counts.write_per_image(per_image, matrix.per_image_counts(), list(dataset.ids))
    metrics["per_image_counts"] = per_image.name
    atomic.write_text(output, json.dumps(metrics, indent=1) + "\n")

    with tracking.Run(Path(model_path).parent, config) as mlrun:
        prefix = f"{protocol}_" if split == "val" else f"{split}_{protocol}_"
        mlrun.log_metrics({f"{prefix}{key}": metrics[key] for key in ("miou", "pixel_acc", "mean_acc")
                           if metrics[key] is not None})
        for level in metrics.get("levels", {}).get("unity", []):
            mlrun.log_metrics({f"unity_s{level['stride']}_{key}": level[key]
                               for key in ("precision", "recall") if level[key] is not None})
        mlrun.log_artifact(Path(output))
        per_class = Path(output).with_suffix(".per_class_iou.csv")
        atomic.write_text(per_class, "class,iou\n" + "".join(
            f"{name},{'' if iou is None else f'{iou:.4f}'}\n" for name, iou in summary["per_class_iou"].items()))
        mlrun.log_artifact(per_class)
    return metrics


def classes_without_pixels(confusion, class_names) -> list[str]:
    """The classes with no ground-truth pixel in a confusion matrix (rows: ground truth)."""
    return [name for name, count in zip(class_names, confusion.sum(axis=1)) if count == 0]


def describe_backbone(backbone: dict) -> str:
    """The timm name, plus the overrides that make a scaled-down or custom variant of it."""
    extra = ", ".join(f"{k}={v}" for k, v in (backbone.get("kwargs") or {}).items())
    return f"{backbone['name']}({extra})" if extra else backbone["name"]
