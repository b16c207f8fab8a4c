"""SaF's efficiency tables (Sec. 5.3, Table 5; App. D, Table B): each row's model timed on the
machine at hand, beside the paper's GeForce RTX 2080 Ti figures.

`segrepro efficiency NAME` times the rows of a table of kind `efficiency` and writes
results/efficiency/NAME.json (segrepro.core.paths.efficiency_path); `segrepro table NAME` renders
it (segrepro.reporting.efficiency_table). A row names an experiment (its architecture, as built at
the table's model scale, random init), optionally a comparison head (`head`:
segrepro.models.saf.context_heads) and the plain ResNet instead of App. D's decoder
(`resnet_output_stride`). Each row runs in a fresh process (segrepro.measure.efficiency_probe), so
that its peak memory is its own: the probe is started by module name, not imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from segrepro.config.efficiency_spec import model_scale
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import git_commit
from segrepro.models.factory import without_pretrained

PROBE = "segrepro.measure.efficiency_probe"


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def row_jobs(params, name: str, scale: str, device: str, threads: int | None) -> dict[str, dict]:
    """The probe's job for each row (by id): the model as built at the model scale, without
    pretrained weights (random init: nothing is downloaded), and the machine's settings."""
    paper, spec = params.table(name)
    if spec.get("kind") != "efficiency":
        raise SegreproError(f"table '{name}' is not of kind 'efficiency': it has nothing to time")
    settings = spec["efficiency"]
    models_at = model_scale(spec, scale)
    params.scale(scale)
    machine = settings["cuda" if device.startswith("cuda") else "cpu"]
    jobs = {}
    for row in spec["rows"]:
        config = params.resolve(paper, row["experiment"], models_at)
        model = without_pretrained(config["model"])
        jobs[row["id"]] = {
            "model": model, "head": row.get("head"), "resnet_output_stride": row.get("resnet_output_stride"),
            "num_classes": settings["num_classes"], "batch_size": settings["batch_size"],
            "precision": settings["precision"], "train": config["train"], "device": device,
            "threads": threads, **machine,
        }
    return jobs


def run_probe(job: dict, where: str) -> dict:
    """One row's measurement, in a fresh process; its failure becomes one line."""
    result = subprocess.run([sys.executable, "-m", PROBE], input=json.dumps(job), capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        raise SegreproError(f"{where}: the measurement failed: {lines[-1].removeprefix('segrepro: error: ')}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_table(params, name: str, scale: str, device: str | None = None, threads: int | None = None) -> dict:
    """Time every row of an efficiency table; the record segrepro.measure.efficiency writes as JSON."""
    device = device or _default_device()
    jobs = row_jobs(params, name, scale, device, threads)
    _, spec = params.table(name)
    rows = {}
    for row in spec["rows"]:
        job = jobs[row["id"]]
        began = time.monotonic()
        measured = run_probe(job, f"table '{name}', row '{row['id']}'")
        rows[row["id"]] = dict(measured, experiment=row["experiment"], head=job["head"],
                               resnet_output_stride=job["resnet_output_stride"],
                               backbone=job["model"]["backbone"]["name"], seconds=time.monotonic() - began)
        print(f"{name}/{row['id']}: {measured['test_fps']:.3g} FPS, {measured['train_its']:.3g} it/s, "
              f"{measured['train_mem_gb']:.3g} G ({rows[row['id']]['seconds']:.0f} s)", flush=True)
    first = next(iter(rows.values()))
    settings = spec["efficiency"]
    machine = "cuda" if device.startswith("cuda") else "cpu"
    return {
        "table": name, "scale": scale, "model_scale": model_scale(spec, scale), "device": device,
        "device_name": first["device_name"], "threads": first["threads"], "torch": first["torch"],
        "num_classes": settings["num_classes"], "batch_size": settings["batch_size"],
        "precision": settings["precision"] if machine == "cuda" else "fp32", **settings[machine],
        "commit": git_commit(), "rows": rows,
    }
