"""GPU claiming (segrepro.core.devices) with pretended devices: concurrent jobs get distinct devices,
a job waits while all are taken, a crashed job frees its device, SLURM's and the user's
assignments are respected. CPU only (SEGREPRO_FAKE_GPU_COUNT)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrepro import cli
from segrepro.core import devices
from segrepro.core.errors import SegreproError

# A job: claim one device, print what it got, then hold it until told to stop (stdin closes).
HOLDER = """
import sys
from segrepro.core import devices
try:
    got = devices.claim(1)
except Exception as err:
    print("error", err, flush=True)
    sys.exit(1)
import os
print(",".join(got), os.environ.get("CUDA_VISIBLE_DEVICES", "-"), flush=True)
sys.stdin.read()
"""

SCRUBBED = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_JOB_GPUS", "LOCAL_RANK", devices.CLAIMED)


@pytest.fixture
def gpu_env(tmp_path, monkeypatch):
    """4 pretended devices, a lock folder of the test's own, no SLURM/torchrun/user assignment."""
    for name in SCRUBBED:
        monkeypatch.setenv(name, "")  # recorded, so what a claim sets is undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEGREPRO_FAKE_GPU_COUNT", "4")
    monkeypatch.setenv("SEGREPRO_GPU_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("SEGREPRO_GPU_WAIT", "30")
    monkeypatch.setattr(devices, "_held", [])
    return tmp_path / "locks"


def start_holder(**env) -> subprocess.Popen:
    """Another job (not a child of a claimer: without the devices this test process claimed)."""
    inherited = {k: v for k, v in os.environ.items()
                 if not (os.environ.get(devices.CLAIMED) and k in ("CUDA_VISIBLE_DEVICES", devices.CLAIMED))}
    return subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**inherited, **env})


def claimed(process: subprocess.Popen) -> str:
    """The device a holder got (blocks until it prints), checked against its CUDA_VISIBLE_DEVICES."""
    line = process.stdout.readline().split()
    assert len(line) == 2 and line[0] == line[1], line
    return line[0]


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def test_concurrent_jobs_get_distinct_devices_a_fifth_waits_for_one_to_end(gpu_env):
    holders = [start_holder() for _ in range(4)]
    try:
        got = [claimed(p) for p in holders]
        assert sorted(got) == ["0", "1", "2", "3"]

        fifth = start_holder()
        try:
            time.sleep(1.5)
            assert fifth.poll() is None, "a fifth job got a device while all four were held"
            stop(holders[2])
            began = time.monotonic()
            assert claimed(fifth) == got[2]
            assert time.monotonic() - began < 5
        finally:
            stop(fifth)
    finally:
        stop(*holders)


def test_a_killed_job_frees_its_device(gpu_env, monkeypatch):
    monkeypatch.setenv("SEGREPRO_FAKE_GPU_COUNT", "1")
    first = start_holder()
    assert claimed(first) == "0"
    second = start_holder()
    try:
        time.sleep(1)
        assert second.poll() is None
        first.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        first.wait()
        assert claimed(second) == "0"
    finally:
        stop(second, first)


def test_no_free_device_within_the_wait_is_a_one_line_error_naming_the_lock_folder(gpu_env, monkeypatch):
    monkeypatch.setenv("SEGREPRO_FAKE_GPU_COUNT", "1")
    holder = start_holder()
    try:
        claimed(holder)
        began = time.monotonic()
        with pytest.raises(SegreproError) as caught:
            devices.claim(1, wait=1)
        assert 1 <= time.monotonic() - began < 3
        message = str(caught.value)
        assert "\n" not in message and str(gpu_env) in message and str(holder.pid) in message
    finally:
        stop(holder)
    with pytest.raises(SegreproError, match="2 GPU"):
        devices.claim(2)


def test_several_devices_for_one_job_and_the_wrapper_passes_its_locks_on(gpu_env):
    assert devices.claim(3) == ["0", "1", "2"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    # This process holds them: claiming again (a second run in the same process) is a no-op.
    assert devices.claim(1) == ["0", "1", "2"]
    other = start_holder()
    try:
        assert claimed(other) == "3"
    finally:
        stop(other)
    for handle in devices._held:
        handle.close()

    # `python -m segrepro.core.devices 2 -- CMD`: CMD sees two devices, and holds them while it runs.
    wrapped = subprocess.Popen(
        [sys.executable, "-m", "segrepro.core.devices", "2", "--", sys.executable, "-c",
         "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", devices.CLAIMED)})
    for name in ("CUDA_VISIBLE_DEVICES", devices.CLAIMED):
        del os.environ[name]  # (the fixture restores them)
    try:
        assert wrapped.stdout.readline().strip() == "0,1"
        rest = [start_holder(), start_holder()]
        try:
            assert sorted(claimed(p) for p in rest) == ["2", "3"]
        finally:
            stop(*rest)
    finally:
        stop(wrapped)


def test_slurm_assignment_is_used_and_nothing_claimed(gpu_env, monkeypatch):
    monkeypatch.setenv("SEGREPRO_FAKE_GPU_COUNT", "1")
    holder = start_holder()  # every local device taken
    try:
        claimed(holder)
        for slurm in ({"CUDA_VISIBLE_DEVICES": "0"}, {"SLURM_JOB_GPUS": "5"}):
            env = {"SLURM_JOB_ID": "123", **slurm}
            began = time.monotonic()
            job = subprocess.run([sys.executable, "-c", HOLDER], input="", capture_output=True,
                                 text=True, env={**os.environ, **env}, timeout=30)
            assert job.returncode == 0, job.stdout + job.stderr
            assert time.monotonic() - began < 10
            # SLURM's CUDA_VISIBLE_DEVICES is kept as it is; none is made up.
            assert job.stdout.split()[1] == slurm.get("CUDA_VISIBLE_DEVICES", "-")
    finally:
        stop(holder)
    assert not (gpu_env / "gpu5.lock").exists()


def test_the_users_cuda_visible_devices_is_the_pool(gpu_env, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    holders = [start_holder(), start_holder()]
    try:
        assert sorted(claimed(p) for p in holders) == ["2", "3"]
        third = start_holder(SEGREPRO_GPU_WAIT="0.5")
        assert third.stdout.readline().startswith("error no 1 free GPU(s) among 2, 3")
        third.wait(timeout=30)
        third.stdout.close()
    finally:
        stop(*holders)
    assert sorted(p.name for p in gpu_env.iterdir()) == ["gpu2.lock", "gpu3.lock"]


def test_run_devices(gpu_env, monkeypatch):
    # A CPU run claims nothing.
    assert devices.claim_for_run("cpu") == "cpu"
    assert not gpu_env.exists()
    # --device cuda:2 locks device 2, which is cuda:0 of the process.
    assert devices.claim_for_run("cuda:2") == "cuda:0"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    # No GPU at all: the default device claims nothing (the CPU), --device cuda is an error.
    monkeypatch.setattr(devices, "_held", [])
    for name in ("CUDA_VISIBLE_DEVICES", devices.CLAIMED):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SEGREPRO_FAKE_GPU_COUNT", "0")
    assert devices.claim_for_run(None) is None
    with pytest.raises(SegreproError, match="1 GPU.* wanted, 0 visible"):
        devices.claim_for_run("cuda")
    with pytest.raises(SegreproError, match="--device cuda:x"):
        devices.claim_for_run("cuda:x")


def test_the_cli_claims_before_the_command_runs(gpu_env, monkeypatch, project, capsys):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "evaluate",
                        lambda params, args: seen.update(device=args.device,
                                                         visible=os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert cli.main(["evaluate", "--paper", "pspnet", "--experiment", "psp50", "--device", "cuda:1"]) == 0
    assert seen == {"device": "cuda:0", "visible": "1"}
    assert (Path(os.environ["SEGREPRO_GPU_LOCKS"]) / "gpu1.lock").read_text().strip() == str(os.getpid())
