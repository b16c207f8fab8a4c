"""What the Snakemake controller does besides scheduling the rules (workflow/rules/common.smk
calls these): refuse an unknown table or figure in one line, take over the working directory a
killed controller left locked, and print the progress of running trainings on the terminal.
"""

from __future__ import annotations

import fcntl
import json
import re
import sys
import threading
import time
from pathlib import Path

from segrepro.core import paths

SNAKEMAKE_DIR = Path(".snakemake")
CONTROLLER_LOCK = "segrepro-controller.lock"
PROGRESS_POLL_S = 2.0

_held: list = []  # this controller's lock file, open for its whole life


def command_line() -> dict:
    """The targets and the switches that matter here, from this controller's own command line
    (the Snakefile is read before Snakemake hands its settings to the workflow). Empty where the
    command line is not Snakemake's (the API, a test harness)."""
    try:
        from snakemake.cli import get_argument_parser

        args = get_argument_parser().parse_args(sys.argv[1:])
    except BaseException:  # argparse exits on what it cannot read: not ours to judge
        return {}
    return {"targets": list(args.targets or []), "dryrun": bool(args.dryrun), "nolock": bool(args.nolock)}


def unknown_target(targets: list[str], tables: list[str], figures: list[str]) -> str | None:
    """One line naming the first requested table or figure the params do not declare (Snakemake
    would bury it in a traceback of the rule's input function), or None."""
    for target in targets:
        table = re.fullmatch(r"(?:\./)?results/tables/([^/]+)\.(?:md|csv)", target)
        if table and table.group(1) not in [*tables, "pyramid_stats"]:
            return f"unknown table '{table.group(1)}' in target {target} (known: {', '.join(tables)})"
        figure = re.fullmatch(r"(?:\./)?results/figures/([^/]+)\.png", target)
        if figure and figure.group(1) not in figures:
            return f"unknown figure '{figure.group(1)}' in target {target} (known: {', '.join(figures)})"
    return None


def take_over_workdir(snakemake_dir: Path = SNAKEMAKE_DIR) -> list[Path]:
    """Called by a controller that will run jobs. Every such controller holds a shared lock on
    .snakemake/segrepro-controller.lock for its life (the kernel drops it when the controller
    dies, even of kill -9). One that gets it exclusively first knows no other controller is alive:
    the locks Snakemake keeps in .snakemake/locks are a killed controller's, and it removes them,
    so that the plain rerun needs no `--unlock`. Returns the lock files removed."""
    snakemake_dir.mkdir(exist_ok=True)
    handle = open(snakemake_dir / CONTROLLER_LOCK, "a")
    removed = []
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another controller runs: its locks are live, Snakemake's own check applies
    else:
        removed = sorted((snakemake_dir / "locks").glob("*.lock"))
        for lock in removed:
            lock.unlink(missing_ok=True)
    fcntl.flock(handle, fcntl.LOCK_SH)  # from an exclusive lock: a downgrade
    _held.append(handle)
    return removed


# ------------------------------------------------------------------------------ progress
def progress_line(path: Path, record: dict) -> str:
    """One line of a trainer's progress.jsonl record (see segrepro.engine.train._Progress)."""
    run = path.parent  # results/runs/SCALE/DATASET/PAPER/EXPERIMENT/seedN
    where = f"{record['run']} {run.name} ({run.parts[-5]}, {run.parts[-4]})" if len(run.parts) >= 5 else record["run"]
    done, total, first = record["iteration"], record["iterations"], record.get("resumed_from", 0)
    elapsed = max(0.0, record["updated"] - record["started"])
    if record["state"] == "done":
        return f"train {where}: done, {total} iterations ({_clock(elapsed)})"
    if record["state"] == "published":
        return f"train {where}: finished earlier (its complete.pt), published without training"
    if record["state"] in ("started", "resumed"):
        return f"train {where}: {record['state']} at iteration {done} of {total}"
    left = elapsed / (done - first) * (total - done) if done > first else 0.0
    loss = f", loss {record['loss']:.3f}" if record.get("loss") is not None else ""
    return (f"train {where}: {100 * done // total}% ({done}/{total} iterations{loss}; "
            f"{_clock(elapsed)} so far, about {_clock(left)} left)")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class _Watcher:
    def __init__(self, runs: Path, out, since: float):
        self.runs, self.out, self.since = runs, out, since
        self.read: dict[Path, tuple[bytes, int]] = {}  # file -> (its first line, lines read)
        self.lock = threading.Lock()

    def poll(self) -> None:
        with self.lock:
            for path in sorted(self.runs.glob(f"*/*/*/*/*/{paths.PROGRESS}")):
                try:
                    records = _new_records(path, self.read, self.since)
                except OSError:
                    continue  # replaced while read: the next poll sees it
                for record in records:
                    try:
                        line = progress_line(path, record)
                    except (KeyError, TypeError, ValueError, ZeroDivisionError):
                        continue  # not a trainer's record
                    print(line, file=self.out or sys.stderr, flush=True)

    def run(self, poll_s: float) -> None:
        while True:
            self.poll()
            time.sleep(poll_s)


_watchers: list[_Watcher] = []


def watch_progress(runs: Path = paths.RESULTS / "runs", out=None, poll_s: float = PROGRESS_POLL_S) -> None:
    """A daemon thread of the controller printing a line whenever a training (local or a cluster
    job on a shared filesystem) reports progress: at its start, every tenth of its iterations and
    at its end. Only what is written after the controller started is shown."""
    watcher = _Watcher(Path(runs), out, time.time())
    _watchers.append(watcher)
    threading.Thread(target=watcher.run, args=(poll_s,), daemon=True, name="segrepro-progress").start()


def finish_progress() -> None:
    """The lines written since the last poll (the controller is about to end)."""
    for watcher in _watchers:
        watcher.poll()


def _new_records(path: Path, read: dict, since: float) -> list[dict]:
    """The complete lines added to a progress file since the last poll, written after `since`.
    A file begun by another trainer (its first line, with the trainer's PID and start time,
    differs) is read from its start. The files are a dozen short lines: read whole."""
    lines = path.read_bytes().split(b"\n")[:-1]  # the last piece is not complete yet
    if not lines:
        return []
    first, done = read.get(path, (lines[0], 0))
    if first != lines[0]:
        done = 0
    read[path] = (lines[0], len(lines))
    records = []
    for line in lines[done:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("updated"), (int, float)) and record["updated"] >= since:
            records.append(record)
    return records
