"""Preemption and time limits: SIGUSR1 (SLURM's warning signal) or SIGTERM (preemption, time
limit) make `segrepro train` write its checkpoint at the next iteration boundary and exit with
PREEMPTED_EXIT; the rerun resumes to exactly the model of an unbroken run, in the same MLflow run."""

import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import segrepro_command
from test_train import default_run_dir, logged_iterations, mlflow_client, read_log

from segrepro import cli
from segrepro.engine.checkpoint import CHECKPOINT
from segrepro.engine.train import PREEMPTED_EXIT
from segrepro.pipeline import tracking

# On the CPU whatever the machine has: the comparison with the unbroken run is bit for bit.
RUN = ("--paper", "pspnet", "--experiment", "psp50", "--scale", "tiny", "--threads", "1",
       "--device", "cpu")
ITERATIONS = 40


def stop_when_logged(process: subprocess.Popen, run_dir, past: int, sig: int, timeout=120):
    """Once the job has logged an iteration beyond `past`, send `sig` to its whole process group
    (as SLURM signals every process of the job step: the loader workers too). Returns the
    iteration logged last before the signal, the seconds the job took to exit, and its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = logged_iterations(run_dir)
        if logged and logged[-1] > past:
            os.killpg(process.pid, sig)
            sent = time.monotonic()
            process.wait(timeout=60)
            return logged[-1], time.monotonic() - sent, process.stderr.read()
        assert process.poll() is None, f"ended (rc {process.returncode}) before the signal:\n{process.stderr.read()}"
        time.sleep(0.005)
    raise AssertionError("the job logged no iteration in time")


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(segrepro_command(*command), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow  # about 25 s: two interpreter starts, three trainings of 40 iterations
def test_a_signalled_run_checkpoints_exits_and_resumes_to_the_unbroken_model(project, edit_params, capsys):
    # No periodic checkpoint: the only one is written because of the signal. Loader workers, to
    # show they survive the signal long enough to serve the batches up to the checkpoint.
    edit_params("scales.yaml", {"tiny": {"train": {"iterations": ITERATIONS, "checkpoint_every": 1000,
                                                   "log_every": 1, "num_workers": 2}}})
    run_dir = default_run_dir()
    command = ["train", *RUN]
    run_id = None
    resumed_at = 0
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # the first job, then its rerun
        process = start(command)
        try:
            logged, seconds, err = stop_when_logged(process, run_dir, resumed_at + 2, sig)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()
        assert process.returncode == PREEMPTED_EXIT, err
        assert seconds < 30
        with capsys.disabled():  # (shown with -s)
            print(f"{signal.Signals(sig).name}: exited {seconds:.2f} s after the signal")
        assert not (run_dir / "model.pt").exists()
        stopped_at = torch.load(run_dir / CHECKPOINT, weights_only=True)["iteration"]
        # At the boundary after the signal: the iteration it was in, at most one more.
        assert logged <= stopped_at <= logged + 1 < ITERATIONS
        assert logged_iterations(run_dir)[-1] == stopped_at
        last = err.strip().splitlines()[-1]
        assert last == (f"segrepro: pspnet/psp50 stopped by {signal.Signals(sig).name} at iteration "
                        f"{stopped_at}: checkpoint written, the same command resumes it"), err
        assert "Traceback" not in err
        if resumed_at:
            assert f"resuming pspnet/psp50 from iteration {resumed_at}" in err

        # The MLflow run is left KILLED (not FINISHED, not FAILED), and the rerun continues it.
        this_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
        assert run_id in (None, this_id)
        run_id = this_id
        assert mlflow_client().get_run(run_id).info.status == "KILLED"
        resumed_at = stopped_at

    # The rerun to the end (in this process: a second interpreter start costs seconds).
    assert cli.main(command) == 0
    assert f"resuming pspnet/psp50 from iteration {resumed_at}" in capsys.readouterr().err
    assert (run_dir / "model.pt").is_file() and not (run_dir / CHECKPOINT).exists()
    assert (run_dir / tracking.RUN_ID_FILE).read_text().strip() == run_id
    run = mlflow_client().get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client().get_metric_history(run_id, "loss")]
    assert max(steps) == ITERATIONS

    reference = project / "results" / "reference" / "model.pt"
    assert cli.main([*command, "--out", str(reference)]) == 0
    ours = torch.load(run_dir / "model.pt", weights_only=True)
    theirs = torch.load(reference, weights_only=True)
    assert ours["summary"]["resumed_from"] == resumed_at and theirs["summary"]["resumed_from"] == 0
    assert ours["model"].keys() == theirs["model"].keys()
    different = [k for k in ours["model"] if not torch.equal(ours["model"][k], theirs["model"][k])]
    assert not different, f"tensors differ after two preemptions: {different[:5]}"
    assert read_log(run_dir) == read_log(reference.parent)


def test_a_loader_worker_outlives_a_strangers_stop_signal_but_not_its_parents():
    from torch.utils.data import DataLoader

    from segrepro.engine.train import _ignore_stop_signals

    loader = DataLoader(list(range(100)), batch_size=2, num_workers=1, persistent_workers=True,
                        worker_init_fn=_ignore_stop_signals)
    batches = iter(loader)
    assert next(batches).tolist() == [0, 1]
    worker = batches._workers[0]
    for sig in ("TERM", "USR1"):  # sent by another process, as SLURM does
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    assert next(batches).tolist() == [2, 3]
    # The parent's SIGTERM (multiprocessing's clean-up at exit) still ends it, or exit would hang.
    worker.terminate()
    worker.join(timeout=10)
    assert worker.exitcode == 0
