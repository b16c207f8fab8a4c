# Shared by every rule: the validated params/, the chosen scale/dataset/seeds, and input functions.
from segrepro import paths
from segrepro.codedeps import stage_sources
from segrepro.config import load_params
from segrepro.errors import SegreproError
from segrepro.provenance import config_hash, training_config

try:
    PARAMS = load_params(workflow=config)
except SegreproError as err:
    raise WorkflowError(str(err)) from None

SCALE = PARAMS.workflow["scale"]
SEEDS = PARAMS.workflow["seeds"]
DATASET = PARAMS.workflow["dataset"]  # None: each paper's default for the scale

ID = r"[A-Za-z0-9_]+"


wildcard_constraints:
    scale=ID,
    paper=ID,
    experiment=ID,
    table=ID,
    dataset=r"[A-Za-z0-9_.-]+",
    seed=r"\d+",
    protocol=r"[a-z][a-z0-9_]*",


onstart:
    shell("segrepro tracking-init")


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


def dataset_declaration(wildcards):
    return PARAMS.dataset(wildcards.dataset)


def dataset_card(wildcards):
    return paths.dataset_root(wildcards.dataset) / "dataset.yaml"


def table_metrics(wildcards):
    """Every metrics file a table reads: its rows x the configured seeds."""
    try:
        paper, spec = PARAMS.checked_table(wildcards.table, SCALE)
    except SegreproError as err:
        raise WorkflowError(str(err)) from None
    dataset = PARAMS.dataset_name(paper, SCALE, DATASET)
    return [
        paths.metrics_path(SCALE, dataset, paper, row["experiment"], seed, row["protocol"])
        for row in spec["rows"]
        for seed in SEEDS
    ]


def table_spec(wildcards):
    """A table's declaration: editing its rows, numbers or claims rebuilds it."""
    return PARAMS.table(wildcards.table)[1]


def all_tables():
    return [paths.table_path(name) for name in PARAMS.table_names()]
