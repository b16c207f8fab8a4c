"""Training with several processes (segrepro.engine.distributed): `segrepro train` under torchrun, here
two CPU processes (gloo). Each process takes its half of the single-process run's global batch,
SyncBN normalises with the whole batch's statistics and DDP averages the gradients, so the run
follows the single-process one; rank 0 alone writes; a crashed run resumes to exactly the model of
an unbroken one; a batch the processes cannot split evenly is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import segrepro_command

from segrepro import cli
from segrepro.core import paths
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import IterationBatchSampler
from segrepro.engine import distributed
from segrepro.engine.checkpoint import CHECKPOINT
from segrepro.engine.train import LOG
from segrepro.pipeline import tracking

RUN = ("train", "--paper", "pspnet", "--experiment", "psp50", "--scale", "tiny", "--threads", "1")


def torchrun(*args: str, processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m segrepro.cli ARGS` (the venv's torchrun)."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone",
               "--nproc_per_node", str(processes), "-m", "segrepro.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_log(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    return [record for record in records if "loss" in record]  # not the training curve's val_miou


def mlflow_runs(project: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("pspnet")
    return client.search_runs([experiment.experiment_id]) if experiment else []


# ----------------------------------------------------------------------------- in this process

def test_the_ranks_slices_make_up_the_global_batch():
    batches = IterationBatchSampler(16, 4, seed=3, start_iteration=2, iterations=9)
    halves = [list(distributed.RankSlice(batches, rank, 2)) for rank in (0, 1)]
    assert len(distributed.RankSlice(batches, 0, 2)) == len(batches) == 7
    assert [a + b for a, b in zip(*halves)] == list(batches)
    assert all(len(half) == 2 for rank in halves for half in rank)


def test_one_process_is_left_as_it_is(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.setup(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.main, ctx.distributed) == (0, 1, True, False)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert distributed.wrap(model, ctx) is model and type(model[1]) is torch.nn.BatchNorm2d
    assert distributed.local_batch_size(5, ctx) == 5
    assert distributed.mean_over_ranks(1.5, {"main": 1.0}, ctx) == (1.5, {"main": 1.0})


def test_a_batch_the_processes_cannot_share_is_an_error_of_rank_0():
    ctx = distributed.Context(rank=0, world_size=2)
    assert distributed.local_batch_size(8, ctx) == 4
    with pytest.raises(SegreproError, match=r"^p/e: train.batch_size 5 is not divisible by the 2 "
                                            r"processes \(torchrun --nproc_per_node\)"):
        distributed.local_batch_size(5, ctx, "p/e")


# ----------------------------------------------------------------------------- torchrun, 2 processes

@pytest.mark.slow
def test_two_processes_follow_the_single_process_run(project, edit_params):
    # No dropout (each process draws its own masks) and no rescaling or rotation (the ignored
    # pixels of padding and of rotated corners would weigh the two halves' mean losses unequally):
    # what remains is rounding.
    edit_params("scales.yaml", {"tiny": {"train": {"iterations": 6, "batch_size": 4, "log_every": 1,
                                                   "scale_range": [1.0, 1.0]}}})
    edit_params("papers/pspnet.yaml", {"model": {"head": {"dropout": 0.0}}, "train": {"rotate": 0}})
    single, double = project / "results" / "single", project / "results" / "double"
    assert cli.main([*RUN, "--out", str(single / "model.pt")]) == 0

    done = torchrun(*RUN, "--out", str(double / "model.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained pspnet/psp50") == 1  # rank 0 reports, rank 1 is quiet

    one, two = read_log(single), read_log(double)
    assert [r["iteration"] for r in two] == list(range(1, 7))  # one log line per iteration, not two
    # Iteration 1 starts from the same weights: same images, and SyncBN's statistics are those of
    # the whole batch, so the loss is the same (BN over 2 images per process would differ).
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3), (a, b)
        assert b["lr"] == a["lr"]

    record = torch.load(double / "model.pt", weights_only=True)
    reference = torch.load(single / "model.pt", weights_only=True)
    assert record["summary"]["processes"] == 2 and reference["summary"]["processes"] == 1
    assert record["model"].keys() == reference["model"].keys()  # plain BN keys: loads anywhere
    for key, value in reference["model"].items():
        if value.is_floating_point():
            assert torch.allclose(record["model"][key], value, atol=2e-3, rtol=2e-2), key
        else:
            assert torch.equal(record["model"][key], value), key  # num_batches_tracked
    assert not (double / CHECKPOINT).exists()
    # One MLflow run per training (rank 0's), the two-process one with its loss curve.
    runs = {run.info.run_id: run for run in mlflow_runs(project)}
    assert len(runs) == 2
    run = runs[(double / tracking.RUN_ID_FILE).read_text().strip()]
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == pytest.approx(two[-1]["loss"])


@pytest.mark.slow
def test_a_crashed_two_process_run_resumes_to_the_unbroken_one(project, edit_params):
    edit_params("scales.yaml", {"tiny": {"train": {"iterations": 6, "batch_size": 4,
                                                   "checkpoint_every": 2, "log_every": 1}}})
    run_dir = paths.run_dir("tiny", "synthetic-tiny", "pspnet", "psp50", 0)
    dataset = project / "data" / "synthetic-tiny"
    # Break an image of rank 0's half of iteration 2's batch (0-based; served for the first time
    # then): the checkpoint of iteration 2 is written, then rank 0's load fails.
    ids = (dataset / "splits" / "train.txt").read_text().split()
    batches = list(IterationBatchSampler(len(ids), 4, 0, iterations=6))
    seen = {index for batch in batches[:2] for index, _ in batch}
    index = next(i for i, _ in batches[2][:2] if i not in seen)
    image = dataset / "images" / f"{ids[index]}.png"
    intact = image.read_bytes()
    image.write_bytes(b"\x89PNG broken")

    crashed = torchrun(*RUN)
    assert crashed.returncode != 0
    errors = [line for line in crashed.stderr.splitlines() if "segrepro: error:" in line]
    assert len(errors) == 1 and f"{ids[index]}.png: cannot read image" in errors[0], crashed.stderr[-3000:]
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["iteration"] == 2
    assert not (run_dir / "model.pt").exists()

    image.write_bytes(intact)
    resumed = torchrun(*RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming pspnet/psp50 from iteration 2") == 1
    reference = project / "results" / "unbroken" / "model.pt"
    unbroken = torchrun(*RUN, "--out", str(reference))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    ours = torch.load(run_dir / "model.pt", weights_only=True)
    theirs = torch.load(reference, weights_only=True)
    assert (ours["summary"]["resumed_from"], theirs["summary"]["resumed_from"]) == (2, 0)
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, f"tensors differ after resuming: {different[:5]}"
    assert read_log(run_dir) == read_log(reference.parent)
    assert [r["iteration"] for r in read_log(run_dir)] == list(range(1, 7))
    assert not (run_dir / CHECKPOINT).exists()
    # The crashed and the resumed job are one MLflow run (rank 0's), finished.
    statuses = sorted(run.info.status for run in mlflow_runs(project))
    assert statuses == ["FINISHED", "FINISHED"]


def test_a_batch_not_divisible_by_the_processes_is_a_one_line_error(project, edit_params):
    """Through plain `segrepro train` (what the workflow's rule runs): train.processes 2 makes it
    start torchrun itself; rank 0 says what is wrong, once."""
    edit_params("scales.yaml", {"tiny": {"train": {"batch_size": 3, "processes": 2}}})
    done = subprocess.run(segrepro_command(*RUN), capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "segrepro: error:" in line]
    assert errors == ["segrepro: error: pspnet/psp50: train.batch_size 3 is not divisible by the 2 "
                      "processes (torchrun --nproc_per_node): each takes an equal share of the batch"]
    assert not (project / "results" / "runs").exists() or not any((project / "results" / "runs").rglob("*.pt"))
