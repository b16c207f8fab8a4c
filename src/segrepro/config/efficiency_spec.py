"""The spec of a table of kind `efficiency` (SaF Sec. 5.3, Table 5; App. D, Table B): its structure
is the schema's `efficiency_table` (workflow/schemas/params.schema.yaml); this module checks what the
schema cannot (row ids unique, claims and the reference naming rows), torch-free.
segrepro.measure.efficiency times its rows and segrepro.reporting.efficiency_table renders them."""

from __future__ import annotations

from segrepro.config.schema import schema_defs, schema_enum
from segrepro.core.errors import SegreproError

# metric -> (display name, higher is better); its keys are the schema's efficiency_metric
# (tests/test_efficiency.py checks they agree).
METRICS = {
    "test_fps": ("Test FPS", True),
    "train_its": ("Train it/s", True),
    "train_mem_gb": ("Train mem. (G)", False),
}
COMPARISON_HEADS = schema_enum("comparison_head")  # the heads segrepro.models.saf.context_heads builds
MACHINE_KEYS = tuple(schema_defs()["efficiency_machine"]["required"])


def check_efficiency_references(where: str, spec: dict) -> None:
    """On an efficiency spec the schema accepted: unique row ids, and the reference row and every
    claim's rows and metric taken from the table."""
    ids = set()
    for row in spec["rows"]:
        if row["id"] in ids:
            raise SegreproError(f"{where}: row '{row['id']}': the id must be unique")
        ids.add(row["id"])
    reference = spec["efficiency"].get("reference", spec["rows"][0]["id"])
    if reference not in ids:
        raise SegreproError(f"{where}: efficiency.reference {reference!r} is not a row id")
    for claim in spec.get("claims") or []:
        text = claim["claim"]
        if claim["metric"] not in spec["metrics"]:
            raise SegreproError(f"{where}: claim {text!r} needs a 'metric' among the table's {spec['metrics']}")
        if len(claim["better"]) != len(claim["than"]):
            raise SegreproError(f"{where}: claim {text!r} needs 'better' and 'than' lists of row ids of equal length")
        for ref in claim["better"] + claim["than"]:
            if ref not in ids:
                raise SegreproError(f"{where}: claim {text!r} refers to {ref!r}, which is not a row id")


def model_scale(spec: dict, scale: str) -> str:
    """The scale whose models a run at `scale` times (the demo scale times the paper's)."""
    return spec["efficiency"].get("model_scale", {}).get(scale, scale)
