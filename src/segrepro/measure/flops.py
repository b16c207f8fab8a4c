"""The computation of a model as a paper counts it (HFGD Table 9): torch's FlopCounterMode on one
image, on the meta device so that no weights are allocated and nothing is computed.

FlopCounterMode counts a multiply-add as two FLOPs; the segmentation papers' "GFLOPs" (fvcore,
mmcv) count it as one, so the tables show multiply-adds (GMACs) and say so. Elementwise operations,
softmax and normalisation are not counted by either convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from segrepro.core import atomic
from segrepro.core.errors import SegreproError
from segrepro.models.factory import build_model

COUNTER = "torch.utils.flop_counter.FlopCounterMode, multiply-adds (FLOPs / 2)"


def count_macs(model_config: dict, num_classes: int, input_size: int) -> dict:
    """Multiply-adds (1e9) of the model's test-time forward pass on one input_size x input_size
    RGB image, of its backbone alone, and its parameters (1e6)."""
    model_config = dict(model_config, backbone=dict(model_config["backbone"], pretrained=False))
    with torch.device("meta"):
        model = build_model(model_config, num_classes).eval()
        image = torch.empty(1, 3, input_size, input_size)
    whole, backbone = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad():
        with whole:
            model.predict(image)
        with backbone:
            model.backbone(image)
    return {
        "gmacs": whole.get_total_flops() / 2e9,
        "backbone_gmacs": backbone.get_total_flops() / 2e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def write_flops(params, table: str, out: Path) -> dict:
    """Count every row model of a table with a `flops:` spec, as built at the spec's scale."""
    paper, spec = params.table(table)
    settings = spec.get("flops")
    if not settings:
        raise SegreproError(f"table '{table}' declares no 'flops' section")
    scale = settings.get("scale", "paper")
    counts = {}
    for row in spec["rows"]:
        # A row may be counted on another image or class count (the paper's own count of that model).
        size = row.get("flops", {}).get("input_size", settings["input_size"])
        classes = row.get("flops", {}).get("num_classes", settings["num_classes"])
        if row["experiment"] in counts:
            if (counts[row["experiment"]]["input_size"], counts[row["experiment"]]["num_classes"]) != (size, classes):
                raise SegreproError(f"table '{table}': experiment {row['experiment']} is counted in two ways")
            continue
        model = params.resolve(paper, row["experiment"], scale)["model"]
        counts[row["experiment"]] = dict(count_macs(model, classes, size), input_size=size, num_classes=classes)
    record = {"table": table, "scale": scale, "input_size": settings["input_size"],
              "num_classes": settings["num_classes"], "counter": COUNTER, "models": counts}
    atomic.write_text(out, json.dumps(record, indent=2) + "\n")
    return record
