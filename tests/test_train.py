"""The trainer (segrepro.engine.train): it learns, it resumes a killed job to exactly the model of an
unbroken run, it marks crashed runs FAILED in MLflow, and its learning-rate schedule."""

import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import segrepro_command
from PIL import Image

from segrepro import cli
from segrepro.config.params import deep_merge, load_params
from segrepro.core import paths
from segrepro.data.dataset import IterationBatchSampler, load_card
from segrepro.engine.checkpoint import CHECKPOINT, COMPLETE
from segrepro.engine.evaluate import evaluate_run
from segrepro.engine.train import LOG, poly_lr, train
from segrepro.pipeline import tracking

RUN = ("--paper", "pspnet", "--experiment", "psp50", "--scale", "tiny", "--threads", "1")


def mlflow_client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def read_log(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    return [record for record in records if "loss" in record]  # not the training curve's val_miou


def tiny_config(**override) -> dict:
    """psp50 at tiny scale, as the project in the current directory resolves it."""
    return deep_merge(load_params().resolve("pspnet", "psp50", "tiny"), override)


def default_run_dir() -> Path:
    return paths.run_dir("tiny", "synthetic-tiny", "pspnet", "psp50", 0)


# ----------------------------------------------------------------------------- learning

def majority_share(dataset_root: Path, split: str) -> float:
    ids = (dataset_root / "splits" / f"{split}.txt").read_text().split()
    labels = np.concatenate([np.asarray(Image.open(dataset_root / "labels" / f"{i}.png")).ravel()
                             for i in ids])
    counts = np.bincount(labels[labels != 255])
    return counts.max() / counts.sum()


def test_a_tiny_run_learns(project):
    config = tiny_config(train={"iterations": 60, "log_every": 5, "checkpoint_every": 1000})
    run_dir = project / "results" / "learn"
    summary = train(config, run_dir / "model.pt", device="cpu")
    assert summary["iterations"] == 60 and summary["resumed_from"] == 0
    assert (run_dir / "model.pt").is_file() and not (run_dir / CHECKPOINT).exists()

    log = read_log(run_dir)
    assert [r["iteration"] for r in log] == list(range(5, 61, 5))
    first = np.mean([r["loss"] for r in log[:2]])
    last = np.mean([r["loss"] for r in log[-2:]])
    assert last < 0.75 * first, [round(r["loss"], 3) for r in log]
    assert set(log[-1]) == {"iteration", "loss", "lr", "loss_main", "loss_aux"}
    # lr of a record is the rate of its window's last step: poly at iteration - 1.
    for r in log:
        assert r["lr"] == pytest.approx(poly_lr(0.01, r["iteration"] - 1, 60, 0.9), rel=1e-12)

    # MLflow holds the same curve, in the same run the id file names.
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
    client = mlflow_client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "psp50"
    assert run.data.params["train.iterations"] == "60"
    assert run.data.tags["config_hash"] and run.data.tags["experiment"] == "psp50"
    # The data version the run trained on: the dataset card's fingerprint.
    assert run.data.tags["dataset_sha256"] == load_card(config["dataset"]["root"])["content_sha256"]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(r["iteration"], r["loss"]) for r in log]

    # Far better than chance on the images it trained on.
    metrics = evaluate_run(config, run_dir / "model.pt", "ss", run_dir / "train_ss.json",
                           device="cpu", split="train")
    chance = majority_share(Path(config["dataset"]["root"]), "train")
    assert metrics["pixel_acc"] > 100 * chance + 15, (metrics["pixel_acc"], chance)
    assert metrics["miou"] > 3 * 100 * chance / 12, metrics["miou"]


# ----------------------------------------------------------------------------- kill and resume

def logged_iterations(run_dir: Path) -> list[int]:
    """Iterations of the complete lines of the log (a line being written is ignored)."""
    try:
        text = (run_dir / LOG).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["iteration"] for line in text.split("\n")[:-1] if line]


def kill_past_a_checkpoint(process: subprocess.Popen, run_dir: Path, every: int, timeout=120):
    """SIGKILL the job once it has a checkpoint and has logged an iteration past it, so that the
    resumed job must also drop those log lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / CHECKPOINT).exists():
            logged = logged_iterations(run_dir)
            if logged and logged[-1] % every:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return
        if process.poll() is not None:
            pytest.fail(f"training ended (rc {process.returncode}) before it could be killed:\n"
                        + process.stderr.read())
        time.sleep(0.005)
    process.kill()
    pytest.fail("no checkpoint appeared")


def same_metrics(a: dict, b: dict) -> None:
    for key in ("miou", "pixel_acc", "mean_acc", "per_class_iou", "confusion_matrix", "num_images"):
        assert a[key] == b[key], key


def test_killed_run_resumes_to_the_model_of_an_unbroken_run(project, edit_params, capsys):
    edit_params("scales.yaml", {"tiny": {"train": {"iterations": 16, "checkpoint_every": 4,
                                                   "log_every": 2}}})
    run_dir = default_run_dir()
    command = ["train", *RUN]

    process = subprocess.Popen(segrepro_command(*command), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        kill_past_a_checkpoint(process, run_dir, every=4)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "model.pt").exists(), "killed after it had finished"
    killed_at = torch.load(run_dir / CHECKPOINT, weights_only=True)["iteration"]
    assert killed_at in (4, 8, 12)
    assert max(logged_iterations(run_dir)) > killed_at
    run_id = (run_dir / tracking.RUN_ID_FILE).read_text()
    assert mlflow_client().get_run(run_id.strip()).info.status == "RUNNING"

    # The same command again (in this process: a second interpreter start costs seconds).
    assert cli.main(command) == 0
    assert f"resuming pspnet/psp50 from iteration {killed_at}" in capsys.readouterr().err
    assert (run_dir / "model.pt").is_file() and not (run_dir / CHECKPOINT).exists()
    assert (run_dir / tracking.RUN_ID_FILE).read_text() == run_id

    # The same command, unbroken, into another folder.
    reference = project / "results" / "reference" / "model.pt"
    assert cli.main([*command, "--out", str(reference)]) == 0

    ours = torch.load(run_dir / "model.pt", weights_only=True)
    theirs = torch.load(reference, weights_only=True)
    assert ours["config_hash"] == theirs["config_hash"]
    assert (ours["summary"]["resumed_from"], theirs["summary"]["resumed_from"]) == (killed_at, 0)
    assert ours["model"].keys() == theirs["model"].keys()
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, f"tensors differ after resuming: {different[:5]}"
    # The log of the resumed run lost the lines the killed job wrote after its checkpoint.
    assert read_log(run_dir) == read_log(reference.parent)
    assert [r["iteration"] for r in read_log(run_dir)] == list(range(2, 17, 2))

    # Evaluated, both give the same numbers; the evaluation logs into the training's MLflow run.
    assert cli.main(["evaluate", *RUN]) == 0
    metrics_path = paths.metrics_path("tiny", "synthetic-tiny", "pspnet", "psp50", 0, "ss")
    metrics = json.loads(metrics_path.read_text())
    reference_metrics = evaluate_run(tiny_config(), reference, "ss",
                                     project / "results" / "reference" / "ss.json", device="cpu")
    same_metrics(metrics, reference_metrics)
    assert metrics["train"]["resumed_from"] == killed_at

    run = mlflow_client().get_run(run_id.strip())
    assert run.info.status == "FINISHED"
    assert run.data.metrics["ss_miou"] == pytest.approx(metrics["miou"])
    assert (run_dir / tracking.RUN_ID_FILE).read_text() == run_id


def test_checkpoint_of_another_configuration_or_unreadable_is_not_resumed(project, capsys):
    config = tiny_config(train={"iterations": 2, "checkpoint_every": 1})
    run_dir = project / "results" / "other"
    run_dir.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "iteration": 1, "config_hash": "0" * 16},
               run_dir / CHECKPOINT)
    (run_dir / LOG).write_text(json.dumps({"iteration": 1, "loss": 99.0}) + "\n")
    (run_dir / tracking.RUN_ID_FILE).write_text("not-a-run\n")
    assert train(config, run_dir / "model.pt", device="cpu")["resumed_from"] == 0
    assert "belongs to another configuration; starting from iteration 0" in capsys.readouterr().err
    assert 99.0 not in [r["loss"] for r in read_log(run_dir)]
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() != "not-a-run"

    (run_dir / COMPLETE).unlink()  # else the finished model is published again, not trained
    (run_dir / CHECKPOINT).write_bytes(b"truncated")
    assert train(config, run_dir / "model.pt", device="cpu")["resumed_from"] == 0
    assert "is unreadable; starting from iteration 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a crash

@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_crashed_run_is_failed_in_mlflow_with_a_one_line_error(project, edit_params, capsys,
                                                                 num_workers):
    edit_params("scales.yaml", {"tiny": {"train": {"num_workers": num_workers}}})
    config = tiny_config()
    settings = config["train"]
    # Corrupt an image the sampler first serves at iteration 1: one step runs, then the load fails.
    ids = (project / "data" / "synthetic-tiny" / "splits" / "train.txt").read_text().split()
    batches = list(IterationBatchSampler(len(ids), settings["batch_size"], config["seed"],
                                         iterations=settings["iterations"]))
    served_first = {index for index, _ in batches[0]}
    image_id = ids[next(index for index, _ in batches[1] if index not in served_first)]
    (project / "data" / "synthetic-tiny" / "images" / f"{image_id}.png").write_bytes(b"\x89PNG broken")

    assert cli.main(["train", *RUN]) == 1
    err = capsys.readouterr().err

    run_dir = default_run_dir()
    assert not (run_dir / "model.pt").exists()
    run = mlflow_client().get_run((run_dir / tracking.RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FAILED"
    assert run.data.tags["experiment"] == "psp50"

    assert "Traceback" not in err
    lines = [line for line in err.split("\n") if "error" in line.lower()]
    assert len(lines) == 1, err
    # On a line of its own (not glued to the end of an unfinished progress bar), naming the file.
    assert lines[0].startswith("segrepro: error: "), repr(lines[0])
    assert f"{image_id}.png" in lines[0]


# ----------------------------------------------------------------------------- the schedule

def test_poly_lr_by_hand():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)  # 0.0053589
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.005358867, rel=1e-6)
    assert poly_lr(0.02, 75, 100, 2.0) == pytest.approx(0.02 * 0.0625)
    assert poly_lr(0.01, 99, 100, 1.0) == pytest.approx(0.0001)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0
    assert poly_lr(0.01, 30, 100, 0.0) == 0.01  # power 0: constant
    rates = [poly_lr(0.01, i, 10, 0.9) for i in range(10)]
    assert all(a > b > 0 for a, b in itertools.pairwise(rates))
