"""params/ loading, validation and run resolution (segrepro.config), the config hash that decides
reruns (segrepro.core.provenance) and the per-stage code inputs (segrepro.pipeline.codedeps)."""

import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO, edit_yaml

from segrepro.config.params import deep_merge, load_params, read_yaml
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import config_hash, training_config
from segrepro.pipeline import codedeps


@pytest.fixture(scope="module")
def params():
    return load_params(REPO)


@pytest.fixture
def root(tmp_path):
    """A copy of params/ and workflow/schemas/ to break on purpose."""
    shutil.copytree(REPO / "params", tmp_path / "params")
    shutil.copytree(REPO / "workflow" / "schemas", tmp_path / "workflow" / "schemas")
    return tmp_path


def one_line_error(root, match, **kwargs) -> str:
    with pytest.raises(SegreproError, match=match) as info:
        load_params(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- the repo's params

def test_repository_params_are_valid(params):
    assert "pspnet" in params.papers
    assert {"tiny", "demo", "paper"} <= set(params.scales)
    assert params.workflow["scale"] in params.scales
    assert params.workflow["seeds"]


def all_runs(params):
    for paper, registry in params.papers.items():
        for experiment in registry["experiments"]:
            for scale in params.scales:
                yield paper, experiment, scale


def test_every_experiment_resolves_at_every_scale(params):
    schema = read_yaml(REPO / "workflow" / "schemas" / "params.schema.yaml")
    model_schemas = {family: jsonschema.Draft202012Validator(schema["$defs"][f"{family}_model"] | schema)
                     for family in ("pspnet", "saf", "hfgd")}
    model_keys = {"pspnet": ({"family", "backbone", "head", "aux"},
                             {"type", "bins", "pool", "reduction", "channels", "dropout"}),
                  "saf": ({"family", "backbone", "head"},
                          {"output", "strides", "context", "relabel", "tau", "train_tau", "unity_channels",
                           "semantic_channels", "key_channels", "pool_bins", "aux_weight", "dropout"}),
                  # HFGD's model has no `head`: its sections are checked by the schema below.
                  "hfgd": ({"family", "backbone", "channels", "encoder", "upsampler", "hfgm", "loss"}, set())}
    train_schema = jsonschema.Draft202012Validator(schema["$defs"]["train"] | schema)
    count = 0
    for paper, experiment, scale in all_runs(params):
        config = params.resolve(paper, experiment, scale, seed=3)
        count += 1
        assert (config["paper"], config["experiment"], config["scale"], config["seed"]) == (
            paper, experiment, scale, 3)
        assert config["dataset"]["name"] in params.datasets
        assert config["dataset"]["root"] == str(Path("data") / config["dataset"]["name"])
        # Complete: every section present, every key the trainer reads there, still schema-valid.
        for section, keys in {
            "train": ["iterations", "batch_size", "crop_size", "lr", "momentum", "weight_decay",
                      "poly_power", "scale_range", "flip", "brightness", "checkpoint_every",
                      "log_every", "num_workers"],
            "eval": ["crop_size", "protocols"],
        }.items():
            assert set(keys) <= set(config[section]), (experiment, scale, section)
        model = config["model"]
        model_sections, head_keys = model_keys[model["family"]]
        assert model_sections <= set(model) and head_keys <= set(model.get("head", {}))
        model_schemas[model["family"]].validate(model)
        train_schema.validate(config["train"])
    assert count == sum(len(r["experiments"]) for r in params.papers.values()) * len(params.scales)


def test_resolution_layers(params):
    """scale profile < paper's recipe at every scale < paper's scale refinement < experiment overrides."""
    tiny = params.resolve("pspnet", "psp269", "tiny")
    # The profile's training settings, and the paper's own recipe (lr_mult, augmentation, its 8n+1 crop).
    assert tiny["train"] == deep_merge(params.scales["tiny"]["train"], {
        "lr_mult": {"context": 10, "head": 10, "aux_head": 10}, "brightness": 0.0, "rotate": 10, "blur": 0.5,
        "crop_size": 49})
    for scale in params.scales:
        assert params.resolve("pspnet", "psp50", scale)["train"]["lr_mult"] == {
            "context": 10, "head": 10, "aux_head": 10}
        assert params.resolve("pspnet", "psp50_lr_mult1", scale)["train"]["lr_mult"] == {
            "context": 1, "head": 1, "aux_head": 1}
    assert tiny["model"]["head"]["channels"] == 16                     # paper's tiny refinement
    assert tiny["model"]["backbone"]["kwargs"] == {                    # both kwargs layers merged
        "channels": [4, 8, 16, 32], "stem_width": 4, "layers": [3, 30, 48, 8]}
    assert params.resolve("pspnet", "fcn_aux06", "demo")["model"]["aux"] == {"weight": 0.6, "channels": 32}
    assert params.resolve("pspnet", "b1_max", "tiny")["model"]["head"]["bins"] == [1]
    paper = params.resolve("pspnet", "psp50", "paper")
    assert paper["dataset"]["name"] == "ade20k" and paper["model"]["backbone"]["pretrained"] is True
    assert params.resolve("pspnet", "psp50", "tiny", dataset="synthetic")["dataset"]["name"] == "synthetic"
    # Resolution copies: changing one run's config leaves the registry alone.
    tiny["model"]["head"]["bins"].append(12)
    assert params.paper("pspnet")["model"]["head"]["bins"] == [1, 2, 3, 6]


def test_experiment_overrides_win_over_the_papers_scale_refinement(root):
    edit_yaml(root / "params" / "papers" / "pspnet.yaml", {"experiments": {
        "fcn": {"dataset": "synthetic", "model": {"head": {"channels": 7}}, "train": {"lr": 0.5}},
    }})
    params = load_params(root)
    fcn = params.resolve("pspnet", "fcn", "tiny")
    assert fcn["model"]["head"]["channels"] == 7          # the tiny refinement says 16
    assert fcn["model"]["head"]["type"] == "fcn"
    assert fcn["train"]["lr"] == 0.5 and fcn["train"]["iterations"] == 6
    assert fcn["dataset"]["name"] == "synthetic"            # the experiment's dataset
    assert params.resolve("pspnet", "fcn", "tiny", dataset="synthetic-tiny")["dataset"]["name"] == (
        "synthetic-tiny")                                   # an explicit dataset wins
    assert params.resolve("pspnet", "psp50", "tiny")["model"]["head"]["channels"] == 16


def test_no_run_asks_for_pretrained_weights_of_a_custom_backbone(params):
    """A backbone with custom layers/channels has no ImageNet weights: such a run cannot start
    (segrepro.models.common.backbone refuses it), so no scale may resolve to one."""
    bad = []
    for paper, experiment, scale in all_runs(params):
        backbone = params.resolve(paper, experiment, scale)["model"]["backbone"]
        custom = {"layers", "channels"} & set(backbone.get("kwargs") or {})
        if backbone["pretrained"] is True and custom:
            bad.append(f"{paper}/{experiment}@{scale}")
    assert not bad, f"pretrained: true with custom layers/channels: {bad}"


def test_every_table_row_names_an_existing_experiment_and_protocol(params):
    assert params.table_names()
    for name in params.table_names():
        paper, spec = params.table(name)
        for row in spec["rows"]:
            assert row["experiment"] in params.paper(paper)["experiments"], (name, row)
            assert name in params.tables_using(paper, row["experiment"])
        for scale in params.scales:
            assert params.checked_table(name, scale) == (paper, spec)


def test_test_protocol_of_every_table_row(params):
    """PSPNet: "single scale" includes the mirrored pass and every window is the crop (semseg
    tool/test.py); HFGD: no flip in SS, the image padded once before the scales (iSeg); SaF: as
    the scale profile (no pad key: at its own size)."""
    expected = {"pspnet": {"ss": (True, "each_scale"), "ms": (True, "each_scale")},
                "hfgd": {"ss": (False, "before_scaling"), "ms": (True, "before_scaling")},
                "saf": {"ss": (False, None), "ms": (True, None)}}
    for scale in params.scales:
        for name in params.table_names():
            paper, spec = params.table(name)
            for row in spec["rows"]:
                if row["protocol"] not in expected[paper]:
                    continue
                config = params.resolve(paper, row["experiment"], scale, params.table_dataset(name, scale))
                protocol = config["eval"]["protocols"][row["protocol"]]
                assert (protocol["flip"], protocol.get("pad")) == expected[paper][row["protocol"]], (scale, name, row)
    psp = params.resolve("pspnet", "psp50", "demo")["eval"]
    assert "pad" not in psp  # folded into each protocol
    assert psp["protocols"]["ss_noflip"] == {"scales": [1.0], "flip": False, "pad": "each_scale"}
    assert psp["protocols"]["ss_nopad"] == {"scales": [1.0], "flip": True, "pad": "none"}
    assert params.resolve("hfgd", "fcn_aspp", "paper")["eval"]["protocols"]["ss_nopad"]["pad"] == "none"


def test_a_papers_protocols_count_for_its_tables(root):
    """checked_table looks at the protocols a paper adds, not only the scale profile's."""
    params = load_params(root)
    params.checked_table("pspnet_open_defaults", "demo")
    edit_yaml(root / "params" / "papers" / "pspnet.yaml", {"eval": {"protocols": {"ss_noflip": None}}})
    with pytest.raises(SegreproError, match="protocol 'ss_noflip'.*pspnet.yaml"):
        load_params(root).checked_table("pspnet_open_defaults", "demo")


def test_tables_using(params):
    assert params.tables_using("pspnet", "psp50") == ["pspnet_table1", "pspnet_table3", "pspnet_open_defaults"]
    assert params.tables_using("pspnet", "fcn") == ["pspnet_table1", "pspnet_table2"]
    assert params.tables_using("pspnet", "fcn_aux03") == ["pspnet_table2"]


# ----------------------------------------------------------------------------- one-line errors

def test_unknown_key_in_scales(root):
    edit_yaml(root / "params" / "scales.yaml", {"tiny": {"train": {"iteratoins": 10}}})
    message = one_line_error(root, "iteratoins")
    assert "scales.yaml" in message and "tiny" in message


def test_wrong_type_in_scales(root):
    edit_yaml(root / "params" / "scales.yaml", {"demo": {"train": {"iterations": "many"}}})
    message = one_line_error(root, "iterations")
    assert "scales.yaml" in message and "demo" in message and "many" in message


def test_unknown_key_in_a_paper_experiment(root):
    edit_yaml(root / "params" / "papers" / "pspnet.yaml",
              {"experiments": {"fcn": {"model": {"head": {"bisn": [1]}}}}})
    message = one_line_error(root, "bisn")
    assert "pspnet.yaml" in message and "experiments.fcn.model.head" in message


def test_bad_enum_in_a_paper(root):
    edit_yaml(root / "params" / "papers" / "pspnet.yaml", {"model": {"head": {"pool": "median"}}})
    one_line_error(root, "model.head.pool.*median")


@pytest.mark.parametrize("override, culprit", [
    ({"experiments": {"G": {"model": {"head": {"contxt": "anl"}}}}}, "experiments.G.model.head.*contxt"),
    ({"experiments": {"D": {"model": {"head": {"relabel": "oracle"}}}}}, "experiments.D.model.head.relabel.*oracle"),
    ({"scales": {"demo": {"model": {"backbone": {"kind": "vit"}}}}}, "scales.demo.model.backbone.kind.*vit"),
    # A PSPNet option under the SaF family is a wrong key too.
    ({"model": {"aux": {"weight": 0.4}}}, "model.*aux"),
])
def test_saf_model_keys_are_checked_against_their_family(root, override, culprit):
    edit_yaml(root / "params" / "papers" / "saf.yaml", override)
    assert "saf.yaml" in one_line_error(root, culprit)


@pytest.mark.parametrize("paper, override, culprit", [
    ("pspnet", {"train": {"lr_mult": {"ppm": 10}}},
     r"pspnet.yaml: train.lr_mult: unknown module 'ppm' of a pspnet model"
     r" \(known: backbone, context, head, aux_head\)"),
    ("pspnet", {"experiments": {"psp50": {"scales": {"demo": {"train": {"lr_mult": {"classifier": 10}}}}}}},
     "experiments.psp50.scales.demo.train.lr_mult: unknown module 'classifier'"),
    ("hfgd", {"settings": {"plain": {"train": {"lr_mult": {"head": 10}}}}},
     "settings.plain.train.lr_mult: unknown module 'head' of a hfgd"),
    ("saf", {"scales": {"paper": {"datasets": {"cocostuff10k": {"train": {"lr_mult": {"context": 10}}}}}}},
     "scales.paper.datasets.cocostuff10k.train.lr_mult: unknown module 'context' of a saf"),
    ("pspnet", {"train": {"lr_mult": {"head": 0}}}, "train.lr_mult.head: 0"),             # the schema: > 0
    ("hfgd", {"settings": {"plain": {"train": {"decay": "norms"}}}}, "decay: 'norms'"),
    ("hfgd", {"model": {"loss": {"ce_normalization": "batch"}}}, "ce_normalization: 'batch'"),
])
def test_lr_mult_decay_and_ce_options_are_checked(root, paper, override, culprit):
    edit_yaml(root / "params" / "papers" / f"{paper}.yaml", override)
    assert f"{paper}.yaml" in one_line_error(root, culprit)


def test_lr_mult_belongs_to_a_papers_file(root):
    edit_yaml(root / "params" / "scales.yaml", {"demo": {"train": {"lr_mult": {"head": 10}}}})
    one_line_error(root, "scales.yaml: demo.train.lr_mult: .*params/papers/")


def test_module_names_are_the_families_top_level_modules(params):
    """What `train.lr_mult` may name is what the models have: every model of every experiment
    (tiny scale) has only listed top-level modules, and each listed one occurs in some model."""
    from segrepro.config.families import MODULE_NAMES
    from segrepro.models.factory import build_model

    for paper, registry in params.papers.items():
        family = registry["model"]["family"]
        seen = set()
        for experiment in registry["experiments"]:
            model = build_model(params.resolve(paper, experiment, "tiny")["model"], 5, 255)
            children = {name for name, _ in model.named_children()}
            assert children <= set(MODULE_NAMES[family]), (paper, experiment, children)
            assert model.module_names == MODULE_NAMES[family]
            seen |= children
        assert seen == set(MODULE_NAMES[family]), (paper, seen)


def test_subset_of_an_unknown_dataset(root):
    edit_yaml(root / "params" / "datasets.yaml", {"ade20k-ablation": {"source": "ade21k"}})
    one_line_error(root, "ade20k-ablation.source.*unknown dataset 'ade21k'")


def test_table_row_with_unknown_experiment(root):
    path = root / "params" / "papers" / "pspnet.yaml"
    registry = yaml.safe_load(path.read_text())
    registry["tables"]["pspnet_table2"]["rows"][1]["experiment"] = "fcn_aux07"
    path.write_text(yaml.safe_dump(registry))
    message = one_line_error(root, "fcn_aux07")
    assert "pspnet_table2" in message


def test_scale_with_unknown_dataset(root):
    edit_yaml(root / "params" / "scales.yaml", {"demo": {"dataset": "mapillary"}})
    message = one_line_error(root, "mapillary")
    assert "scales.yaml" in message and "demo" in message


def test_invalid_yaml_names_file_and_line(root):
    (root / "params" / "datasets.yaml").write_text("a: 1\nb: [unclosed\n")
    one_line_error(root, r"datasets.yaml.*line \d+")


def test_unknown_workflow_key():
    message = one_line_error(REPO, "sclae", workflow={"scale": "tiny", "seeds": [0], "sclae": 1})
    assert "workflow config" in message


@pytest.mark.parametrize("workflow, match", [
    ({"scale": "huge", "seeds": [0]}, "unknown scale 'huge'"),
    ({"scale": "tiny", "seeds": [0], "dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"scale": "tiny", "seeds": []}, "seeds"),
    ({"scale": "tiny", "seeds": [0, 0]}, "seeds"),
    ({"scale": "tiny", "seeds": [-1]}, "seeds"),
])
def test_bad_workflow_values(workflow, match):
    one_line_error(REPO, match, workflow=workflow)


def test_workflow_defaults_are_filled():
    params = load_params(REPO, workflow={"scale": "tiny"})
    assert params.workflow == {"scale": "tiny", "seeds": [0], "dataset": None, "split": None, "sources": {},
                               "mlflow_uri": None}


def test_seeds_default_per_scale_unless_given():
    """The demo scale trains three seeds, tiny (the tests) and paper one; `--config seeds=` wins."""
    params = load_params(REPO, workflow={"scale": "demo"})
    assert params.workflow["seeds"] == [0, 1, 2]
    assert (params.seeds("tiny"), params.seeds("paper")) == ([0], [0])
    given = load_params(REPO, workflow={"scale": "demo", "seeds": ["4"]})  # as Snakemake passes it
    assert given.workflow["seeds"] == [4] and given.seeds("tiny") == [4]


def test_tables_are_named_in_numeric_order():
    from segrepro.config.params import natural_sorted

    assert natural_sorted(["hfgd_table10", "hfgd_table9", "tableB", "table10", "table9", "tableA"]) == [
        "hfgd_table9", "hfgd_table10", "table9", "table10", "tableA", "tableB"]
    with pytest.raises(SegreproError, match="unknown table") as info:
        load_params(REPO, workflow={"scale": "tiny"}).table("nope")
    message = str(info.value)
    assert message.index("hfgd_table9,") < message.index("hfgd_table10,") < message.index("hfgd_table11,")


@pytest.mark.parametrize("call, culprit", [
    (lambda p: p.resolve("pspnet", "psp51", "tiny"), "psp51"),
    (lambda p: p.experiment("pspnet", "psp51"), "psp51"),
    (lambda p: p.resolve("deeplab", "psp50", "tiny"), "deeplab"),
    (lambda p: p.resolve("pspnet", "psp50", "huge"), "huge"),
    (lambda p: p.resolve("pspnet", "psp50", "tiny", dataset="imagenet"), "imagenet"),
    (lambda p: p.table("pspnet_table9"), "pspnet_table9"),
    (lambda p: p.checked_table("pspnet_table9", "tiny"), "pspnet_table9"),
    (lambda p: p.dataset("imagenet"), "imagenet"),
])
def test_lookup_errors_name_the_culprit(params, call, culprit):
    with pytest.raises(SegreproError) as info:
        call(params)
    message = str(info.value)
    assert f"'{culprit}'" in message and "\n" not in message
    assert "known:" in message  # and says what would have been accepted


def test_table_protocol_missing_from_scale(root):
    scales = yaml.safe_load((root / "params" / "scales.yaml").read_text())
    del scales["tiny"]["eval"]["protocols"]["ms"]
    (root / "params" / "scales.yaml").write_text(yaml.safe_dump(scales))
    params = load_params(root)
    params.checked_table("pspnet_table1", "tiny")  # ss only: fine
    with pytest.raises(SegreproError, match="protocol 'ms'.*scale 'tiny'"):
        params.checked_table("pspnet_table3", "tiny")


# ----------------------------------------------------------------------------- deep_merge

def test_deep_merge_semantics():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}
    override = {"a": {"c": [3], "d": {"x": 2}}, "f": {"new": 1}, "g": 5, "i": None}
    merged = deep_merge(base, override)
    assert merged == {"a": {"b": 1, "c": [3], "d": {"e": 1, "x": 2}}, "f": {"new": 1}, "g": 5}
    # null removes a key at any depth (JSON Merge Patch), and removing an absent key is no error.
    assert deep_merge(base, {"a": {"d": None}, "f": None}) == {"a": {"b": 1, "c": [1, 2]}, "g": {"h": 1}}
    # Neither input is changed, and the result shares nothing mutable with them.
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": {"h": 1}}
    merged["a"]["d"]["e"] = 99
    merged["f"]["new"] = 99
    assert base["a"]["d"]["e"] == 1 and override["f"]["new"] == 1
    assert deep_merge(base, None) == base and deep_merge(base, None) is not base
    assert deep_merge(base, {}) == base
    # An empty mapping merges (changes nothing); it does not wipe the section.
    assert deep_merge(base, {"a": {}})["a"] == base["a"]


# ----------------------------------------------------------------------------- config hash

def test_training_config_and_hash(params):
    config = params.resolve("pspnet", "psp50", "tiny")
    digest = config_hash(training_config(config))
    assert "eval" not in training_config(config) and "train" in training_config(config)
    assert len(digest) == 16 and int(digest, 16) >= 0

    eval_changed = deep_merge(config, {"eval": {"crop_size": 96, "protocols": {"ms": {"flip": False}}}})
    assert config_hash(training_config(eval_changed)) == digest
    for change in ({"train": {"lr": 0.02}}, {"train": {"iterations": 7}}, {"seed": 1},
                   {"model": {"head": {"pool": "max"}}}, {"dataset": {"name": "synthetic"}}):
        assert config_hash(training_config(deep_merge(config, change))) != digest, change

    # Key order does not matter, values do.
    reordered = dict(reversed(list(config.items())))
    assert config_hash(training_config(reordered)) == digest
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2, "b": 1})


def test_experiments_have_distinct_training_hashes(params):
    for scale in params.scales:
        digests = {}
        for experiment in params.paper("pspnet")["experiments"]:
            digest = config_hash(training_config(params.resolve("pspnet", experiment, scale)))
            assert digest not in digests, (scale, experiment, digests.get(digest))
            digests[digest] = experiment


# ----------------------------------------------------------------------------- code inputs

def stage(name, family=None, data=None):
    src = REPO / "src"
    return {str(Path(p).relative_to(src))
            for p in codedeps.stage_sources(name, family, source_root=str(src), data=data)}


def test_stage_sources_of_one_model_family():
    """A run depends on its own family's model code only."""
    pspnet_train, saf_train = stage("train", "pspnet"), stage("train", "saf")
    assert "segrepro/models/pspnet/pspnet.py" in pspnet_train and "segrepro/models/pspnet/pspnet.py" not in saf_train
    assert not {"segrepro/models/saf/specialize_fuse.py", "segrepro/models/saf/pyramid.py"} & pspnet_train
    assert {"segrepro/models/saf/specialize_fuse.py", "segrepro/models/common/hrnet.py",
            "segrepro/models/saf/pyramid.py", "segrepro/models/saf/features.py",
            "segrepro/models/common/losses.py"} <= saf_train
    assert not any(p.startswith(("segrepro/models/pspnet/", "segrepro/models/hfgd/")) for p in saf_train)
    assert "segrepro/engine/saf_analysis.py" in stage("evaluate", "saf")
    assert "segrepro/engine/saf_analysis.py" not in stage("evaluate", "pspnet")
    # Without a family, a stage depends on every family's code.
    assert pspnet_train | saf_train <= stage("train")


def test_stage_sources():
    table, train, evaluate, prepare = stage("table"), stage("train"), stage("evaluate"), stage("prepare")
    assert "segrepro/reporting/tables.py" in table
    assert "segrepro/engine/train.py" not in table and not any("models" in p for p in table)
    assert {"segrepro/engine/train.py", "segrepro/models/pspnet/pspnet.py", "segrepro/models/common/backbone.py",
            "segrepro/models/factory.py", "segrepro/data/dataset.py", "segrepro/__init__.py"} <= train
    assert "segrepro/engine/inference.py" not in train and "segrepro/engine/evaluate.py" not in train
    assert {"segrepro/engine/evaluate.py", "segrepro/engine/inference.py", "segrepro/engine/metrics.py",
            "segrepro/core/per_image.py", "segrepro/engine/checkpoint.py",
            "segrepro/models/pspnet/pspnet.py"} <= evaluate
    # An evaluation reads the trained model through engine.checkpoint: editing the trainer reruns none.
    assert "segrepro/engine/train.py" not in evaluate and "segrepro/engine/checkpoint.py" in train
    assert "segrepro/data/synthetic.py" in prepare and "segrepro/engine/train.py" not in prepare
    for files in (table, train, evaluate, prepare):
        assert all((REPO / "src" / f).is_file() for f in files)
    train_sources = codedeps.stage_sources("train", source_root=str(REPO / "src"))
    assert train_sources == sorted(train_sources)


def test_the_synthetic_generator_is_code_of_synthetic_data_only():
    """Preparing a real dataset does not run the generator, and no stage on a real dataset depends
    on it: editing it reruns nothing there. Synthetic data, the other way round, is not made by
    the converters of real archives."""
    real_data = {"segrepro/data/convert.py", "segrepro/data/download.py", "segrepro/data/extract.py",
                 "segrepro/data/folder.py", "segrepro/data/items.py"}
    assert {"segrepro/data/synthetic.py", *real_data} <= stage("prepare")
    assert "segrepro/data/synthetic.py" not in stage("prepare", data="real")
    assert {"segrepro/data/prepare.py", "segrepro/data/layout.py", *real_data} <= stage("prepare", data="real")
    assert "segrepro/data/synthetic.py" in stage("prepare", data="synthetic")
    assert not real_data & stage("prepare", data="synthetic")
    assert "segrepro/data/synthetic.py" not in stage("pyramid_stats", data="real")
    # The dataset reader does not bring the generator along (segrepro.data re-exports nothing).
    for name in ("train", "evaluate", "submit", "pyramids", "figure", "flops", "efficiency", "table", "report"):
        assert "segrepro/data/synthetic.py" not in stage(name), name


def test_reporting_and_bookkeeping_are_no_code_of_a_model_or_its_scores():
    """Editing a report module reruns no training or evaluation, and the bookkeeping (MLflow
    tracking, the training log, the planner) reruns nothing but the report that shows it."""
    for name in ("prepare", "train", "evaluate", "submit", "pyramids", "flops", "efficiency"):
        files = stage(name)
        assert not any(p.startswith("segrepro/reporting/") for p in files), name
        assert not any(p.startswith("segrepro/pipeline/") for p in files), name
    for name in ("table", "figure", "pyramid_stats"):
        assert not any(p.startswith("segrepro/pipeline/") for p in stage(name)), name
    assert {"segrepro/pipeline/tracking.py", "segrepro/pipeline/train_log.py", "segrepro/reporting/report.py",
            "segrepro/reporting/tables.py"} <= stage("report")


def test_every_stage_enters_through_its_cli_command():
    for name in codedeps.STAGES:
        entries = codedeps.entry_modules(name, str(REPO / "src"))
        assert entries and all(m.startswith("segrepro.") for m in entries), name
    assert "segrepro.engine.train" in codedeps.entry_modules("train", str(REPO / "src"))
    assert {"segrepro.engine.pyramid_store", "segrepro.reporting.pyramid_stats"} <= set(
        codedeps.entry_modules("pyramid_stats", str(REPO / "src")))
    assert "segrepro.measure.efficiency_probe" in codedeps.entry_modules("efficiency", str(REPO / "src"))


def test_stage_sources_follow_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "segrepro"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from segrepro import unused\n\n\ndef cmd_table(params, args):\n"
                                "    from segrepro.tables import write\n")
    (pkg / "tables.py").write_text("def write():\n    from .sub import helper\n")
    (pkg / "sub" / "helper.py").write_text("from segrepro import leaf\n")
    (pkg / "leaf.py").write_text("import os\n")
    (pkg / "unused.py").write_text("")
    found = {Path(p).relative_to(tmp_path).as_posix()
             for p in codedeps.stage_sources("table", source_root=str(tmp_path))}
    assert found == {"segrepro/__init__.py", "segrepro/tables.py", "segrepro/sub/__init__.py",
                     "segrepro/sub/helper.py", "segrepro/leaf.py"}


# ----------------------------------------------------------------------------- training settings

def test_a_named_setting_sits_between_the_scale_and_the_experiment(params):
    plain = params.resolve("hfgd", "usfpn_cae_hfgm", "paper")["train"]
    # The plain setting's decay: the authors' Keras l2(1e-4) on kernels = SGD weight decay 2e-4 on kernels.
    assert (plain["optimizer"], plain["lr"], plain["weight_decay"], plain["decay"], plain["iterations"]) == (
        "sgd", 0.01, 2e-4, "kernels", 30000)
    assert params.resolve("hfgd", "usfpn_cae_hfgm", "demo")["train"]["weight_decay"] == 2e-4  # every scale
    advanced = params.resolve("hfgd", "swin_usfpn_cae_hfgm", "paper")["train"]
    assert (advanced["optimizer"], advanced["lr"], advanced["weight_decay"], advanced["decay"]) == (
        "adamw", 4e-5, 0.05, "kernels")
    assert advanced["photometric"] and advanced["iterations"] == 40000
    # Per-scale values of the setting apply at that scale only.
    assert params.resolve("hfgd", "swin_usfpn_cae_hfgm", "demo")["train"]["lr"] == 1e-3
    # Papers without settings are untouched.
    assert "optimizer" not in params.resolve("pspnet", "psp50", "demo")["train"]


def test_iterations_factor_multiplies_the_scale_schedule(params):
    for scale, base in (("tiny", 6), ("demo", 400), ("paper", 30000)):
        assert params.resolve("hfgd", "fcn_scratch_6x", scale)["train"]["iterations"] == 6 * base
        assert params.resolve("hfgd", "fcn_scratch", scale)["train"]["iterations"] == base


def test_null_drops_inherited_backbone_kwargs(params):
    swin = params.resolve("hfgd", "swin_usfpn_cae_hfgm", "demo")["model"]["backbone"]
    assert "channels" not in swin["kwargs"] and swin["kwargs"]["embed_dim"] == 32


def test_a_table_may_run_on_its_own_dataset(params):
    assert params.table_dataset("hfgd_table17", "paper") == "cocostuff10k"
    assert params.table_dataset("hfgd_table17", "demo") == "synthetic"
    assert params.table_dataset("hfgd_table2", "paper") == "pascal_context"
    # The command line's dataset wins over the table's own.
    assert params.table_dataset("hfgd_table17", "paper", "synthetic-tiny") == "synthetic-tiny"


@pytest.mark.parametrize("override, culprit", [
    ({"experiments": {"fcn_aspp": {"setting": "fancy"}}},
     "experiments.fcn_aspp.setting: unknown training setting 'fancy'"),
    ({"setting": "fancy"}, "hfgd.yaml: setting: unknown training setting 'fancy'"),
    ({"tables": {"hfgd_table17": {"dataset": {"paper": "nowhere"}}}},
     "tables.hfgd_table17.dataset.paper: unknown dataset 'nowhere'"),
])
def test_bad_settings_and_table_datasets_are_named(root, override, culprit):
    edit_yaml(root / "params" / "papers" / "hfgd.yaml", override)
    one_line_error(root, re.escape(culprit))


# ----------------------------------------------------------------------------- per-dataset protocols

def test_a_datasets_protocol_sits_right_after_its_scale_layer(root):
    """registry.scales[s] < registry.scales[s].datasets[d] < setting < setting.scales[s] < experiment
    < experiment.scales[s] < experiment.scales[s].datasets[d], d being the run's dataset."""
    edit_yaml(root / "params" / "papers" / "hfgd.yaml", {
        "scales": {"paper": {"datasets": {"cocostuff10k": {
            "train": {"crop_size": 321, "lr": 0.5, "batch_size": 3}, "eval": {"crop_size": [321, 641]},
            "model": {"channels": 64}}}}},
        "experiments": {"fcn_aspp": {"train": {"batch_size": 5}, "scales": {"paper": {"datasets": {
            "cocostuff10k": {"model": {"encoder": {"hidden": 7}}, "train": {"batch_size": 9}}}}}}},
    })
    params = load_params(root)
    run = params.resolve("hfgd", "fcn_aspp", "paper", "cocostuff10k")
    assert run["train"]["crop_size"] == 321 and run["eval"]["crop_size"] == [321, 641]  # over the scale layer
    assert run["train"]["lr"] == 0.01                      # the setting's paper lr comes after
    assert run["model"]["channels"] == 64
    assert run["train"]["batch_size"] == 9 and run["model"]["encoder"]["hidden"] == 7  # the experiment's, last
    # Another dataset, or the same dataset at another scale, does not see the layer.
    other = params.resolve("hfgd", "fcn_aspp", "paper", "pascal_context")
    assert (other["train"]["crop_size"], other["train"]["batch_size"],
            other["model"]["encoder"]["hidden"]) == (513, 5, 512)
    assert params.resolve("hfgd", "fcn_aspp", "demo", "cocostuff10k")["train"]["crop_size"] == 96
    # The layer follows the run's dataset however it is chosen: a table's, the command line's.
    assert params.resolve("hfgd", "fcn_identity", "paper", params.table_dataset("hfgd_table17", "paper"))[
        "train"]["crop_size"] == 321


def test_every_declared_dataset_protocol_resolves(params):
    schema = read_yaml(REPO / "workflow" / "schemas" / "params.schema.yaml")
    train_schema = jsonschema.Draft202012Validator(schema["$defs"]["train"] | schema)
    eval_schema = jsonschema.Draft202012Validator(schema["$defs"]["eval"] | schema)
    seen = 0
    for paper, experiment, scale in all_runs(params):
        registry = params.paper(paper)
        layers = [registry.get("scales", {}).get(scale) or {},
                  (registry["experiments"][experiment] or {}).get("scales", {}).get(scale) or {}]
        for dataset in {name for layer in layers for name in layer.get("datasets", {})}:
            config = params.resolve(paper, experiment, scale, dataset)
            assert config["dataset"]["name"] == dataset
            train_schema.validate(config["train"])
            eval_schema.validate(config["eval"])
            seen += 1
    assert seen > 0


@pytest.mark.parametrize("paper, override, culprit", [
    ("saf", {"scales": {"paper": {"datasets": {"ade21k": {"train": {"lr": 0.1}}}}}},
     "saf.yaml: scales.paper.datasets.ade21k: unknown dataset 'ade21k'"),
    ("hfgd", {"experiments": {"fcn_aspp": {"scales": {"paper": {"datasets": {"citiscapes": {}}}}}}},
     "hfgd.yaml: experiments.fcn_aspp.scales.paper.datasets.citiscapes: unknown dataset 'citiscapes'"),
    ("saf", {"scales": {"paper": {"datasets": {"ade20k": {"model": {"head": {"contxt": "anl"}}}}}}},
     "scales.paper.datasets.ade20k.model.head"),
    ("hfgd", {"experiments": {"fcn_aspp": {"scales": {"paper": {"datasets": {"cityscapes": {
        "model": {"encoder": {"type": "psp"}}}}}}}}},
     "experiments.fcn_aspp.scales.paper.datasets.cityscapes.model.encoder.type"),
    # A dataset's protocol cannot pick another dataset, nor hold unknown sections.
    ("saf", {"scales": {"paper": {"datasets": {"ade20k": {"dataset": "cocostuff10k"}}}}}, "datasets.ade20k"),
    ("saf", {"scales": {"paper": {"datasets": {"ade20k": {"trian": {"lr": 0.1}}}}}}, "trian"),
    ("saf", {"scales": {"paper": {"datasets": {"ade20k": {"eval": {"crop_size": [1, 2, 3]}}}}}}, "crop_size"),
])
def test_bad_dataset_protocols_are_named(root, paper, override, culprit):
    edit_yaml(root / "params" / "papers" / f"{paper}.yaml", override)
    one_line_error(root, re.escape(culprit))
