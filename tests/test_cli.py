"""The `segrepro` command line: one-line errors for unknown IDs and bad dataset files, and the
`config` / `list` commands.

Look-up errors run the CLI in-process (`segrepro.cli.main`, fast); the dataset checks run it in a
subprocess, where the exit status and the real stderr (progress bars, logging) are what a user
or a Snakemake log sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, segrepro_command
from PIL import Image

from segrepro.cli import main
from segrepro.config.params import load_params
from segrepro.data.dataset import IterationBatchSampler

ERROR_PREFIX = "segrepro: error: "
RUN = ("--paper", "pspnet", "--experiment", "fcn", "--scale", "tiny", "--seed", "0")
RUN_DIR = Path("results/runs/tiny") / TINY / "pspnet/fcn/seed0"
METRICS = Path("results/metrics/tiny") / TINY / "pspnet/fcn/seed0/ss.json"


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are a CLI error message (each must start its own line)."""
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- unknown names

UNKNOWN = {
    "experiment (config)": (("config", "--paper", "pspnet", "--experiment", "nope_exp", "--scale", "tiny"),
                            "unknown experiment ID 'nope_exp'"),
    "experiment (train)": (("train", "--paper", "pspnet", "--experiment", "nope_exp", "--scale", "tiny"),
                           "unknown experiment ID 'nope_exp'"),
    "experiment (evaluate)": (("evaluate", "--paper", "pspnet", "--experiment", "nope_exp", "--scale", "tiny"),
                              "unknown experiment ID 'nope_exp'"),
    "table": (("table", "nope_table", "--scale", "tiny"), "unknown table 'nope_table'"),
    "dataset (prepare)": (("prepare", "nope_data"), "unknown dataset 'nope_data'"),
    "dataset (config)": (("config", "--paper", "pspnet", "--experiment", "fcn", "--scale", "tiny",
                          "--dataset", "nope_data"), "unknown dataset 'nope_data'"),
    "dataset (train)": (("train", "--paper", "pspnet", "--experiment", "fcn", "--scale", "tiny",
                         "--dataset", "nope_data"), "unknown dataset 'nope_data'"),
    "paper (config)": (("config", "--paper", "nope_paper", "--experiment", "fcn", "--scale", "tiny"),
                       "unknown paper 'nope_paper'"),
    "paper (train)": (("train", "--paper", "nope_paper", "--experiment", "fcn", "--scale", "tiny"),
                      "unknown paper 'nope_paper'"),
    "scale": (("config", "--paper", "pspnet", "--experiment", "fcn", "--scale", "nope_scale"),
              "unknown scale 'nope_scale'"),
    "SaF experiment ID": (("train", "--paper", "saf", "--experiment", "L", "--scale", "tiny"),
                          "unknown experiment ID 'L' of paper 'saf' (known: A, B, C, D, E, F, G, H, I, J, K,"),
    "figure": (("figure", "nope_figure", "--scale", "tiny"), "unknown figure 'nope_figure'"),
    "dataset (pyramids)": (("pyramids", "nope_data", "--scale", "tiny"), "unknown dataset 'nope_data'"),
    "dataset (pyramid-stats)": (("pyramid-stats", "nope_data"), "unknown dataset 'nope_data'"),
}


@pytest.mark.parametrize("argv, message", UNKNOWN.values(), ids=UNKNOWN.keys())
def test_unknown_name_is_one_error_line(project, capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX + message), lines[0]
    # Nothing was created for the unknown name.
    assert not (project / "results").exists() or not any((project / "results").rglob("*nope*"))
    assert not (project / "data" / "nope_data").exists()


def test_unknown_experiment_exit_status_in_a_subprocess(project, segrepro):
    result = segrepro("train", "--paper", "pspnet", "--experiment", "nope_exp", "--scale", "tiny")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(ERROR_PREFIX + "unknown experiment ID 'nope_exp' of paper 'pspnet'")
    # The message lists the known IDs, so a typo is easy to fix.
    assert "b1236_max_dr" in result.stderr


# ----------------------------------------------------------------------------- bad dataset files

def _ids(root: Path, split: str) -> list[str]:
    return [line.strip() for line in (root / "splits" / f"{split}.txt").read_text().splitlines() if line.strip()]


def first_train_id(root: Path) -> str:
    """The image the tiny fcn run (seed 0) reads first, so a defect there is hit at once."""
    settings = load_params().resolve("pspnet", "fcn", "tiny", None, 0)["train"]
    ids = _ids(root, "train")
    sampler = IterationBatchSampler(len(ids), settings["batch_size"], seed=0,
                                    iterations=settings["iterations"])
    index, _sample_seed = next(iter(sampler))[0]
    return ids[index]


def corrupt_image(root: Path, image_id: str, split: str) -> Path:
    path = root / "images" / f"{image_id}.png"
    path.write_bytes(b"this is not a PNG file\n" * 4)
    return path


def missing_image(root: Path, image_id: str, split: str) -> Path:
    path = root / "images" / f"{image_id}.png"
    path.unlink()
    return path


def label_out_of_range(root: Path, image_id: str, split: str) -> Path:
    path = root / "labels" / f"{image_id}.png"
    num_classes = yaml.safe_load((root / "dataset.yaml").read_text())["num_classes"]
    label = np.array(Image.open(path))
    assert label.ndim == 2 and num_classes != 255
    label[label.shape[0] // 2, label.shape[1] // 2] = num_classes  # one pixel, first invalid index
    Image.fromarray(label).save(path)
    return path


def size_mismatch(root: Path, image_id: str, split: str) -> Path:
    path = root / "labels" / f"{image_id}.png"
    label = np.array(Image.open(path))
    Image.fromarray(np.ascontiguousarray(label[:-8, :-8])).save(path)
    return path


def empty_split(root: Path, image_id: str, split: str) -> Path:
    path = root / "splits" / f"{split}.txt"
    path.write_text("")
    return path


DEFECTS = {
    "corrupt-image": corrupt_image,
    "missing-image": missing_image,
    "label-value": label_out_of_range,
    "size-mismatch": size_mismatch,
    "empty-split": empty_split,
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(segrepro_command(*args), capture_output=True, text=True, timeout=300,
                          check=False)


def assert_one_error_naming(code: int, stderr: str, culprit: Path, project: Path) -> None:
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, f"expected one line starting {ERROR_PREFIX!r}, stderr was:\n{stderr}"
    assert str(culprit.relative_to(project)) in lines[0], lines[0]


def assert_no_model_left(project: Path) -> None:
    assert not (project / RUN_DIR / "model.pt").exists()
    results = project / "results"
    files = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    # No model, checkpoint, metrics, table or half-written temporary file.
    looks_complete = [p for p in files if p.suffix in (".pt", ".json", ".csv", ".md", ".tmp")]
    assert looks_complete == [], looks_complete


def assert_no_metrics_left(project: Path, model: Path) -> None:
    assert not (project / METRICS).exists()
    metrics = project / "results" / "metrics"
    assert not metrics.exists() or [p for p in metrics.rglob("*") if p.is_file()] == []
    # The model is the only file of the run, untouched.
    assert (project / RUN_DIR / "model.pt").read_bytes() == model.read_bytes()


@pytest.fixture(scope="module")
def trained_fcn(tmp_path_factory, tiny_dataset) -> Path:
    """model.pt of the tiny fcn run (seed 0), trained once for the evaluate checks."""
    from conftest import REPO

    root = tmp_path_factory.mktemp("trained") / "project"
    root.mkdir()
    for name in ("params", "workflow"):
        shutil.copytree(REPO / name, root / name)
    shutil.copytree(tiny_dataset, root / "data" / TINY)
    result = subprocess.run(
        segrepro_command("train", *RUN, "--threads", "1"), cwd=root, capture_output=True,
        text=True, timeout=300, env={**os.environ, "SEGREPRO_MLFLOW": "0"}, check=False,
    )
    assert result.returncode == 0, result.stderr
    model = root / RUN_DIR / "model.pt"
    assert model.is_file()
    return model


@pytest.fixture
def evaluable(project, trained_fcn) -> Path:
    """The project with the trained tiny fcn model in place (what `evaluate` reads)."""
    (project / RUN_DIR).mkdir(parents=True)
    shutil.copy2(trained_fcn, project / RUN_DIR / "model.pt")
    return project


def middle_val_id(root: Path) -> str:
    val = _ids(root, "val")
    return val[len(val) // 2]  # not the first: the images before it must not make a result


# In-process (fast): the whole matrix of defects.
@pytest.mark.parametrize("defect", DEFECTS.values(), ids=DEFECTS.keys())
def test_train_stops_on_bad_dataset(project, capsys, defect):
    root = project / "data" / TINY
    culprit = defect(root, first_train_id(root), "train")
    code, out, err = run_main(capsys, "train", *RUN)
    assert_one_error_naming(code, err, culprit, project)
    assert "trained" not in out
    assert_no_model_left(project)


@pytest.mark.parametrize("defect", DEFECTS.values(), ids=DEFECTS.keys())
def test_evaluate_stops_on_bad_dataset(evaluable, capsys, trained_fcn, defect):
    root = evaluable / "data" / TINY
    culprit = defect(root, middle_val_id(root), "val")
    code, out, err = run_main(capsys, "evaluate", *RUN, "--protocol", "ss")
    assert_one_error_naming(code, err, culprit, evaluable)
    assert "mIoU" not in out
    assert_no_metrics_left(evaluable, trained_fcn)


# In a subprocess: the exit status and everything the process writes to stderr (progress bars,
# MLflow logging), as a Snakemake log shows it.
def test_train_bad_image_exit_status_in_a_subprocess(project):
    root = project / "data" / TINY
    culprit = corrupt_image(root, first_train_id(root), "train")
    result = run_cli("train", *RUN, "--threads", "1")
    assert_one_error_naming(result.returncode, result.stderr, culprit, project)
    assert_no_model_left(project)


def test_evaluate_bad_label_exit_status_in_a_subprocess(evaluable, trained_fcn):
    root = evaluable / "data" / TINY
    culprit = label_out_of_range(root, middle_val_id(root), "val")
    result = run_cli("evaluate", *RUN, "--protocol", "ss", "--threads", "1")
    assert_one_error_naming(result.returncode, result.stderr, culprit, evaluable)
    assert_no_metrics_left(evaluable, trained_fcn)


def test_evaluate_without_a_model_names_it(project, capsys):
    code, out, err = run_main(capsys, "evaluate", *RUN)
    assert code == 1 and out == ""
    assert err.splitlines() == [f"{ERROR_PREFIX}{RUN_DIR / 'model.pt'}: trained model not found"]
    assert not (project / METRICS).exists()


# ----------------------------------------------------------------------------- config / list

@pytest.mark.parametrize("experiment, seed", [("b1_max", None), ("psp269", "3")])
def test_config_prints_the_resolved_yaml(project, capsys, experiment, seed):
    argv = ["config", "--paper", "pspnet", "--experiment", experiment, "--scale", "tiny"]
    if seed is not None:
        argv += ["--seed", seed]
    code, out, err = run_main(capsys, *argv)
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    expected = load_params().resolve("pspnet", experiment, "tiny", None, int(seed or 0))
    assert printed == expected
    # Spot checks that the resolution itself is what params/ says (not just self-consistent).
    assert printed["seed"] == int(seed or 0)
    assert printed["dataset"] == {"name": TINY, "root": f"data/{TINY}"}
    assert printed["train"]["iterations"] == 6
    assert printed["model"]["backbone"]["kwargs"]["stem_width"] == 4  # the tiny profile
    # PSPNet's recipe: the new layers at 10x the base rate (semseg), shown with the optimizer's decay.
    assert printed["train"]["lr_mult"] == {"context": 10, "head": 10, "aux_head": 10}
    assert printed["train"]["decay"] == "all"
    if experiment == "b1_max":
        assert printed["model"]["head"]["bins"] == [1]
        assert printed["model"]["head"]["pool"] == "max"
        assert printed["model"]["head"]["reduction"] is False
    else:
        assert printed["model"]["backbone"]["kwargs"]["layers"] == [3, 30, 48, 8]
        assert printed["model"]["backbone"]["kwargs"]["channels"] == [4, 8, 16, 32]


def test_config_defaults_come_from_params_config(project, capsys):
    code, out, _ = run_main(capsys, "config", "--paper", "pspnet", "--experiment", "fcn")
    assert code == 0
    printed = yaml.safe_load(out)
    workflow = yaml.safe_load((project / "params" / "config.yaml").read_text())
    assert printed["scale"] == workflow["scale"]
    # seeds: null in params/config.yaml: the first of the scale's own seeds.
    first = (workflow["seeds"] or load_params().scales[workflow["scale"]]["seeds"])[0]
    assert printed["seed"] == first
    assert printed == load_params().resolve("pspnet", "fcn", workflow["scale"], workflow["dataset"], first)


def test_list_shows_pspnet_tables_and_experiments(project, capsys):
    code, out, err = run_main(capsys, "list")
    assert code == 0 and err == ""
    registry = yaml.safe_load((project / "params" / "papers" / "pspnet.yaml").read_text())
    lines = out.splitlines()
    start = lines.index(f"pspnet: {registry['title']}")
    experiments_line, tables_line = lines[start + 1], lines[start + 2]
    assert tables_line.split(":", 1)[1].strip().split(", ") == ["pspnet_open_defaults", "pspnet_table1",
                                                                "pspnet_table2", "pspnet_table3"]
    assert experiments_line.split(":", 1)[1].strip().split(", ") == list(registry["experiments"])

