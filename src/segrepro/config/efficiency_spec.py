"""The spec of a table of kind `efficiency` (SaF Sec. 5.3, Table 5; App. D, Table B): checked at
DAG-build time, torch-free. segrepro.measure.efficiency times its rows and
segrepro.reporting.efficiency_table renders them."""

from __future__ import annotations

import re

from segrepro.core.errors import SegreproError

# metric -> (display name, higher is better)
METRICS = {
    "test_fps": ("Test FPS", True),
    "train_its": ("Train it/s", True),
    "train_mem_gb": ("Train mem. (G)", False),
}
COMPARISON_HEADS = ("plain", "ccnet", "ocr")  # the heads segrepro.models.saf.context_heads builds
RESNET_OUTPUT_STRIDES = (8, 32)
PRECISIONS = ("fp32", "bf16")
MACHINES = ("cuda", "cpu")
MACHINE_KEYS = ("input_size", "warmup", "test_images", "train_steps")
ROW_ID = re.compile(r"^[A-Za-z0-9_]+$")


def check_efficiency_spec(where: str, spec: dict) -> None:
    """Validate a table of kind `efficiency` eagerly (at DAG-build time), one line per problem."""
    if not isinstance(spec.get("title"), str) or not spec["title"]:
        raise SegreproError(f"{where}: missing 'title'")
    metrics = spec.get("metrics")
    if not isinstance(metrics, list) or not metrics or any(m not in METRICS for m in metrics):
        raise SegreproError(f"{where}: 'metrics' must be a non-empty list of {', '.join(METRICS)}, got {metrics!r}")
    if len(set(metrics)) != len(metrics):
        raise SegreproError(f"{where}: 'metrics' lists a metric twice: {metrics}")
    _check_settings(where, spec.get("efficiency"))

    rows = spec.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SegreproError(f"{where}: 'rows' must be a non-empty list")
    ids = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SegreproError(f"{where}: row {i + 1} must be a mapping")
        for field in ("id", "label", "experiment"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise SegreproError(f"{where}: row {i + 1} has no '{field}'")
        name = f"{where}: row '{row['id']}'"
        if not ROW_ID.match(row["id"]) or row["id"] in ids:
            raise SegreproError(f"{name}: the id must be unique and made of letters, digits and '_'")
        ids.add(row["id"])
        if row.get("protocol", "ss") != "ss":
            raise SegreproError(f"{name}: only the single-scale test pass is timed: protocol must be 'ss'")
        head = row.get("head")
        if head is not None and head not in COMPARISON_HEADS:
            raise SegreproError(f"{name}: unknown head {head!r} (known: {', '.join(COMPARISON_HEADS)})")
        stride = row.get("resnet_output_stride")
        if stride is not None and (stride not in RESNET_OUTPUT_STRIDES or head is None):
            raise SegreproError(f"{name}: 'resnet_output_stride' must be 8 or 32 and needs a 'head' "
                                "(SaF's own model has no plain-ResNet extractor)")
        paper = row.get("paper") or {}
        if not isinstance(paper, dict):
            raise SegreproError(f"{name}: 'paper' must be a mapping of metric to number")
        for metric, value in paper.items():
            if metric not in METRICS:
                raise SegreproError(f"{name}: paper metric {metric!r} is not one of {', '.join(METRICS)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise SegreproError(f"{name}: paper {metric} is not a positive number: {value!r}")
    reference = spec["efficiency"].get("reference", rows[0]["id"])
    if reference not in ids:
        raise SegreproError(f"{where}: efficiency.reference {reference!r} is not a row id")

    claims = spec.get("claims") or []
    if not isinstance(claims, list):
        raise SegreproError(f"{where}: 'claims' must be a list")
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict) or not isinstance(claim.get("claim"), str):
            raise SegreproError(f"{where}: claim {i + 1} needs a 'claim' text")
        text = claim["claim"]
        if claim.get("metric") not in metrics:
            raise SegreproError(f"{where}: claim {text!r} needs a 'metric' among the table's {metrics}")
        better, than = claim.get("better"), claim.get("than")
        if "best" in claim or not isinstance(better, list) or not isinstance(than, list) or not better \
                or len(better) != len(than):
            raise SegreproError(f"{where}: claim {text!r} needs 'better' and 'than' lists of row ids of equal length")
        for ref in better + than:
            if ref not in ids:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row id")


def _check_settings(where: str, settings) -> None:
    if not isinstance(settings, dict):
        raise SegreproError(f"{where}: an efficiency table needs an 'efficiency' mapping")
    if not isinstance(settings.get("paper_device"), str) or not settings["paper_device"]:
        raise SegreproError(f"{where}: efficiency.paper_device must name the paper's device")
    for key in ("num_classes", "batch_size"):
        if not _positive_int(settings.get(key)):
            raise SegreproError(f"{where}: efficiency.{key} must be a positive integer")
    if settings.get("precision") not in PRECISIONS:
        raise SegreproError(f"{where}: efficiency.precision must be one of {', '.join(PRECISIONS)}")
    model_scale = settings.get("model_scale", {})
    if not isinstance(model_scale, dict) or not all(isinstance(v, str) for v in model_scale.values()):
        raise SegreproError(f"{where}: efficiency.model_scale must map a scale to the scale whose models it times")
    for machine in MACHINES:
        values = settings.get(machine)
        if not isinstance(values, dict) or set(values) != set(MACHINE_KEYS):
            raise SegreproError(f"{where}: efficiency.{machine} needs exactly {', '.join(MACHINE_KEYS)}")
        if not all(_positive_int(values[key]) for key in MACHINE_KEYS) or values["input_size"] % 32:
            raise SegreproError(f"{where}: efficiency.{machine}: positive integers, input_size a multiple of 32")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def model_scale(spec: dict, scale: str) -> str:
    """The scale whose models a run at `scale` times (the demo scale times the paper's)."""
    return spec["efficiency"].get("model_scale", {}).get(scale, scale)
