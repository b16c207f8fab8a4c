"""Loading, validating and resolving the configuration under `params/`.

`params/` holds everything a run depends on:
  config.yaml          workflow settings (scale, seeds, dataset), overridable by `--config`
  scales.yaml          the tiny / demo / paper profiles (dataset, training and test settings)
  datasets.yaml        the datasets the pipeline can prepare
  archives.yaml        the files the real datasets are made from (URL, size, pinned checksums)
  papers/<paper>.yaml  one registry per paper: model defaults, experiments, tables

A *run* is (paper, experiment, scale, dataset, seed); `Params.resolve` turns it into the fully
resolved configuration the trainer and evaluator read, and whose hash tells Snakemake when to rerun.
This module imports no torch: the workflow loads it when it builds its DAG.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from segrepro.config.families import MODULE_NAMES
from segrepro.config.schema import validate
from segrepro.core.errors import SegreproError

PARAMS_DIR = Path("params")
DEFAULT_SPLIT = "val"  # what evaluation reads unless a table or dataset names another split
SCHEMA_DIR = Path("workflow/schemas")


def read_yaml(path: Path) -> dict:
    try:
        with open(path) as handle:
            # libyaml's loader where present: every job reads all of params/, slowly in pure Python.
            data = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise SegreproError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SegreproError(f"{path}:{where} not valid YAML") from None
    if not isinstance(data, dict):
        raise SegreproError(f"{path}: expected a mapping at the top level")
    return data


def deep_merge(base: dict, override: dict | None) -> dict:
    """A copy of `base` with `override` merged in; nested mappings merge, null removes the key
    (as in JSON Merge Patch, RFC 7386: e.g. a Swin experiment drops the ResNet's timm kwargs),
    everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def natural_sorted(names) -> list[str]:
    """Names in reading order, numbers by value: hfgd_table9 before hfgd_table10, table9 before tableA."""
    def key(name: str):
        return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                for part in re.split(r"(\d+)", name) if part]

    return sorted(names, key=key)


def fill_defaults(config: dict, schema: dict) -> dict:
    filled = dict(config)
    for key, prop in schema.get("properties", {}).items():
        if key not in filled and "default" in prop:
            filled[key] = copy.deepcopy(prop["default"])
    return filled


@dataclass
class Params:
    root: Path
    workflow: dict          # params/config.yaml merged with command-line overrides
    scales: dict
    datasets: dict
    papers: dict            # paper name -> its registry
    archives: dict          # archive file name -> its download spec
    explicit_seeds: list[int] | None = None  # `--config seeds=` (or params/config.yaml); None: per scale

    # -- look-ups, each failing with one line that names what is unknown -------------------
    def paper(self, name: str) -> dict:
        if name not in self.papers:
            raise SegreproError(f"unknown paper '{name}' (known: {', '.join(sorted(self.papers))})")
        return self.papers[name]

    def experiment(self, paper: str, experiment: str) -> dict:
        experiments = self.paper(paper)["experiments"]
        if experiment not in experiments:
            raise SegreproError(
                f"unknown experiment ID '{experiment}' of paper '{paper}' "
                f"(known: {', '.join(experiments)})"
            )
        return experiments[experiment] or {}

    def setting(self, paper: str, name: str | None) -> dict:
        """A paper's named training setting (HFGD's `plain` / `advanced`); None: no setting."""
        if name is None:
            return {}
        settings = self.paper(paper).get("settings", {})
        if name not in settings:
            raise SegreproError(
                f"unknown training setting '{name}' of paper '{paper}' (known: {', '.join(settings) or 'none'})"
            )
        return settings[name]

    def scale(self, name: str) -> dict:
        if name not in self.scales:
            raise SegreproError(f"unknown scale '{name}' (known: {', '.join(self.scales)})")
        return self.scales[name]

    def seeds(self, scale: str) -> list[int]:
        """The seeds of a table's runs at `scale`: the workflow config's, else the scale's own."""
        profile = self.scale(scale)  # an unknown scale fails here, with or without given seeds
        return list(self.explicit_seeds or profile.get("seeds", [0]))

    def dataset(self, name: str) -> dict:
        if name not in self.datasets:
            raise SegreproError(
                f"unknown dataset '{name}' (known: {', '.join(self.datasets)}; see params/datasets.yaml)"
            )
        return self.datasets[name]

    def archive(self, name: str) -> dict:
        if name not in self.archives:
            raise SegreproError(f"unknown archive '{name}' (see params/archives.yaml)")
        return self.archives[name]

    def table(self, name: str) -> tuple[str, dict]:
        """(paper, spec) of a table name such as 'pspnet_table1'."""
        for paper, registry in self.papers.items():
            if name in registry["tables"]:
                return paper, registry["tables"][name]
        known = [t for registry in self.papers.values() for t in natural_sorted(registry["tables"])]
        raise SegreproError(f"unknown table '{name}' (known: {', '.join(known)})")

    def table_names(self) -> list[str]:
        return [t for registry in self.papers.values() for t in registry["tables"]]

    def figure(self, name: str) -> tuple[str, dict]:
        """(paper, spec) of a figure name such as 'saf_levels_per_class'."""
        for paper, registry in self.papers.items():
            if name in registry.get("figures", {}):
                return paper, registry["figures"][name]
        raise SegreproError(f"unknown figure '{name}' (known: {', '.join(natural_sorted(self.figure_names()))})")

    def figure_names(self) -> list[str]:
        return [f for registry in self.papers.values() for f in registry.get("figures", {})]

    def tables_using(self, paper: str, experiment: str) -> list[str]:
        return [
            name
            for name, spec in self.paper(paper)["tables"].items()
            if any(row["experiment"] == experiment for row in spec["rows"])
        ]

    # -- resolution ----------------------------------------------------------------------
    def dataset_name(self, paper: str, scale: str, override: str | None = None) -> str:
        name = override or self.paper(paper).get("scales", {}).get(scale, {}).get("dataset")
        name = name or self.scale(scale)["dataset"]
        self.dataset(name)
        return name

    def table_dataset(self, name: str, scale: str, override: str | None = None) -> str:
        """The dataset a table's runs use: the command line's, else the table's own for this scale
        (HFGD Table 17 is COCO-Stuff 10k, Table 12 Cityscapes), else its paper's."""
        paper, spec = self.table(name)
        return self.dataset_name(paper, scale, override or spec.get("dataset", {}).get(scale))

    def eval_split(self, table: str, dataset: str, override: str | None = None) -> str:
        """The split a table's rows are evaluated on when they run on `dataset`: `override` (the
        command line's, --config split=test), else the table's own `split` entry for the dataset,
        else the dataset's `eval_split`, else val."""
        _, spec = self.table(table)
        return (override or spec.get("split", {}).get(dataset)
                or self.dataset(dataset).get("eval_split") or DEFAULT_SPLIT)

    def resolve(self, paper: str, experiment: str, scale: str, dataset: str | None = None,
                seed: int = 0) -> dict:
        """The complete configuration of one run: what the trainer reads and MLflow records.
        Layers, each over the last: the scale profile, the paper's refinement of it and of its
        `datasets` entry for the run's dataset, the training setting (and its scale entry), the
        experiment, its scale entry and that entry's `datasets` entry. A paper's own `train` and
        `eval` (its recipe at every scale: PSPNet's learning-rate multipliers, augmentation and test
        protocol) come right after the scale profile."""
        registry = self.paper(paper)
        overrides = self.experiment(paper, experiment)
        scale_profile = self.scale(scale)
        setting = self.setting(paper, overrides.get("setting", registry.get("setting")))
        run = {"model": registry["model"], "train": scale_profile["train"], "eval": scale_profile["eval"]}
        name = self.dataset_name(paper, scale, dataset or overrides.get("dataset"))
        # A scale layer may hold the paper's protocol per dataset (SaF: lr and epochs of ADE20K,
        # COCO-Stuff, Pascal-Context), applied right after it; an experiment's one comes last.
        paper_scale = registry.get("scales", {}).get(scale) or {}
        experiment_scale = overrides.get("scales", {}).get(scale) or {}
        paper_wide = {key: registry[key] for key in ("train", "eval") if key in registry}
        layers = (paper_wide, paper_scale, paper_scale.get("datasets", {}).get(name),
                  setting, setting.get("scales", {}).get(scale),
                  overrides, experiment_scale, experiment_scale.get("datasets", {}).get(name))
        for layer in layers:
            run = deep_merge(run, {k: v for k, v in (layer or {}).items()
                                   if k not in ("dataset", "datasets", "scales", "setting")})
        # A schedule given as a multiple of the scale's (HFGD Tables 2, 17: 1x, 3x, 6x) stays one at every scale.
        run["train"]["iterations"] *= run["train"].get("iterations_factor", 1)
        # eval.pad is the default of every protocol that names none: each protocol then carries all
        # its test settings (what an evaluation depends on, segrepro.engine.inference.predict_probs).
        if "pad" in run["eval"]:
            pad = run["eval"].pop("pad")
            run["eval"]["protocols"] = {name: {**protocol, "pad": protocol.get("pad", pad)}
                                        for name, protocol in run["eval"]["protocols"].items()}
        return {
            "paper": paper,
            "experiment": experiment,
            "scale": scale,
            "seed": int(seed),
            "dataset": {"name": name, "root": str(Path("data") / name)},
            **run,
        }

    def checked_table(self, name: str, scale: str) -> tuple[str, dict]:
        """(paper, spec) of a table whose rows name known experiments and protocols of `scale`
        (the scale's protocols and those the paper adds, params/papers/<paper>.yaml)."""
        paper, spec = self.table(name)
        for row in spec["rows"]:
            self.experiment(paper, row["experiment"])
            resolved = self.resolve(paper, row["experiment"], scale, self.table_dataset(name, scale))
            protocols = resolved["eval"]["protocols"]
            if row["protocol"] not in protocols:
                raise SegreproError(
                    f"table '{name}': protocol '{row['protocol']}' is not defined by scale '{scale}' "
                    f"(params/scales.yaml and params/papers/{paper}.yaml eval.protocols: {', '.join(protocols)})"
                )
        return paper, spec


def load_params(root: Path | str = ".", workflow: dict | None = None) -> Params:
    """Read and validate params/. `workflow` replaces params/config.yaml (Snakemake passes its config)."""
    root = Path(root)
    params_dir = root / PARAMS_DIR
    schemas = root / SCHEMA_DIR
    workflow_schema = read_yaml(schemas / "config.schema.yaml")
    params_schema = read_yaml(schemas / "params.schema.yaml")

    if workflow is None:
        workflow = read_yaml(params_dir / "config.yaml")
    workflow = fill_defaults(_from_command_line(workflow), workflow_schema)
    validate(workflow, workflow_schema, "workflow config (params/config.yaml or --config)")

    scales = read_yaml(params_dir / "scales.yaml")
    for name, scale in scales.items():
        validate(scale, params_schema["$defs"]["scale"] | {"$defs": params_schema["$defs"]},
                 f"params/scales.yaml: {name}")
    datasets = read_yaml(params_dir / "datasets.yaml")
    for name, dataset in datasets.items():
        validate(dataset, params_schema["$defs"]["dataset"] | {"$defs": params_schema["$defs"]},
                 f"params/datasets.yaml: {name}")
    for name, scale in scales.items():
        if "lr_mult" in scale["train"]:
            raise SegreproError(
                f"params/scales.yaml: {name}.train.lr_mult: learning-rate multipliers name a model's modules; "
                "set them in params/papers/<paper>.yaml")
    archives = read_yaml(params_dir / "archives.yaml")
    for name, archive in archives.items():
        validate(archive, params_schema["$defs"]["archive"], f"params/archives.yaml: {name}")

    papers = {}
    for path in sorted((params_dir / "papers").glob("*.yaml")):
        registry = read_yaml(path)
        validate(registry, params_schema["$defs"]["paper"] | {"$defs": params_schema["$defs"]},
                 f"params/papers/{path.name}")
        _validate_models(registry, params_schema, f"params/papers/{path.name}")
        _validate_lr_mult(registry, f"params/papers/{path.name}")
        papers[path.stem] = registry

    params = Params(root=root, workflow=workflow, scales=scales, datasets=datasets, papers=papers,
                    archives=archives, explicit_seeds=workflow["seeds"])
    # What every reader of workflow["seeds"] gets: the given seeds, else the workflow scale's.
    workflow["seeds"] = params.seeds(workflow["scale"])
    if workflow.get("dataset"):
        params.dataset(workflow["dataset"])
    _check_cross_references(params)
    return params


def _validate_models(registry: dict, params_schema: dict, where: str) -> None:
    """Check every `model` section of a paper against its family's definition, so that a
    misspelt head option of an experiment fails with the experiment's name."""
    family = registry["model"]["family"]
    schema = params_schema["$defs"][f"{family}_model"] | {"$defs": params_schema["$defs"]}
    sections = [("model", registry["model"])]
    sections += [(f"experiments.{name}.model", (experiment or {}).get("model"))
                 for name, experiment in registry["experiments"].items()]
    for key, layer in _scale_layers(registry):
        sections.append((f"{key}.model", layer.get("model")))
        sections += [(f"{key}.datasets.{dataset}.model", (protocol or {}).get("model"))
                     for dataset, protocol in layer.get("datasets", {}).items()]
    for key, section in sections:
        if section is not None:
            validate(section, schema, where, prefix=key)


def _train_sections(registry: dict) -> list[tuple[str, dict]]:
    """(key, section) of every `train` section of a paper: its own, its settings', its scales',
    its experiments' and their per-scale and per-dataset ones."""
    layers = [("", registry)]
    for name, setting in registry.get("settings", {}).items():
        layers.append((f"settings.{name}.", setting))
        layers += [(f"settings.{name}.scales.{scale}.", layer) for scale, layer in setting.get("scales", {}).items()]
    layers += [(f"experiments.{name}.", experiment or {}) for name, experiment in registry["experiments"].items()]
    for key, layer in _scale_layers(registry):
        layers.append((f"{key}.", layer))
        layers += [(f"{key}.datasets.{dataset}.", protocol or {})
                   for dataset, protocol in layer.get("datasets", {}).items()]
    return [(f"{key}train", (layer or {}).get("train")) for key, layer in layers if (layer or {}).get("train")]


def _validate_lr_mult(registry: dict, where: str) -> None:
    """Every `train.lr_mult` key must name a top-level module of the paper's model family."""
    family = registry["model"]["family"]
    known = MODULE_NAMES[family]
    for key, train in _train_sections(registry):
        for module in train.get("lr_mult") or {}:
            if module not in known:
                raise SegreproError(
                    f"{where}: {key}.lr_mult: unknown module '{module}' of a {family} model "
                    f"(known: {', '.join(known)})")


def _scale_layers(registry: dict) -> list[tuple[str, dict]]:
    """(key, layer) of every per-scale layer of a paper: its own and its experiments'."""
    layers = [(f"scales.{scale}", layer) for scale, layer in registry.get("scales", {}).items()]
    layers += [(f"experiments.{name}.scales.{scale}", layer)
               for name, experiment in registry["experiments"].items()
               for scale, layer in (experiment or {}).get("scales", {}).items()]
    return layers


def _from_command_line(workflow: dict) -> dict:
    """Snakemake passes `--config seeds=[0,1]` as strings ['0', '1'] and `dataset=null` as 'null'."""
    workflow = dict(workflow)
    seeds = workflow.get("seeds")
    if isinstance(seeds, (str, int)):
        seeds = [seeds]
    if isinstance(seeds, list):
        workflow["seeds"] = [int(s) if isinstance(s, str) and s.strip().isdigit() else s for s in seeds]
    for key in ("dataset", "split"):
        if workflow.get(key) in ("null", "None", ""):
            workflow[key] = None
    return workflow


def _check_cross_references(params: Params) -> None:
    """What a schema cannot see: table rows naming experiments, claims naming rows, scale datasets."""
    from segrepro.config.table_specs import check_table_references

    for name, scale in params.scales.items():
        if scale["dataset"] not in params.datasets:
            raise SegreproError(f"params/scales.yaml: {name}.dataset: unknown dataset '{scale['dataset']}'")
    for name, dataset in params.datasets.items():
        if dataset["kind"] == "subset" and dataset["source"] not in params.datasets:
            raise SegreproError(f"params/datasets.yaml: {name}.source: unknown dataset '{dataset['source']}'")
        for role, part in dataset.get("parts", {}).items():
            if part["archive"] not in params.archives:
                raise SegreproError(
                    f"params/datasets.yaml: {name}.parts.{role}.archive: unknown archive '{part['archive']}' "
                    "(not in params/archives.yaml)")
    for name in params.workflow.get("sources", {}):
        parts = params.dataset(name).get("parts", {})
        if params.dataset(name)["kind"] != "folder" and len(parts) != 1:
            raise SegreproError(
                f"workflow config: sources.{name}: a local folder can stand only for a one-part dataset "
                f"('{name}' has {len(parts)} parts: put its archives in data/raw/ instead)")
    seen_tables: dict[str, str] = {}
    for paper, registry in params.papers.items():
        for table, spec in registry["tables"].items():
            if table in seen_tables:
                raise SegreproError(f"table '{table}' is declared by both {seen_tables[table]} and {paper}")
            seen_tables[table] = paper
            for row in spec["rows"]:
                if row["experiment"] not in registry["experiments"]:
                    raise SegreproError(
                        f"params/papers/{paper}.yaml: tables.{table}: row '{row['label']}' names "
                        f"unknown experiment ID '{row['experiment']}'"
                    )
            for dataset in spec.get("split", {}):
                if dataset not in params.datasets:
                    raise SegreproError(
                        f"params/papers/{paper}.yaml: tables.{table}.split.{dataset}: unknown dataset '{dataset}'"
                    )
            for scale, dataset in spec.get("dataset", {}).items():
                if dataset not in params.datasets:
                    raise SegreproError(
                        f"params/papers/{paper}.yaml: tables.{table}.dataset.{scale}: unknown dataset '{dataset}'"
                    )
            # The schema checked the spec's structure with the paper's file; what remains is cross-references.
            check_table_references(table, spec, f"params/papers/{paper}.yaml: tables.{table}")
        # Per-dataset protocols (`scales: {paper: {datasets: {ade20k: ...}}}`) must name known datasets.
        for key, layer in _scale_layers(registry):
            for dataset in layer.get("datasets", {}):
                if dataset not in params.datasets:
                    raise SegreproError(
                        f"params/papers/{paper}.yaml: {key}.datasets.{dataset}: unknown dataset '{dataset}' "
                        "(not in params/datasets.yaml)")
        settings = registry.get("settings", {})
        uses = [("setting", registry.get("setting"))]
        uses += [(f"experiments.{name}.setting", (experiment or {}).get("setting"))
                 for name, experiment in registry["experiments"].items()]
        for key, setting in uses:
            if setting is not None and setting not in settings:
                raise SegreproError(
                    f"params/papers/{paper}.yaml: {key}: unknown training setting '{setting}' "
                    f"(known: {', '.join(settings) or 'none'})"
                )
        for figure, spec in registry.get("figures", {}).items():
            if spec["experiment"] not in registry["experiments"]:
                raise SegreproError(
                    f"params/papers/{paper}.yaml: figures.{figure} names unknown experiment ID "
                    f"'{spec['experiment']}'"
                )
