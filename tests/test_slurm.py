"""workflow/profiles/slurm: the per-scale job resources it submits with, and a tiny table built
through a real one-node SLURM cluster (workflow/scripts/slurm-cluster.sh: munged, MariaDB,
slurmdbd, slurmctld, slurmd on localhost).

The cluster test needs root and the Debian packages (installed by the script when missing); it
skips, saying why, when either is unavailable. It starts the cluster once per module and always
stops it (which restores /etc/slurm/slurm.conf).
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_project, edit_yaml
from test_workflow import parse_markdown_table, project_env, snakemake

SCRIPT = REPO / "workflow" / "scripts" / "slurm-cluster.sh"
PROFILE = "workflow/profiles/slurm"
# The smallest table that trains and evaluates: SaF Table 1, two rows, 5 SLURM jobs (prepare_dataset,
# 2 train, 2 evaluate; the table itself is a local rule).
TABLE = "table1"
TABLE_MD = Path("results/tables") / f"{TABLE}.md"
# The cluster lives outside pytest's tmp folders, which are private to root: MariaDB, munged and
# slurmctld run as their own users.
CLUSTER_DIR = "/tmp/segrepro-slurm-pytest"
# Test speed: the plugin first checks job states after 40 s and then every 10 s more each time.
FAST_STATUS = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")
DB_PORT = 33306  # the script's MariaDB port (DB_PORT in slurm-cluster.sh)
WORKFLOW_LIMIT = 480  # seconds; the run takes about 2 minutes here


def planned_resources(output: str) -> dict[str, list[dict]]:
    """rule -> the `resources:` of each job a dry-run (`-n`) lists."""
    jobs: dict[str, list[dict]] = {}
    rule = None
    for line in output.splitlines():
        header = re.match(r"^(?:local)?rule (\w+):$", line)
        if header:
            rule = header.group(1)
        elif rule and line.strip().startswith("resources:"):
            pairs = line.strip()[len("resources:"):].strip().split(", ")
            jobs.setdefault(rule, []).append(dict(pair.split("=", 1) for pair in pairs))
    return jobs


# ----------------------------------------------------------------------------- without a cluster

def test_jobs_ask_for_their_scales_resources(tmp_path):
    """Training and evaluation take GPUs, CPUs, memory and time from params/scales.yaml; at paper
    scale one GPU each, at tiny scale none."""
    root = tmp_path / "project"
    copy_project(root)
    env = project_env(tmp_path / "mlflow.db")
    scales = yaml.safe_load((root / "params/scales.yaml").read_text())
    for scale in ("paper", "tiny"):
        result = snakemake(root, str(TABLE_MD), "-n", "--cores", "2", "--config", f"scale={scale}", env=env)
        assert result.returncode == 0, result.stdout[-3000:]
        jobs = planned_resources(result.stdout)
        for rule, stage in (("train", "train"), ("evaluate", "eval")):
            declared = scales[scale]["resources"][stage]
            assert len(jobs[rule]) == 2
            for resources in jobs[rule]:
                assert resources["gpu"] == str(declared["gpus"])
                assert resources["cpus_per_task"] == str(declared["cpus"])
                assert resources["mem_mb"] == str(declared["mem_mb"])
                assert resources["runtime"] == str(declared["runtime"])
        assert scales["paper"]["resources"]["train"]["gpus"] == 1
        assert "gpu" not in jobs["prepare_dataset"][0]


def test_a_misspelt_resource_is_an_error(tmp_path):
    root = tmp_path / "project"
    copy_project(root)
    edit_yaml(root / "params/scales.yaml", {"tiny": {"resources": {"train": {"gpu": 1}}}})
    result = snakemake(root, str(TABLE_MD), "-n", "--cores", "1", "--config", "scale=tiny",
                       env=project_env(tmp_path / "mlflow.db"))
    assert result.returncode != 0
    assert "params/scales.yaml: tiny" in result.stdout and "gpu" in result.stdout, result.stdout[-3000:]


# ----------------------------------------------------------------------------- on a real cluster

@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster (partition debug, account root); stopped afterwards, always."""
    if os.geteuid() != 0:
        pytest.skip("starting munged, MariaDB and the SLURM daemons needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "SEGREPRO_SLURM_DIR": CLUSTER_DIR}
    began = time.monotonic()
    start = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    if start.returncode == 3:  # the packages could not be installed: nothing was started
        pytest.skip(f"SLURM packages unavailable: {start.stderr.strip()[-500:]}")
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        print(f"\nSLURM cluster started in {time.monotonic() - began:.1f} s")
        yield env
    finally:
        began = time.monotonic()
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)
        print(f"SLURM cluster stopped in {time.monotonic() - began:.1f} s")
        assert stop.returncode == 0, stop.stdout + stop.stderr


def sacct_jobs(since: str) -> list[dict]:
    """The cluster's jobs submitted since `since`: JobID, User, State, Timelimit, ReqMem, Comment
    (the plugin writes rule_<rule>_wildcards_... into the comment)."""
    fields = ["JobID", "User", "State", "Timelimit", "ReqMem", "Comment"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", since, "-o", ",".join(fields)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (IPv4 and IPv6, from /proc)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addresses.add(str(ipaddress.ip_address(words)))
    return addresses


@pytest.mark.slow
def test_the_cluster_listens_on_loopback_only(slurm_cluster):
    # slurmctld, slurmd and slurmdbd at SLURM's default ports; MariaDB at the script's own port.
    ports = {"slurmctld": 6817, "slurmd": 6818, "slurmdbd": 6819, "mariadb": DB_PORT}
    for daemon, port in ports.items():
        addresses = listening_addresses(port)
        assert addresses, f"{daemon} does not listen on port {port}"
        assert all(ipaddress.ip_address(a).is_loopback for a in addresses), (daemon, addresses)


@pytest.mark.slow
def test_tiny_table_builds_on_slurm(slurm_cluster, tmp_path, mlflow_store_template):
    began = time.monotonic()
    root = tmp_path / "project"
    copy_project(root)
    shutil.copy2(mlflow_store_template, tmp_path / "mlflow.db")
    # The plugin would guess the account from sacct (and fail on an empty history): name it.
    env = project_env(tmp_path / "mlflow.db") | {"SBATCH_ACCOUNT": "root"}
    env.pop("SBATCH_PARTITION", None)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))

    result = subprocess.run(
        ["timeout", "-s", "INT", "-k", "30", str(WORKFLOW_LIMIT), sys.executable, "-m", "snakemake",
         "--profile", PROFILE, "--jobs", "4", str(TABLE_MD), "--config", "scale=tiny", *FAST_STATUS],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=WORKFLOW_LIMIT + 60, check=False,
    )
    seconds = time.monotonic() - began
    print(f"tiny {TABLE} built through SLURM in {seconds:.1f} s")
    assert result.returncode == 0, result.stdout[-5000:]
    assert "6 of 6 steps (100%) done" in result.stdout, result.stdout[-3000:]

    spec = yaml.safe_load((root / "params/papers/saf.yaml").read_text())["tables"][TABLE]
    header, rows = parse_markdown_table((root / TABLE_MD).read_text())
    assert [row[0] for row in rows] == [declared["label"] for declared in spec["rows"]]
    ours = header.index("mIoU (%) reproduced")
    for row in rows:
        assert re.fullmatch(r"\d+\.\d{2}", row[ours]), row

    jobs = sacct_jobs(since)
    rules = Counter(re.match(r"rule_(\w+?)_wildcards_", job["Comment"]).group(1) for job in jobs)
    assert rules == Counter({"prepare_dataset": 1, "train": 2, "evaluate": 2}), jobs
    assert {job["State"] for job in jobs} == {"COMPLETED"}, jobs
    # Jobs run as the submitting user (root here), with the submitter's environment and venv.
    assert {job["User"] for job in jobs} == {pwd.getpwuid(os.getuid()).pw_name}, jobs
    # Train and evaluate jobs got the time limit and memory of params/scales.yaml's tiny scale,
    # the dataset job the profile's defaults.
    tiny = yaml.safe_load((root / "params/scales.yaml").read_text())["tiny"]["resources"]
    for job in jobs:
        rule = re.match(r"rule_(\w+?)_wildcards_", job["Comment"]).group(1)
        if rule in ("train", "evaluate"):
            declared = tiny["train" if rule == "train" else "eval"]
            hours, minutes = divmod(declared["runtime"], 60)
            assert job["Timelimit"] == f"{hours:02d}:{minutes:02d}:00", job
            assert job["ReqMem"] == f"{declared['mem_mb']}M", job
        else:
            assert job["Timelimit"] == "01:00:00" and job["ReqMem"] == "4000M", job
