# Shared by every rule: the validated params/, the chosen scale/dataset/seeds, and input functions.
import re
import shlex
import sys

from segrepro.pipeline import controller, tracking

from segrepro.core import paths
from segrepro.pipeline.codedeps import stage_sources
from segrepro.config.params import load_params
from segrepro.config.efficiency_spec import model_scale as efficiency_model_scale
from segrepro.core.paths import efficiency_path
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import config_hash, training_config

try:
    PARAMS = load_params(workflow=config)
    # Exported into this process's environment: every job and onstart's tracking-init inherit it.
    tracking.use_uri(PARAMS.workflow["mlflow_uri"])
except SegreproError as err:
    raise WorkflowError(str(err)) from None

if workflow.is_main_process:
    COMMAND_LINE = controller.command_line()
    # An unknown table or figure: one line, not a traceback of an input function.
    UNKNOWN = controller.unknown_target(COMMAND_LINE.get("targets", []), PARAMS.table_names(), PARAMS.figure_names())
    if UNKNOWN:
        print(f"segrepro: {UNKNOWN}", file=sys.stderr)
        raise SystemExit(1)
    if COMMAND_LINE and not COMMAND_LINE["dryrun"] and not COMMAND_LINE["nolock"]:
        # A controller killed earlier left Snakemake's lock behind: the plain rerun clears it.
        for stale in controller.take_over_workdir():
            print(f"segrepro: removed {stale}, left by a Snakemake run that was killed", file=sys.stderr)

SCALE = PARAMS.workflow["scale"]
SEEDS = PARAMS.workflow["seeds"]
DATASET = PARAMS.workflow["dataset"]  # None: each paper's default for the scale
SPLIT = PARAMS.workflow["split"]  # None: each table's split for its dataset (Params.eval_split)
LOCAL_SOURCES = PARAMS.workflow["sources"]  # dataset -> an extracted copy of its archive

ID = r"[A-Za-z0-9_]+"
# The wildcards of one run: segrepro.core.paths' functions called with them give the rules' output
# and log patterns, so the CLI, the table writer and the rules share one definition of every file name.
RUN = ("{scale}", "{dataset}", "{paper}", "{experiment}", "{seed}")
MODEL = str(paths.model_path(*RUN))


wildcard_constraints:
    scale=ID,
    paper=ID,
    experiment=ID,
    table=r"(?!pyramid_stats\b)[A-Za-z0-9_]+",  # pyramid_stats.md has a rule of its own
    figure="|".join(PARAMS.figure_names()) or ID,
    dataset=r"[A-Za-z0-9_.-]+",
    seed=r"\d+",
    protocol=r"[a-z][a-z0-9_]*",
    archive="|".join(re.escape(name) for name in PARAMS.archives),


onstart:
    shell("segrepro tracking-init")
    # One line per training at its start, every 10 % and at its end (the jobs' own output goes to logs/).
    controller.watch_progress()


onsuccess:
    controller.finish_progress()


onerror:
    controller.finish_progress()


def family_code(stage, paper_of=lambda wildcards: wildcards.paper):
    """The source files a stage runs for the model family of the job's paper (by default the
    `paper` wildcard; `paper_of` finds it otherwise)."""

    def sources(wildcards):
        return stage_sources(stage, PARAMS.paper(paper_of(wildcards))["model"]["family"])

    return sources


def synthetic_data(dataset):
    """Whether a dataset comes from the synthetic generator (itself, or a subset of such a dataset)."""
    declaration = PARAMS.dataset(dataset)
    if declaration["kind"] == "subset":
        return synthetic_data(declaration["source"])
    return declaration["kind"] == "synthetic"


def dataset_code(stage, dataset_of=lambda wildcards: wildcards.dataset):
    """The source files a stage runs for the job's dataset (by default the `dataset` wildcard): the
    synthetic generator only for synthetic data, the converters only for real data."""

    def sources(wildcards):
        return stage_sources(stage, data="synthetic" if synthetic_data(dataset_of(wildcards)) else "real")

    return sources


def run_config(wildcards):
    return PARAMS.resolve(
        wildcards.paper, wildcards.experiment, wildcards.scale, wildcards.dataset, int(wildcards.seed)
    )


def train_config_hash(wildcards):
    """Changes exactly when something the trained model depends on changes."""
    return config_hash(training_config(run_config(wildcards)))


def eval_settings(wildcards):
    """The test settings one evaluation depends on (not the other protocols)."""
    settings = run_config(wildcards)["eval"]
    if wildcards.protocol not in settings["protocols"]:
        raise WorkflowError(
            f"unknown test protocol '{wildcards.protocol}' for scale '{wildcards.scale}'"
        )
    return {
        "protocol": settings["protocols"][wildcards.protocol],
        "crop_size": settings["crop_size"],
        "base_size": settings.get("base_size"),
    }


def submission_server(wildcards):
    """The submission format of a run: the one its paper's test-server table rows name."""
    formats = {
        row["test_server"]["format"]
        for spec in PARAMS.paper(wildcards.paper)["tables"].values()
        for row in spec["rows"]
        if row.get("test_server")
        and (row["experiment"], row["protocol"]) == (wildcards.experiment, wildcards.protocol)
    }
    if len(formats) != 1:
        raise WorkflowError(
            f"{wildcards.paper}/{wildcards.experiment}@{wildcards.protocol}: "
            + ("no table has a test-server row for it" if not formats else f"tables name several formats {sorted(formats)}")
        )
    return formats.pop()


def job_split(wildcards):
    """The split an evaluation scores: its `split` wildcard (rule evaluate_split), else val."""
    return getattr(wildcards, "split", "val")


def pyramid_inputs(wildcards):
    """The pyramidal ground truth of the evaluated split, for the single-scale evaluation of a model
    with a pyramidal output (the unity head's precision and recall, Table 9, Fig. 3)."""
    config = run_config(wildcards)
    pyramidal = config["model"].get("head", {}).get("output") == "pyramidal"
    if pyramidal and wildcards.protocol == "ss":
        return {"pyramids": str(paths.pyramid_dir(wildcards.dataset, job_split(wildcards)))}
    return {}


def eval_base_size():
    """The size the single-scale protocol feeds the network (None: the image's own)."""
    return PARAMS.scale(SCALE)["eval"].get("base_size")


# The dataset whose ground-truth pyramids results/tables/pyramid_stats.md describes: SaF's at this scale.
PYRAMID_STATS_DATASET = PARAMS.dataset_name("saf", SCALE, DATASET)


def figure_inputs(wildcards):
    """A figure reads the first seed's single-scale metrics and model of its experiment."""
    paper, spec = PARAMS.figure(wildcards.figure)
    dataset = PARAMS.dataset_name(paper, SCALE, DATASET)
    run = (SCALE, dataset, paper, spec["experiment"], SEEDS[0])
    return {"metrics": str(paths.metrics_path(*run, "ss")), "model": str(paths.model_path(*run))}


def dataset_source(wildcards):
    """What a dataset is made from: a subset's source dataset, a real dataset's archives in
    data/raw/ (one download job each), or the local folder `--config sources=` names for it (a
    folder dataset: that, else its declared `root`)."""
    declaration = PARAMS.dataset(wildcards.dataset)
    if declaration["kind"] == "subset":
        return {"source": str(paths.card_path(declaration["source"]))}
    if wildcards.dataset in LOCAL_SOURCES:
        return {"local": LOCAL_SOURCES[wildcards.dataset]}
    if declaration["kind"] == "folder" and "root" in declaration:
        return {"local": declaration["root"]}
    return {role: str(paths.RAW / part["archive"]) for role, part in declaration.get("parts", {}).items()}


def local_source_option(dataset):
    return f"--source {shlex.quote(LOCAL_SOURCES[dataset])}" if dataset in LOCAL_SOURCES else ""


def dataset_declaration(wildcards):
    """What a preparation depends on: the declaration, less `eval_split` (what tables report)."""
    return {k: v for k, v in PARAMS.dataset(wildcards.dataset).items() if k != "eval_split"}


def dataset_card(wildcards):
    return paths.card_path(wildcards.dataset)


def table_metrics(wildcards):
    """Every metrics file a table reads: its rows x the configured seeds (a test-server row reads
    its submission zip instead; an efficiency table reads no run: see table_efficiency)."""
    try:
        paper, spec = PARAMS.checked_table(wildcards.table, SCALE)
    except SegreproError as err:
        raise WorkflowError(str(err)) from None
    if spec.get("kind") == "efficiency":
        return []
    dataset = PARAMS.table_dataset(wildcards.table, SCALE, DATASET)
    split = PARAMS.eval_split(wildcards.table, dataset, SPLIT)
    return [
        paths.submission_path(SCALE, dataset, paper, row["experiment"], seed, row["protocol"])
        if row.get("test_server")
        else paths.metrics_path(SCALE, dataset, paper, row["experiment"], seed, row["protocol"], split)
        for row in spec["rows"]
        for seed in SEEDS
    ]


def table_flops(wildcards):
    """A table that shows computation reads its models' counts."""
    if PARAMS.table(wildcards.table)[1].get("flops"):
        return {"flops": str(paths.flops_path(wildcards.table))}
    return {}


def table_efficiency(wildcards):
    """An efficiency table (SaF Tables 5, B) reads its rows' timings instead of trained runs."""
    if PARAMS.table(wildcards.table)[1].get("kind") == "efficiency":
        return {"efficiency": str(efficiency_path(wildcards.table))}
    return {}


def efficiency_models(wildcards):
    """What an efficiency table's timings depend on: the settings, and each row's model as built at
    the scale it times (configuration, comparison head, plain-ResNet stride)."""
    paper, spec = PARAMS.table(wildcards.table)
    scale = efficiency_model_scale(spec, SCALE)
    rows = {
        row["id"]: {"model": PARAMS.resolve(paper, row["experiment"], scale)["model"], "head": row.get("head"),
                    "resnet_output_stride": row.get("resnet_output_stride")}
        for row in spec["rows"]
    }
    return {"settings": spec["efficiency"], "model_scale": scale, "rows": rows}


def machine_cores():
    """The cores of a local run (--cores): an efficiency job takes them all, so that no other job
    shares the machine while it is timed. 1 where none are given (a cluster's job gets its share
    from `resources`)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def efficiency_resource(key):
    """`key` (gpus, cpus, mem_mb, runtime) of the scale's evaluation jobs: timing needs the device
    the paper's protocol runs on (a GPU at the paper scale)."""
    return PARAMS.scale(SCALE).get("resources", {}).get("eval", {}).get(key, JOB_RESOURCES[key])


def table_models(wildcards):
    """The model configurations a computation count depends on (at the scale it counts at)."""
    paper, spec = PARAMS.table(wildcards.table)
    scale = spec["flops"].get("scale", "paper")
    return {row["experiment"]: PARAMS.resolve(paper, row["experiment"], scale)["model"] for row in spec["rows"]} | {
        "flops": spec["flops"],
        "row_flops": {row["experiment"]: row["flops"] for row in spec["rows"] if "flops" in row},
    }


def table_spec(wildcards):
    """A table's declaration: editing its rows, numbers or claims rebuilds it."""
    return PARAMS.table(wildcards.table)[1]


def all_targets():
    tables = [paths.table_path(name) for name in PARAMS.table_names()]
    figures = [paths.figure_path(name) for name in PARAMS.figure_names()]
    return tables + figures + [paths.table_path("pyramid_stats")]


# What a job asks a cluster for when the scale's params/scales.yaml gives no `resources:`.
JOB_RESOURCES = {"gpus": 0, "cpus": 1, "mem_mb": 4000, "runtime": 60}


def job_resource(stage, key):
    """An input function for `resources:`: `key` (gpus, cpus, mem_mb, runtime) of the job's scale's
    `resources.<stage>` (train or eval). Locally these only count; workflow/profiles/slurm turns
    them into sbatch --gpus/--cpus-per-task/--mem/--time. A DDP run (train.processes) gets one GPU
    per process."""

    def value(wildcards):
        amount = PARAMS.scale(wildcards.scale).get("resources", {}).get(stage, {}).get(key, JOB_RESOURCES[key])
        if stage == "train" and key == "gpus" and amount:
            amount = max(amount, run_config(wildcards)["train"].get("processes", 1))
        return amount

    return value


def built_results(wildcards):
    """The tables, figures and metrics files present now: the report's inputs."""
    found = [paths.table_path(name) for name in [*PARAMS.table_names(), "pyramid_stats"]]
    found += [paths.figure_path(name) for name in PARAMS.figure_names()]
    files = [str(path) for path in found if path.exists()]
    return files + sorted(str(path) for path in (paths.RESULTS / "metrics").glob("*/*/*/*/seed*/*.json"))
