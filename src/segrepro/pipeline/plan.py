"""What a target costs before anything is trained: `segrepro plan` and `segrepro calibrate`.

The jobs come from Snakemake itself: a dry run of the targets (`snakemake TARGETS --dry-run`),
parsed and checked against Snakemake's own job counts, so the plan never re-derives the
workflow's DAG. A training job costs its iterations x the seconds of one training step; an
evaluation or submission job costs its sliding-window passes x the seconds of one window. Both
seconds come from a calibration: a few steps of the run's model, built from its resolved
configuration, on a synthetic batch on the machine at hand, stored per device in
results/calibration/<device>.json and reused by every later plan.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field

from segrepro.config.params import Params
from segrepro.core import paths
from segrepro.core.devices import device_name
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import config_hash, training_config
from segrepro.data.dataset import crop_pair
from segrepro.measure.calibration import (
    calibrate_run,
    calibration_path,
    load_note,
    machine_load,
    read_calibrations,
    signature,
    store_calibrations,
)

# The torch threads of a training or evaluation job: the `threads:` of the train and evaluate rules
# (workflow/rules/train.smk, eval.smk), passed to `segrepro --threads`. A calibration times its
# steps with as many, unless --threads says otherwise.
JOB_THREADS = 1
# The jobs whose cost the plan estimates; every other rule is listed with its count only.
TRAIN_RULES = ("train",)
INFERENCE_RULES = ("evaluate", "evaluate_split", "submit")
EVALUATE_RULES = ("evaluate", "evaluate_split")
NOT_ESTIMATED = ("not estimated: data preparation (downloads depend on the network; conversion, subsets and "
                 "pyramids on the disk) and the short jobs (tables, figures, counts and timings, the report)")

# Published split sizes and a typical image size (W, H) of each real dataset, for a plan made
# before the dataset is prepared (docs/notes/notes-datasets.md; ADE20K, COCO and Pascal images
# vary in size, hence "typical"). Once a dataset is prepared, its card and image headers are read
# instead. Keyed by the declaration's `kind`: each real kind is one dataset. Kept here rather than
# in params/datasets.yaml, whose declarations are parameters of the prepare rule: a new key there
# would make Snakemake convert every prepared dataset again.
REAL_DATASETS = {
    "ade20k": {"splits": {"train": 20210, "val": 2000, "test": 3352}, "size": (683, 512), "unlabelled": ("test",)},
    "pascal_context": {"splits": {"train": 4998, "val": 5105}, "size": (500, 375), "unlabelled": ()},
    "cocostuff10k": {"splits": {"train": 9000, "val": 1000}, "size": (640, 480), "unlabelled": ()},
    "cocostuff164k": {"splits": {"train": 118287, "val": 5000}, "size": (640, 480), "unlabelled": ()},
    "cityscapes": {"splits": {"train": 2975, "val": 500, "test": 1525}, "size": (2048, 1024), "unlabelled": ("test",)},
    "camvid": {"splits": {"train": 367, "val": 101, "test": 233}, "size": (480, 360), "unlabelled": ()},
}


# ------------------------------------------------------------------------------ the jobs
@dataclass(frozen=True)
class Job:
    """One job of Snakemake's dry run: its rule and wildcards."""

    rule: str
    wildcards: tuple[tuple[str, str], ...]

    @property
    def values(self) -> dict[str, str]:
        return dict(self.wildcards)


JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (?P<rule>[A-Za-z_]\w*):\s*$")
WILDCARDS = re.compile(r"^\s+wildcards: (?P<wildcards>.*)$")
STATS_ROW = re.compile(r"^(?P<rule>[A-Za-z_]\w*)\s+(?P<count>\d+)$")


def parse_dry_run(text: str) -> list[Job]:
    """The jobs of a `snakemake --dry-run` listing: one `rule NAME:` block per job (a
    `wildcards:` line where the rule has any), checked against the listing's "Job stats"."""
    jobs: list[Job] = []
    rule, wildcards = None, ()
    stats: Counter = Counter()
    in_stats = False
    for line in text.splitlines():
        if line.startswith("Job stats:"):
            in_stats = True
            continue
        if in_stats:
            row = STATS_ROW.match(line.strip())
            if row and row["rule"] != "total":
                stats[row["rule"]] = int(row["count"])  # the table may be printed twice
            in_stats = not line.strip().startswith("total")
            continue
        header = JOB_HEADER.match(line)
        if header or not line.startswith(" "):
            if rule is not None:
                jobs.append(Job(rule, wildcards))
            rule, wildcards = (header["rule"], ()) if header else (None, ())
            continue
        found = WILDCARDS.match(line)
        if found and rule is not None:
            pairs = (item.split("=", 1) for item in found["wildcards"].split(", "))
            wildcards = tuple((key.strip(), value.strip()) for key, value in pairs)
    if rule is not None:
        jobs.append(Job(rule, wildcards))
    if Counter(job.rule for job in jobs) != stats:
        raise SegreproError(
            f"could not read Snakemake's dry run: its job stats say {dict(stats)}, the listing "
            f"{dict(Counter(job.rule for job in jobs))}")
    return jobs


REPORT = str(paths.REPORT)


def snakemake_targets(targets: list[str]) -> list[str]:
    """The targets to plan: the report reads whatever is built when it runs, so planning it means
    planning `all` (every table and figure of the scale) and the report itself."""
    if REPORT in targets and "all" not in targets:
        return ["all", *targets]
    return list(targets)


def snakemake_command(targets: list[str], scale: str, dataset: str | None, seeds: list[int],
                      forceall: bool = False) -> list[str]:
    config = [f"scale={scale}", f"seeds=[{','.join(str(seed) for seed in seeds)}]"]
    if dataset:
        config.append(f"dataset={dataset}")
    return [sys.executable, "-m", "snakemake", *snakemake_targets(targets), "--dry-run", "--nolock",
            *(["--forceall"] if forceall else []), "--config", *config]


def planned_jobs(targets: list[str], scale: str, dataset: str | None,
                 seeds: list[int]) -> tuple[list[Job], list[Job]]:
    """(the jobs to run, every job of the targets' DAG, up to date or not), from two dry runs
    in the project folder, run at the same time."""
    runs = [subprocess.Popen(snakemake_command(targets, scale, dataset, seeds, forceall),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for forceall in (False, True)]
    outputs = [run.communicate()[0] for run in runs]
    for run, output in zip(runs, outputs):
        if run.returncode != 0:
            raise SegreproError(f"plan of {' '.join(targets)}: {snakemake_error(output)}")
    return parse_dry_run(outputs[0]), parse_dry_run(outputs[1])


def snakemake_error(output: str) -> str:
    """The one line that says why Snakemake could not plan: our own error from an input
    function, an unknown target, or its last message."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("SegreproError: "):
            return line.removeprefix("SegreproError: ")
        if line.startswith("segrepro: "):  # the workflow's own one-line refusal (an unknown target)
            return line.removeprefix("segrepro: ")
        if line.startswith("No rule to produce "):
            target = line.removeprefix("No rule to produce ").split(" (")[0]
            return (f"no rule makes target '{target}' (a table or figure under results/, a run's "
                    "file, results/report.html, or all)")
        if line.startswith("WorkflowError:") and index + 1 < len(lines):
            return line.removeprefix("WorkflowError:").strip() or lines[index + 1]
    return lines[-1] if lines else "snakemake failed without a message"


# ------------------------------------------------------------------------------ datasets
def num_classes(params: Params, dataset: str) -> int:
    """The class count of a dataset: its card once prepared, else its declaration's kind."""
    card = _card(dataset)
    if card is not None:
        return int(card["num_classes"])
    from segrepro.data import cityscapes, convert, synthetic

    declaration = params.dataset(dataset)
    kind = declaration["kind"]
    if kind == "subset":
        return num_classes(params, declaration["source"])
    if kind == "pascal_context":
        return int(declaration["classes"])
    names = {"synthetic": synthetic.CLASS_NAMES, "ade20k": convert.ADE20K_CLASSES,
             "cocostuff10k": convert.COCOSTUFF_CLASSES, "cocostuff164k": convert.COCOSTUFF_CLASSES,
             "cityscapes": cityscapes.CLASSES, "camvid": convert.CAMVID_CLASSES}
    return len(names[kind])


def _card(dataset: str) -> dict | None:
    from segrepro.data.dataset import load_card

    root = paths.dataset_root(dataset)
    return load_card(root) if (root / paths.CARD).is_file() else None


@dataclass
class SplitSizes:
    """The (height, width) of every image of a split, and where they come from."""

    split: str
    sizes: list[tuple[int, int]]
    source: str


def split_sizes(params: Params, dataset: str, split: str | None = None) -> SplitSizes:
    """The image sizes of `split` (None: the split a test-server submission predicts): read
    from the prepared dataset, else its declaration's (or the published) count and size."""
    card = _card(dataset)
    if card is not None:
        from PIL import Image

        from segrepro.data.dataset import SplitImages
        from segrepro.engine.submit import default_split

        split = split or default_split(card)
        images = SplitImages(paths.dataset_root(dataset), split)
        sizes = []
        for image_id in images.ids:
            with Image.open(images.image_path(image_id)) as image:  # reads the header only
                sizes.append((image.height, image.width))
        return SplitSizes(split, sizes, f"{dataset}/{split}: {len(sizes)} images, sizes read from data/{dataset}")
    count, (width, height), split, what = _declared_split(params, dataset, split)
    return SplitSizes(split, [(height, width)] * count,
                      f"{dataset}/{split}: {count} images ({what}; not prepared yet), assumed {width}x{height}")


def _declared_split(params: Params, dataset: str, split: str | None):
    """(count, (width, height), split, where the count comes from) of an unprepared dataset."""
    declaration = params.dataset(dataset)
    kind = declaration["kind"]
    if kind == "synthetic":
        generator = declaration["generator"]
        split = split or "val"  # no test split: its val images stand in for submissions
        counts = {name: generator[name] for name in ("train", "val")}
        size, what = (generator["width"], generator["height"]), "generated"
    elif kind == "subset":
        source = _declared_split(params, declaration["source"], declaration["from_split"])
        split = split or "val"
        counts, size, what = declaration["sizes"], source[1], f"drawn from {declaration['source']}"
    elif kind == "folder":
        raise SegreproError(f"dataset '{dataset}' (kind folder) is not prepared yet: its sizes are known only "
                            f"once it is (segrepro prepare {dataset})")
    else:
        facts = REAL_DATASETS[kind]
        split = split or ("test" if "test" in facts["unlabelled"] else "val")
        counts, size, what = facts["splits"], facts["size"], "published count"
    if split not in counts:
        raise SegreproError(f"dataset '{dataset}' has no split '{split}'")
    return int(counts[split]), size, split, what


def windows_per_image(size: tuple[int, int], protocol: dict, crop_size, base_size: int | None) -> float:
    """Forward passes of one eval-crop window that a test protocol costs for an image of `size`
    (h, w), as segrepro.engine.inference runs it: per scale (x2 with flip) the image is resized, then
    run whole if it fits in the crop (time taken as proportional to its pixels; a whole window
    with the protocol's pad "each_scale") or else padded to the crop and tiled with a stride of
    2/3 of the crop (PSPNet's sliding window); with pad "before_scaling" the image is first
    padded to the crop and that is what each scale resizes."""
    from segrepro.engine.inference import odd_keeping_size, scaled_size, tile_starts

    crop_h, crop_w = crop_pair(crop_size)
    pad = protocol.get("pad", "none")
    total = 0.0
    for scale in protocol["scales"]:
        if pad == "before_scaling":
            factor = float(scale) * (1.0 if base_size is None else base_size / max(size))
            h, w = odd_keeping_size(max(size[0], crop_h), max(size[1], crop_w), factor)
        else:
            h, w = scaled_size(size[0], size[1], float(scale), base_size)
        if h <= crop_h and w <= crop_w:
            windows = 1.0 if pad == "each_scale" else h * w / (crop_h * crop_w)
        else:
            rows = tile_starts(max(h, crop_h), crop_h, math.ceil(2 * crop_h / 3))
            columns = tile_starts(max(w, crop_w), crop_w, math.ceil(2 * crop_w / 3))
            windows = len(rows) * len(columns)
        total += windows * (2 if protocol.get("flip", False) else 1)
    return total


# ------------------------------------------------------------------------------ costs
@dataclass
class Cost:
    """One job's estimate: its duration on the calibrated device and the devices it holds."""

    job: Job
    seconds: float
    devices: int           # GPUs (or, at a CPU scale, job slots) the job holds
    run: tuple             # (scale, dataset, paper, experiment, seed): evaluations wait for it
    detail: dict = field(default_factory=dict)


def _run_of(job: Job) -> tuple:
    w = job.values
    return (w["scale"], w["dataset"], w["paper"], w["experiment"], int(w["seed"]))


def resumed_iteration(config: dict, run: tuple) -> int:
    """The iteration a training resumes from: its checkpoint's, if one of this configuration
    is there (segrepro.engine.train writes it every checkpoint_every iterations)."""
    run_dir = paths.run_dir(*run)
    if not (run_dir / paths.CHECKPOINT).exists():
        return 0  # without loading torch
    from segrepro.engine.checkpoint import resume_iteration

    return resume_iteration(run_dir, config_hash(training_config(config)))


def job_gpus(params: Params, scale: str, stage: str, config: dict) -> int:
    """The GPUs a job asks for, as workflow/rules/common.smk's job_resource: the scale's
    resources.<stage>.gpus, one per process for a multi-process training; 0 at a CPU scale."""
    gpus = params.scale(scale).get("resources", {}).get(stage, {}).get("gpus", 0)
    if stage == "train" and gpus:
        gpus = max(gpus, config["train"].get("processes", 1))
    return gpus


def train_cost(params: Params, job: Job, config: dict, entry: dict) -> Cost:
    run = _run_of(job)
    start = resumed_iteration(config, run)
    iterations = config["train"]["iterations"] - start
    processes = config["train"].get("processes", 1)
    gpus = job_gpus(params, run[0], "train", config)
    seconds = iterations * entry["step_seconds"]
    return Cost(job, seconds, max(gpus, processes), run, {
        "iterations": iterations, "resumed_from": start, "step_seconds": entry["step_seconds"],
        "processes": processes, "gpus": gpus, "backbone": config["model"]["backbone"]["name"]})


def inference_cost(params: Params, job: Job, config: dict, entry: dict, sizes: SplitSizes) -> Cost:
    w = job.values
    settings = config["eval"]
    protocol = settings["protocols"][w["protocol"]]
    windows = sum(windows_per_image(size, protocol, settings["crop_size"], settings.get("base_size"))
                  for size in sizes.sizes)
    if (job.rule in EVALUATE_RULES and w["protocol"] == "ss"
            and config["model"].get("head", {}).get("output") == "pyramidal"):
        # SaF's unity-head analysis (segrepro.engine.saf_analysis) runs the model once more per image.
        windows += sum(windows_per_image(size, {"scales": [1.0]}, settings["crop_size"], settings.get("base_size"))
                       for size in sizes.sizes)
    gpus = job_gpus(params, w["scale"], "eval", config)
    return Cost(job, windows * entry["window_seconds"], max(gpus, 1), _run_of(job), {
        "images": len(sizes.sizes), "split": sizes.split, "windows": windows,
        "window_seconds": entry["window_seconds"], "gpus": gpus})


def wall_seconds(trainings: list[Cost], inferences: list[Cost], slots: int) -> float:
    """The finish time of a simple schedule on `slots` GPUs (jobs at once): trainings longest
    first, each on the slots that free up first; then each evaluation or submission, longest
    first, on the first free slot once its run's training is done."""
    free = [0.0] * slots
    trained: dict[tuple, float] = {}
    for costs, after_training in ((trainings, False), (inferences, True)):
        for cost in sorted(costs, key=lambda c: -c.seconds):
            if cost.devices > slots:
                raise SegreproError(f"--gpus {slots}: fewer than the {cost.devices} a {cost.job.rule} job "
                                    f"of {'/'.join(map(str, cost.run[2:4]))} holds")
            chosen = sorted(range(slots), key=lambda slot: free[slot])[:cost.devices]
            start = max([free[slot] for slot in chosen] + [trained.get(cost.run, 0.0) if after_training else 0.0])
            for slot in chosen:
                free[slot] = start + cost.seconds
            if not after_training:
                trained[cost.run] = start + cost.seconds
    return max(free, default=0.0)


# ------------------------------------------------------------------------------ the commands
def _calibration_for(config: dict, classes: int, device, device_label: str, known: dict,
                     new: dict, recalibrate: bool, steps: int, batch: int | None) -> dict:
    """The run's calibration entry: stored, or measured now and stored at once (a long plan
    that is interrupted keeps what it measured)."""
    key = signature(config, classes, device_label)
    # A stored calibration made under load is measured again once the machine is quiet; while it
    # is still busy the old one is used, and the plan's assumptions say so (format_plan).
    remeasure = key in known and load_note(known[key]) and not machine_load(JOB_THREADS)["under_load"]
    if key not in new and (recalibrate or key not in known or remeasure):
        new[key] = calibrate_run(config, classes, device, steps, batch)
        store_calibrations(calibration_path(device_label), device_label, {key: new[key]})
    return new.get(key) or known[key]


def make_plan(params: Params, targets: list[str], scale: str, dataset: str | None, seeds: list[int],
              device, gpus: int, recalibrate: bool = False, steps: int = 5, batch: int | None = None) -> dict:
    """The plan of `targets` as a JSON-ready record (see format_plan for its text)."""
    if gpus < 1:
        raise SegreproError(f"--gpus {gpus}: at least one job must run at a time")
    params.scale(scale)
    if dataset:
        params.dataset(dataset)
    to_run, every = planned_jobs(targets, scale, dataset, seeds)
    label = device_name(device)
    path = calibration_path(label)
    known, new = read_calibrations(path), {}
    trainings, inferences, sizes, entries_used = [], [], {}, {}
    for job in to_run:
        if job.rule not in TRAIN_RULES + INFERENCE_RULES:
            continue
        w = job.values
        config = params.resolve(w["paper"], w["experiment"], w["scale"], w["dataset"], int(w["seed"]))
        classes = num_classes(params, w["dataset"])
        entry = _calibration_for(config, classes, device, label, known, new, recalibrate, steps, batch)
        entries_used[signature(config, classes, label)] = entry
        if job.rule in TRAIN_RULES:
            trainings.append(train_cost(params, job, config, entry))
            continue
        split = w.get("split", "val") if job.rule in EVALUATE_RULES else None
        if (w["dataset"], split) not in sizes:
            sizes[w["dataset"], split] = split_sizes(params, w["dataset"], split)
        inferences.append(inference_cost(params, job, config, entry, sizes[w["dataset"], split]))
    gpu_scale = bool(params.scale(scale).get("resources", {}).get("train", {}).get("gpus", 0))
    return {
        "targets": targets, "scale": scale, "dataset": dataset, "seeds": seeds,
        "device": label, "device_type": device.type, "calibration_file": str(path), "gpus": gpus,
        "unit": "GPU-hours" if gpu_scale else "CPU-hours",
        "jobs": {"to_run": dict(Counter(job.rule for job in to_run)),
                 "up_to_date": dict(Counter(job.rule for job in every) - Counter(job.rule for job in to_run))},
        "job_list": [{"rule": job.rule, "wildcards": job.values} for job in to_run],
        "calibrations": entries_used,
        "trainings": [_cost_record(cost) for cost in trainings],
        "inferences": [_cost_record(cost) for cost in inferences],
        "train_hours": sum(c.seconds * c.devices for c in trainings) / 3600,
        "inference_hours": sum(c.seconds * c.devices for c in inferences) / 3600,
        "wall_seconds": wall_seconds(trainings, inferences, gpus),
        "sizes": list(dict.fromkeys(s.source for s in sizes.values())),
    }


def _cost_record(cost: Cost) -> dict:
    return {"rule": cost.job.rule, "wildcards": cost.job.values, "seconds": cost.seconds,
            "devices": cost.devices, "hours": cost.seconds * cost.devices / 3600, **cost.detail}


def duration(seconds: float) -> str:
    """A duration in the largest units that keep it readable: 0.4 s, 42 s, 12 min, 3.4 h, 2 d 5 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds // 86400:.0f} d {seconds % 86400 / 3600:.0f} h"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                             for i, (cell, width) in enumerate(zip(row, widths))) for row in [header, *rows]]


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3g}" + (f"-{high:.3g}" if f"{high:.3g}" != f"{low:.3g}" else "")


def format_plan(plan: dict) -> str:
    """The plan as text: jobs per rule, trainings per run, evaluations per protocol, totals,
    the schedule's wall time and every assumption, one line each."""
    unit, out = plan["unit"], []
    to_run, up_to_date = plan["jobs"]["to_run"], plan["jobs"]["up_to_date"]
    dataset = plan["dataset"] or "each table's own"
    out.append(f"plan of {' '.join(plan['targets'])} at scale {plan['scale']} "
               f"(dataset: {dataset}, seeds: {' '.join(map(str, plan['seeds']))})")
    out.append(f"jobs: {sum(to_run.values())} to run, {sum(up_to_date.values())} already up to date (not counted)")
    rules = list(dict.fromkeys([*to_run, *up_to_date]))
    out += _table(["rule", "to run", "up to date"], [[r, to_run.get(r, 0), up_to_date.get(r, 0)] for r in rules])

    if plan["trainings"]:
        groups: dict[tuple, list[dict]] = {}
        for cost in plan["trainings"]:
            w = cost["wildcards"]
            groups.setdefault((w["paper"], w["experiment"], w["dataset"]), []).append(cost)
        rows = []
        for (paper, experiment, dataset), costs in sorted(groups.items()):
            first = costs[0]
            rows.append([f"{paper}/{experiment}", dataset, len(costs), first["backbone"],
                         first["iterations"], f"{first['step_seconds']:.3g}", duration(first["seconds"]),
                         f"{sum(c['hours'] for c in costs):.3g}"])
        out.append(f"training ({sum(len(c) for c in groups.values())} jobs):")
        out += _table(["run", "dataset", "jobs", "backbone", "iterations", "s/step", "per job", unit], rows)
    if plan["inferences"]:
        groups = {}
        for cost in plan["inferences"]:
            w = cost["wildcards"]
            groups.setdefault((cost["rule"], w["dataset"], cost["split"], w["protocol"]), []).append(cost)
        rows = []
        for (rule, dataset, split, protocol), costs in sorted(groups.items()):
            window = [c["window_seconds"] for c in costs]
            per_image = [c["windows"] / c["images"] for c in costs]
            rows.append([f"{rule} {protocol}", f"{dataset}/{split}", len(costs), costs[0]["images"],
                         _span(per_image), _span(window),
                         f"{sum(c['hours'] for c in costs):.3g}"])
        out.append(f"evaluation and submission ({len(plan['inferences'])} jobs):")
        out += _table(["job", "images", "jobs", "images/job", "windows/image", "s/window", unit], rows)

    total = plan["train_hours"] + plan["inference_hours"]
    out.append(f"total: {total:.3g} {unit} (training {plan['train_hours']:.3g}, evaluation "
               f"{plan['inference_hours']:.3g}); wall time with {plan['gpus']} "
               f"{'GPU' if unit == 'GPU-hours' else 'job'}{'s' * (plan['gpus'] != 1)} at once: "
               f"{duration(plan['wall_seconds'])}")
    out.append("assumptions:")
    dates = sorted({(e["device"], e["date"], e["torch"]) for e in plan["calibrations"].values()})
    for device, day, torch_version in dates:
        out.append(f"  - calibrated on {device}, {day}, torch {torch_version} ({plan['calibration_file']})")
    scaled: dict[str, list[str]] = {}
    for entry in plan["calibrations"].values():
        if entry.get("scaled"):
            scaled.setdefault(entry["scaled"], []).append(entry["run"])
    for how, runs in scaled.items():
        out.append(f"  - step time {how}: {', '.join(sorted(runs))}")
    loaded = {entry["run"]: load_note(entry) for entry in plan["calibrations"].values() if load_note(entry)}
    if loaded:
        out.append(f"  - CALIBRATED UNDER LOAD (other work shared the CPUs, so the times are too long): "
                   f"{', '.join(f'{run} ({note})' for run, note in sorted(loaded.items()))}; "
                   "`segrepro plan --recalibrate` on a quiet machine measures again")
    if plan["unit"] == "CPU-hours":
        out.append("  - CPU-hours: hours of one job with the calibrated threads; --gpus counts jobs at once")
    else:
        if plan["device_type"] == "cpu":
            out.append("  - measured on a CPU: its hours stand for the GPU-hours of a job on it")
        out.append("  - GPU-hours: a job's hours x the GPUs it holds (a multi-process run: one per process, "
                   "step time of each process's share of the batch)")
    out.append("  - training: iterations x the step time of a synthetic batch (no data loading, no start-up, "
               "no checkpoint writes); a checkpointed run counts only its remaining iterations")
    if plan["inferences"]:
        out.append("  - evaluation: windows of the eval crop per image (sliding window, stride 2/3 crop; an image "
                   "smaller than the crop costs its share of the crop's pixels) x scales (x2 with flip) x the "
                   "time of one window")
        out += [f"  - {source}" for source in plan["sizes"]]
    out.append("  - schedule: trainings longest first on the first free GPUs, then each evaluation once its "
               "run is trained")
    others = sorted(set(to_run) - set(TRAIN_RULES) - set(INFERENCE_RULES))
    if others:
        out.append(f"  - {NOT_ESTIMATED}: {', '.join(others)}")
    return "\n".join(out)


