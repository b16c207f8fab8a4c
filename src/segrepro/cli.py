"""`segrepro`: the command line every workflow rule calls, usable by hand as well.

  segrepro download ARCHIVE                    fetch and verify one archive into data/raw/
  segrepro prepare DATASET                     generate or convert a dataset into data/DATASET
  segrepro train    --paper P --experiment E   train one run (resumes from its checkpoint)
  segrepro evaluate --paper P --experiment E   evaluate it with a test protocol
  segrepro submit   --paper P --experiment E   zip its test-set predictions for a benchmark's server
  segrepro table NAME                          write results/tables/NAME.md (+ .csv)
  segrepro pyramids DATASET                    pyramidal ground truth of a split (SaF)
  segrepro pyramid-stats DATASET               results/tables/pyramid_stats.md from it
  segrepro figure NAME                         write results/figures/NAME.png
  segrepro flops NAME                          count the models of a table: results/flops/NAME.json
  segrepro efficiency NAME                     time the models of an efficiency table (SaF 5, B)
  segrepro report                              results/report.html: tables, figures, claims, runs
  segrepro claims                              every claim of the built tables, checked
  segrepro plan TARGET...                      the jobs a target needs and their estimated cost
  segrepro calibrate --paper P --experiment E  measure a run's training/inference throughput here
  segrepro config   --paper P --experiment E   print the fully resolved configuration
  segrepro list                                papers, experiments and tables
  segrepro tracking-init                       create the MLflow store and experiments
  segrepro mlflow-server [--host H] [--port P] serve that store to the jobs of a cluster

Run it in the project folder (params/ there). Scale, dataset and seeds default to
params/config.yaml. Errors print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from segrepro.config.params import Params, load_params, natural_sorted
from segrepro.core import paths
from segrepro.core.errors import SegreproError


def _run_arguments(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    parser.add_argument("--paper", required=True, help="e.g. pspnet")
    parser.add_argument("--experiment", required=True, help="an experiment ID of the paper's registry")
    parser.add_argument("--scale", help="tiny | demo | paper (default: params/config.yaml)")
    parser.add_argument("--dataset", help="a dataset of params/datasets.yaml (default: the scale's)")
    if seed:
        parser.add_argument("--seed", type=int, default=None, help="default: the first of config seeds")


def _device_arguments(parser: argparse.ArgumentParser,
                      threads_help: str = "CPU threads for torch (default: torch's choice)") -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--threads", type=int, help=threads_help)


def _claim_devices(params: Params, args) -> None:
    """A CUDA run locks its own GPU(s) before torch initialises CUDA (see segrepro.core.devices): one,
    or one per process of a multi-process training."""
    if hasattr(args, "device"):
        from segrepro.core.devices import claim_for_run

        args.device = claim_for_run(args.device, _processes(params, args))


def _processes(params: Params, args) -> int:
    """train.processes of a training run started here (1 inside a torchrun worker, or not training)."""
    if args.command != "train" or "LOCAL_RANK" in os.environ:
        return 1
    return int(_resolve(params, args)["train"].get("processes", 1))


def _relaunch_under_torchrun(processes: int, argv: list[str]) -> None:
    """Become `torchrun --standalone --nproc_per_node N -m segrepro.cli ARGV` (DDP, segrepro.engine.distributed),
    keeping the GPUs claimed for the run; the workflow's rule stays `segrepro train`."""
    from segrepro.core.devices import pass_on

    pass_on()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={processes}", "-m", "segrepro.cli", *argv])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segrepro", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser("download", help="fetch and verify an archive of params/archives.yaml")
    download.add_argument("archive", help="e.g. ADEChallengeData2016.zip")

    prepare = commands.add_parser("prepare", help="generate or convert a dataset")
    prepare.add_argument("dataset")
    prepare.add_argument("--out", type=Path, help="default: data/DATASET")
    prepare.add_argument("--source", type=Path,
                         help="a local folder holding the extracted archive of a one-part dataset "
                              "(default: workflow config `sources`, else download)")

    train = commands.add_parser("train", help="train one run")
    _run_arguments(train)
    _device_arguments(train)
    train.add_argument("--out", type=Path, help="final model file (default: results/runs/…/model.pt)")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run")
    _run_arguments(evaluate)
    _device_arguments(evaluate)
    evaluate.add_argument("--protocol", default="ss", help="a test protocol of the scale (ss, ms, …)")
    evaluate.add_argument("--split", default="val", help="the labelled split to score (default: val)")
    evaluate.add_argument("--out", type=Path, help="metrics JSON (default: results/metrics/…/PROTOCOL.json, "
                                                   "PROTOCOL.SPLIT.json for a split other than val)")

    submit = commands.add_parser("submit", help="write a test-server submission of a trained run")
    _run_arguments(submit)
    _device_arguments(submit)
    submit.add_argument("--protocol", default="ms", help="a test protocol of the scale (default: ms)")
    submit.add_argument("--server", required=True, help="the submission format: ade20k_sceneparsing | cityscapes")
    submit.add_argument("--split", help="default: the dataset's unlabelled test split, else val as a stand-in")
    submit.add_argument("--out", type=Path, help="zip (default: results/submissions/…/seedN_PROTOCOL.zip)")

    table = commands.add_parser("table", help="build a paper table from evaluated runs")
    table.add_argument("name", help="e.g. pspnet_table1")
    table.add_argument("--scale")
    table.add_argument("--dataset")
    table.add_argument("--seeds", type=int, nargs="+")
    table.add_argument("--split", help="the split its rows report (default: the table's for its dataset, else the "
                                       "dataset's eval_split, else val)")
    table.add_argument("--out", type=Path, help="default: results/tables/NAME.md")

    pyramids = commands.add_parser("pyramids", help="precompute the pyramidal ground truth of a split")
    pyramids.add_argument("dataset")
    pyramids.add_argument("--split", default="val")
    pyramids.add_argument("--scale", help="its single-scale protocol sets the evaluation size")
    pyramids.add_argument("--out", type=Path, help="default: results/pyramids/DATASET/SPLIT")

    stats = commands.add_parser("pyramid-stats", help="unity/mix/ignore shares of the precomputed pyramids")
    stats.add_argument("dataset")
    stats.add_argument("--split", default="val")
    stats.add_argument("--out", type=Path, default=paths.pyramid_stats_path())

    figure = commands.add_parser("figure", help="draw a paper figure from an evaluated run")
    figure.add_argument("name", help="e.g. saf_levels_per_class")
    figure.add_argument("--scale")
    figure.add_argument("--dataset")
    figure.add_argument("--seed", type=int)
    figure.add_argument("--out", type=Path, help="default: results/figures/NAME.png")

    flops = commands.add_parser("flops", help="count the multiply-adds of a table's models (no training)")
    flops.add_argument("name", help="a table with a 'flops' section, e.g. hfgd_table9")
    flops.add_argument("--out", type=Path, help="default: results/flops/NAME.json")

    efficiency = commands.add_parser("efficiency", help="time a table's models: FPS, it/s, memory (no training)")
    efficiency.add_argument("name", help="a table of kind 'efficiency', e.g. table5")
    efficiency.add_argument("--scale")
    _device_arguments(efficiency)
    efficiency.add_argument("--out", type=Path, help="default: results/efficiency/NAME.json")

    report = commands.add_parser("report", help="one HTML page of every built table, figure, claim and run")
    report.add_argument("--scale")
    report.add_argument("--dataset")
    report.add_argument("--seeds", type=int, nargs="+")
    report.add_argument("--out", type=Path, default=paths.REPORT)

    claims = commands.add_parser(
        "claims", help="every claim the tables check: reproduced, contradicted, not told apart, or not yet run")
    claims.add_argument("--scale")
    claims.add_argument("--out", type=Path, help="also write this Markdown file (e.g. results/claims.md)")

    plan = commands.add_parser("plan", help="the jobs a target needs and their GPU-hours (nothing is trained)")
    plan.add_argument("targets", nargs="+", help="e.g. results/tables/table6.md or results/report.html")
    plan.add_argument("--scale")
    plan.add_argument("--dataset")
    plan.add_argument("--seeds", type=int, nargs="+")
    _device_arguments(plan, threads_help="CPU threads of the calibration (default: the jobs' own, 1)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs running jobs at once, for the wall time (default 1)")
    plan.add_argument("--recalibrate", action="store_true", help="measure again even if a calibration is stored")
    plan.add_argument("--steps", type=int, default=5, help="timed training steps of a calibration (default 5)")
    plan.add_argument("--batch", type=int, help="calibration batch per process (default: the run's; on a CPU, "
                                                "at most 2x512x512 pixels' worth, scaled linearly)")
    plan.add_argument("--json", type=Path, help="also write the plan as JSON to this file")

    calibrate = commands.add_parser("calibrate", help="measure a run's training and inference throughput (a few steps)")
    _run_arguments(calibrate, seed=False)
    _device_arguments(calibrate, threads_help="CPU threads of the calibration (default: the jobs' own, 1)")
    calibrate.add_argument("--steps", type=int, default=5, help="timed training steps after a warm-up")
    calibrate.add_argument("--batch", type=int, help="batch per process to measure at (default: the run's; on a "
                                                     "CPU, at most 2x512x512 pixels' worth, scaled linearly)")

    config = commands.add_parser("config", help="print a run's resolved configuration")
    _run_arguments(config)

    commands.add_parser("list", help="list papers, experiments and tables")
    commands.add_parser("tracking-init", help="create the MLflow store and one experiment per paper")

    server = commands.add_parser("mlflow-server", help="the MLflow UI and tracking server on the project's store "
                                 "(127.0.0.1; jobs: --config mlflow_uri=)")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, help="server processes (default: mlflow's, 4)")
    server.add_argument("--allowed-hosts",
                        help="Host headers to accept besides localhost and private IPs, e.g. head01:5000")
    return parser


def _resolve(params: Params, args) -> dict:
    scale = args.scale or params.workflow["scale"]
    seed = args.seed if args.seed is not None else params.seeds(scale)[0]
    return params.resolve(args.paper, args.experiment, scale, args.dataset or params.workflow["dataset"], seed)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_paths(config: dict):
    return (config["scale"], config["dataset"]["name"], config["paper"], config["experiment"], config["seed"])


def cmd_prepare(params: Params, args) -> None:
    from segrepro.data.prepare import prepare_dataset

    out = args.out or paths.dataset_root(args.dataset)
    source = args.source or params.workflow["sources"].get(args.dataset)
    prepare_dataset(args.dataset, params.dataset(args.dataset), out, params.archives,
                    raw_dir=paths.RAW, lock_path=paths.ARCHIVE_LOCK, source=source)
    print(f"prepared {args.dataset} in {out}")


def cmd_download(params: Params, args) -> None:
    from segrepro.data.download import fetch

    path = fetch(args.archive, params.archive(args.archive), paths.RAW, paths.ARCHIVE_LOCK)
    print(f"{path}: verified")


def cmd_train(params: Params, args) -> None:
    from segrepro.engine.train import train

    config = _resolve(params, args)
    processes = _processes(params, args)
    if processes > 1:
        _relaunch_under_torchrun(processes, args.argv)
    _set_threads(args.threads)
    out = args.out or paths.model_path(*_run_paths(config))
    summary = train(config, out, device=args.device, tables=params.tables_using(args.paper, args.experiment))
    print(f"trained {args.paper}/{args.experiment} in {summary['train_seconds']:.0f} s -> {out}")


def cmd_evaluate(params: Params, args) -> None:
    from segrepro.engine.evaluate import evaluate_run

    config = _resolve(params, args)
    _set_threads(args.threads)
    run = _run_paths(config)
    out = args.out or paths.metrics_path(*run, args.protocol, args.split)
    metrics = evaluate_run(config, paths.model_path(*run), args.protocol, out, device=args.device, split=args.split)
    print(f"{args.paper}/{args.experiment} [{args.protocol}, split {args.split}] mIoU {metrics['miou']:.2f} "
          f"pixel acc. {metrics['pixel_acc']:.2f} -> {out}")


def cmd_submit(params: Params, args) -> None:
    from segrepro.data.dataset import load_card
    from segrepro.engine.submit import default_split, server, write_submission

    server(args.server)
    config = _resolve(params, args)
    _set_threads(args.threads)
    run = _run_paths(config)
    out = args.out or paths.submission_path(*run, args.protocol)
    split = args.split or default_split(load_card(config["dataset"]["root"]))
    manifest = write_submission(config, paths.model_path(*run), split, out, args.server, args.protocol,
                                device=args.device)
    stand_in = " (a stand-in: not a test-server split)" if manifest["stand_in"] else ""
    print(f"{args.paper}/{args.experiment} [{args.protocol}] {manifest['num_images']} predictions of "
          f"{config['dataset']['name']}/{split}{stand_in} -> {out}")


def cmd_table(params: Params, args) -> None:
    from segrepro.reporting.tables import write_table

    scale = args.scale or params.workflow["scale"]
    seeds = args.seeds or params.seeds(scale)
    out = args.out or paths.table_path(args.name)
    write_table(params, args.name, scale, args.dataset or params.workflow["dataset"], seeds, out,
                      split=args.split or params.workflow["split"])
    print(f"wrote {out}")


def cmd_pyramids(params: Params, args) -> None:
    from segrepro.engine.pyramid_store import write_pyramids

    params.dataset(args.dataset)
    scale = args.scale or params.workflow["scale"]
    out = args.out or paths.pyramid_dir(args.dataset, args.split)
    write_pyramids(paths.dataset_root(args.dataset), args.split, out,
                   base_size=params.scale(scale)["eval"].get("base_size"))
    print(f"wrote the pyramidal ground truth of {args.dataset}/{args.split} to {out}")


def cmd_pyramid_stats(params: Params, args) -> None:
    from segrepro.engine.pyramid_store import pyramid_stats
    from segrepro.reporting.pyramid_stats import write_pyramid_stats

    params.dataset(args.dataset)
    write_pyramid_stats(pyramid_stats(paths.pyramid_dir(args.dataset, args.split), paths.dataset_root(args.dataset)),
                        args.out)
    print(f"wrote {args.out}")


def cmd_figure(params: Params, args) -> None:
    from segrepro.engine.figures import draw_figure

    paper, spec = params.figure(args.name)
    scale = args.scale or params.workflow["scale"]
    seed = args.seed if args.seed is not None else params.seeds(scale)[0]
    config = params.resolve(paper, spec["experiment"], scale, args.dataset or params.workflow["dataset"], seed)
    out = args.out or paths.figure_path(args.name)
    draw_figure(spec, config, out)
    print(f"wrote {out}")


def cmd_flops(params: Params, args) -> None:
    from segrepro.measure.flops import write_flops

    out = args.out or paths.flops_path(args.name)
    record = write_flops(params, args.name, out)
    for experiment, count in record["models"].items():
        print(f"{experiment}: {count['gmacs']:.2f} GMACs (backbone {count['backbone_gmacs']:.2f}), "
              f"{count['params_m']:.2f} M parameters")
    print(f"wrote {out}")


def cmd_efficiency(params: Params, args) -> None:
    """`segrepro efficiency NAME [--scale] [--device] [--threads] [--out]`."""
    from segrepro.core import atomic
    from segrepro.measure.efficiency import measure_table

    _set_threads(args.threads)
    scale = args.scale or params.workflow["scale"]
    out = args.out or paths.efficiency_path(args.name)
    record = measure_table(params, args.name, scale, args.device, args.threads)
    atomic.write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def cmd_report(params: Params, args) -> None:
    from segrepro.reporting.report import write_report

    write_report(params, args.out, scale=args.scale, dataset=args.dataset, seeds=args.seeds)
    print(f"wrote {args.out}")


def cmd_claims(params: Params, args) -> None:
    from segrepro.core.atomic import write_text
    from segrepro.reporting.claims import collect, to_markdown

    records = collect(params, args.scale)
    text = to_markdown(records)
    if args.out:
        write_text(Path(args.out), text)
    print(text, end="")


def cmd_plan(params: Params, args) -> None:
    from segrepro.core import atomic
    from segrepro.core.devices import pick_device
    from segrepro.pipeline.plan import JOB_THREADS, format_plan, make_plan

    _set_threads(args.threads or JOB_THREADS)  # timed as the jobs run
    scale = args.scale or params.workflow["scale"]
    seeds = args.seeds or params.seeds(scale)
    dataset = args.dataset or params.workflow["dataset"]
    plan = make_plan(params, list(args.targets), scale, dataset, seeds, pick_device(args.device),
                     args.gpus, recalibrate=args.recalibrate, steps=args.steps, batch=args.batch)
    print(format_plan(plan))
    if args.json:
        atomic.write_text(args.json, json.dumps(plan, indent=1) + "\n")
        print(f"wrote {args.json}")


def cmd_calibrate(params: Params, args) -> None:
    from segrepro.core.devices import device_name, pick_device
    from segrepro.measure.calibration import (
        calibrate_run,
        calibration_path,
        signature,
        store_calibrations,
    )
    from segrepro.pipeline.plan import JOB_THREADS, num_classes

    _set_threads(args.threads or JOB_THREADS)
    scale = args.scale or params.workflow["scale"]
    config = params.resolve(args.paper, args.experiment, scale, args.dataset or params.workflow["dataset"])
    classes = num_classes(params, config["dataset"]["name"])
    device = pick_device(args.device)
    label = device_name(device)
    entry = calibrate_run(config, classes, device, args.steps, args.batch)
    path = calibration_path(label)
    store_calibrations(path, label, {signature(config, classes, label): entry})
    scaled = f" ({entry['scaled']})" if entry["scaled"] else ""
    print(f"{entry['run']} at scale {scale} on {label}: {entry['step_seconds']:.4g} s per training step "
          f"of batch {entry['batch']}{scaled}, {entry['window_seconds']:.4g} s per "
          f"{entry['eval_crop'][0]}x{entry['eval_crop'][1]} inference window, peak memory "
          f"{entry['peak_memory_mb']:.0f} MB -> {path}")


def cmd_config(params: Params, args) -> None:
    yaml.safe_dump(_resolve(params, args), sys.stdout, sort_keys=False)


def cmd_list(params: Params, args) -> None:
    for paper, registry in params.papers.items():
        print(f"{paper}: {registry['title']}")
        print(f"  experiments: {', '.join(registry['experiments'])}")
        print(f"  tables: {', '.join(natural_sorted(registry['tables']))}")


def cmd_tracking_init(params: Params, args) -> None:
    from segrepro.pipeline import tracking

    tracking.init_store(list(params.papers))


def cmd_mlflow_server(params: Params, args) -> None:
    from segrepro.pipeline import tracking

    options = (["--workers", str(args.workers)] if args.workers else []) + (
        ["--allowed-hosts", args.allowed_hosts] if args.allowed_hosts else [])
    tracking.serve(args.host, args.port, options)


COMMANDS = {
    "download": cmd_download, "prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate,
    "submit": cmd_submit, "table": cmd_table,
    "pyramids": cmd_pyramids, "pyramid-stats": cmd_pyramid_stats, "figure": cmd_figure,
    "flops": cmd_flops, "config": cmd_config, "list": cmd_list, "tracking-init": cmd_tracking_init,
    "mlflow-server": cmd_mlflow_server, "efficiency": cmd_efficiency, "report": cmd_report,
    "claims": cmd_claims, "plan": cmd_plan, "calibrate": cmd_calibrate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        params = load_params()
        _claim_devices(params, args)
        COMMANDS[args.command](params, args)
    except SegreproError as err:
        print(f"segrepro: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        # A training stopped by SIGTERM/SIGUSR1 (segrepro.engine.train.Preempted) has its own exit code.
        print(f"segrepro: {err or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
