"""The one trainer every paper's experiments go through.

SGD with momentum (or AdamW, HFGD's advanced setting), poly learning-rate decay, iteration-based;
bf16 autocast on CUDA and the rest of the GPU fast path (`train.fast`). Everything random is a
function of (seed, iteration), so a job killed after a checkpoint and started again resumes from
it and ends with exactly the model an unbroken run gives (on the CPU). With `train.val_every`, the
log also gets the mIoU of a few validation images every so often: the training curve.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from segrepro.core import atomic, paths
from segrepro.core.devices import pick_device
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import config_hash, git_commit, training_config
from segrepro.data.dataset import SegmentationDataset, crop_pair, load_card, make_train_loader
from segrepro.engine import checkpoint, distributed
from segrepro.engine.checkpoint import CHECKPOINT, COMPLETE
from segrepro.engine.metrics import ConfusionMatrix
from segrepro.models.factory import build_model
from segrepro.pipeline import tracking

LOG = paths.TRAIN_LOG
CURVE = "training_curve.png"
# Held (flock) by the trainer that owns the folder, released by the kernel when it dies;
# holds "PID <pid> on <host>" for the one-line error of a second trainer.
LOCK = "trainer.lock"
# The trainer's state at its start, every PROGRESS_STEP of its iterations and at the end, for
# the workflow's progress lines on the terminal (segrepro.progress).
PROGRESS = paths.PROGRESS
PROGRESS_STEP = 0.1
# The exit code of a job stopped by SIGTERM/SIGUSR1 after writing its checkpoint: EX_TEMPFAIL
# ("try again later"), nonzero so that Snakemake retries (--retries) and SLURM's requeue reruns it.
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(KeyboardInterrupt):
    """A stop signal ended training at an iteration boundary, its checkpoint written. A
    KeyboardInterrupt so that the MLflow run ends KILLED (not FAILED, not FINISHED; the rerun
    continues it) and no `except Exception` on the way swallows it."""

    exit_code = PREEMPTED_EXIT


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a loader worker (after torch set its handlers): outlive a stop signal from anyone but
    the trainer, while a SIGTERM from the trainer (its loader's or the interpreter's shutdown)
    still ends the worker. A Python handler cannot see the sender, so a thread waits for them.
    Also drop the worker's inherited copy of the run folder's lock: a trainer killed with -9
    frees its folder at once, not only when its orphaned workers notice."""
    for handle in _held_locks:
        handle.close()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_wait_for_the_parents_stop, daemon=True).start()


def _wait_for_the_parents_stop() -> None:
    while True:
        if signal.sigwaitinfo(STOP_SIGNALS).si_pid == os.getppid():
            os._exit(0)


@contextmanager
def _stop_requests():
    """A list that gets the number of any stop signal received, checked once per iteration:
    SLURM sends SIGTERM on preemption and at the time limit (SIGKILL follows after its KillWait,
    30 s by default) and the signal of `--signal` (e.g. USR1) before it."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # handlers can only be installed in the main thread
        return
    previous = {sig: signal.signal(sig, lambda number, _frame: received.append(number))
                for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def poly_lr(base_lr: float, iteration: int, iterations: int, power: float) -> float:
    return base_lr * (1 - iteration / iterations) ** power


def _iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    # Dropout and any other in-model randomness restart from the same state after a resume; each
    # process of a multi-process run draws its own (rank 0 those of a single-process run).
    return (seed * 1_000_003 + iteration + rank * 2**32) % (2**63)


# Parameters `train.decay: kernels` leaves undecayed besides biases and norm weights (any parameter
# of ndim <= 1): position tables, embeddings and the patch embedding of transformer backbones (as
# the HFGD authors' AdamW, iSeg core_train.py).
NO_DECAY_NAMES = ("relative_position_bias_table", "pos_embed", "cls_token", "patch_embed")
DECAY_MODES = ("all", "kernels")
OPTIMIZERS = ("sgd", "adamw")


def decays(name: str, parameter: torch.nn.Parameter, decay: str) -> bool:
    """Whether weight decay applies to this named parameter under `train.decay`.

    all: every parameter (torch's SGD weight_decay, as semseg tool/train.py and HRNet-OCR
    tools/train.py). kernels: convolution and linear kernels only, not biases, norms or position
    tables: the HFGD authors' Keras L2 regulariser, set on every layer's `kernel` (iSeg
    utils/keras_ops.py set_weight_decay, decay_norm_vars False in CAR loaders/model_loader.py),
    and the exclusions of their AdamW.
    """
    if decay == "all":
        return True
    return parameter.ndim > 1 and not any(key in name for key in NO_DECAY_NAMES)


def parameter_groups(model: torch.nn.Module, settings: dict) -> list[dict]:
    """The optimizer's parameter groups: one per (learning-rate multiplier, decayed or not).

    `train.lr_mult` maps top-level modules of the model to a multiplier of the base rate (the
    others: 1), as semseg's tool/train.py puts PSPNet's new layers (ppm, cls, aux) in groups at
    base_lr * 10 and keeps that ratio at every poly step; each group carries its `lr_mult` and
    `train_step` sets lr = poly rate x lr_mult. `train.decay` (see `decays`) gives the undecayed
    parameters weight_decay 0. Groups come by multiplier, decayed first; empty ones are left out,
    so SGD with decay `all` and no multiplier has the single group of torch's default.
    """
    multipliers = settings.get("lr_mult") or {}
    known = {name for name, _ in model.named_children()} | set(getattr(model, "module_names", ()))
    for module in multipliers:
        if module not in known:
            raise SegreproError(f"train.lr_mult: unknown module '{module}' (the model's: {', '.join(sorted(known))})")
    decay = settings.get("decay", "all")
    if decay not in DECAY_MODES:
        raise SegreproError(f"train.decay {decay!r} is not one of: {', '.join(DECAY_MODES)}")
    members: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        multiplier = float(multipliers.get(name.split(".", 1)[0], 1.0))
        members.setdefault((multiplier, decays(name, parameter, decay)), []).append(parameter)
    return [
        {"params": params, "lr": settings["lr"] * multiplier, "lr_mult": multiplier,
         "weight_decay": settings["weight_decay"] if decayed else 0.0}
        for (multiplier, decayed), params in sorted(members.items(), key=lambda item: (item[0][0], not item[0][1]))
    ]


def build_optimizer(model: torch.nn.Module, settings: dict) -> torch.optim.Optimizer:
    """The optimizer the run's `train` settings name (`optimizer`, default "sgd") over the groups of
    `parameter_groups` (`lr_mult`, `decay`).

    sgd: momentum, coupled weight decay (the gradient gets weight_decay x w). adamw: decoupled
    weight decay, default betas. The learning rate of every group is set at each step (poly decay
    x the group's lr_mult).
    """
    name = settings.get("optimizer", "sgd")
    if name not in OPTIMIZERS:
        raise SegreproError(f"train.optimizer {name!r} is not one of: {', '.join(OPTIMIZERS)}")
    groups = parameter_groups(model, settings)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"],
                               weight_decay=settings["weight_decay"])
    return torch.optim.AdamW(groups, lr=settings["lr"], weight_decay=settings["weight_decay"])


def fast_path(model: torch.nn.Module, fast: dict, device: torch.device) -> torch.nn.Module:
    """Apply the `train.fast` switches that act on the model and the process; returns the module
    to call for the forward pass (compiled or not; its `.loss` stays reachable)."""
    if fast.get("cudnn_benchmark", False) and device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # input sizes are fixed in training: tune once
    if fast.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    if fast.get("compile", False):
        model = torch.compile(model)
    return model


_held_locks: list = []  # the open lock files of this process (see _ignore_stop_signals)


@contextmanager
def _owning(run_dir: Path, ctx):
    """Hold the run folder's lock (rank 0 of a multi-process run, for all of them): a second
    trainer in the same folder (an orphan of a killed workflow still running, another host on a
    shared filesystem) stops with one line naming the holder. Then clear the temporary files a
    killed save left (no writer of the folder is alive)."""
    handle, holder = None, None
    if ctx.main:
        handle = open(run_dir / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle = None
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            _held_locks.append(handle)
            atomic.remove_stale_temporaries(run_dir, everyone=True)
    if not distributed.every_rank_agrees(holder is None, ctx):
        distributed.fail_together(f"{run_dir} is being trained by {holder} (lock {run_dir / LOCK}); "
                                  "wait for it to end or stop it, then run again", ctx)
    try:
        yield
    finally:
        if handle is not None:
            _held_locks.remove(handle)
            handle.close()  # releases the lock


def job_key(config: dict, card: dict, digest: str) -> str:
    """What a finished model is a function of: the training configuration, the dataset's content
    and the source of the code that trains it (the files the workflow declares as the train
    rule's code inputs, read from the package actually running)."""
    import segrepro
    from segrepro.pipeline.codedeps import stage_sources

    root = Path(segrepro.__file__).resolve().parent.parent
    code = hashlib.sha256()
    for source in stage_sources("train", config["model"]["family"], str(root)):
        code.update(str(Path(source).relative_to(root)).encode() + b"\0" + Path(source).read_bytes())
    return config_hash({"training": digest, "data": str(card.get("content_sha256", "")),
                        "code": code.hexdigest()})


def _run_tags(config: dict, card: dict, digest: str, device: str, tables) -> dict:
    return {
        "paper": config["paper"], "experiment": config["experiment"], "scale": config["scale"],
        "dataset": config["dataset"]["name"], "seed": str(config["seed"]),
        # Which version of the data: the card's fingerprint of every image, label and split list.
        "dataset_sha256": str(card.get("content_sha256", "")),
        "backbone": config["model"]["backbone"]["name"], "git_commit": git_commit(),
        "config_hash": digest, "tables": ",".join(tables), "device": device,
        # One tag per table, so that the UI's search (tags.table_table6 = 'yes') lines up a table's runs.
        **{tracking.table_tag(table): "yes" for table in tables},
    }


def _replay(mlrun, records: list[dict]) -> None:
    """Log the records of train_log.jsonl that the MLflow run lacks (metrics still buffered when
    a trainer was killed): the resumed run ends with every metric of an unbroken one."""
    for record in records:
        mlrun.log_metrics_once({k: v for k, v in record.items() if k != "iteration"}, step=record["iteration"])


class _Progress:
    """progress.jsonl of a run folder, begun anew by each trainer: a line at the start, whenever
    another PROGRESS_STEP of the iterations is done, and at the end. segrepro.pipeline.controller prints
    them on the workflow's terminal."""

    def __init__(self, run_dir: Path, name: str, iterations: int, start: int, enabled: bool = True,
                 state: str | None = None):
        self.path, self.name, self.iterations, self.start = run_dir / PROGRESS, name, iterations, start
        self.enabled, self.began = enabled, time.time()
        self.shown = int(start / iterations / PROGRESS_STEP)
        if enabled:
            self.path.unlink(missing_ok=True)
        self.write(start, state=state or ("resumed" if start else "started"))

    def write(self, iteration: int, state: str = "running", loss: float | None = None) -> None:
        if not self.enabled:
            return
        record = {"run": self.name, "state": state, "iteration": iteration, "iterations": self.iterations,
                  "resumed_from": self.start, "pid": os.getpid(), "started": self.began,
                  "updated": time.time(), "loss": loss}
        with open(self.path, "a") as handle:  # one short line per write: readers never see half
            handle.write(json.dumps(record) + "\n")

    def update(self, iteration: int, loss: float) -> None:
        step = int(iteration / self.iterations / PROGRESS_STEP)
        if step > self.shown and iteration < self.iterations:
            self.shown = step
            self.write(iteration, loss=loss)


def train(config: dict, output: Path, device: str | None = None, tables: list[str] = ()) -> dict:
    """Train one run and write its final model to `output` (a file in the run's folder, beside
    the resumable checkpoint, the JSON-lines log and the MLflow run id). Returns a summary.

    The folder is locked while its trainer runs. A finished model of the same job key (the
    configuration, data and code) already in the folder (COMPLETE) is published again instead of
    trained again, its MLflow run completed from the log if a crash left it short."""
    output = Path(output)
    run_dir = output.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = distributed.setup(pick_device(device))  # torchrun: this process's rank and GPU
    with _owning(run_dir, ctx):
        card = load_card(config["dataset"]["root"])
        key = job_key(config, card, config_hash(training_config(config)))
        finished = checkpoint.finished_record(run_dir, key)
        if finished is None:
            return _train(config, output, ctx, card, key, tables)
        if ctx.main:
            _adopt(config, output, finished, card, tables)
        return finished["summary"]


def _adopt(config: dict, output: Path, record: dict, card: dict, tables) -> None:
    """Finish what a killed job left of a finished training: the curve, the MLflow run (every
    metric of the log, FINISHED), the model at `output` (COMPLETE's second name), no checkpoint."""
    run_dir = output.parent
    name = f"{config['paper']}/{config['experiment']}"
    print(f"{name}: {run_dir / COMPLETE} holds the finished model of this configuration, code and data "
          "(an earlier job's): published, not trained again", file=sys.stderr)
    from segrepro.pipeline.train_log import plot_training_curve, read_log

    records = read_log(run_dir / LOG)
    if not (run_dir / CURVE).exists():
        plot_training_curve(records, run_dir / CURVE, name)
    summary = record["summary"]
    tags = _run_tags(config, card, record["config_hash"], summary["device"], tables)
    with tracking.Run(run_dir, config, tags) as mlrun:
        _replay(mlrun, records)
        mlrun.log_metrics_once({"train_seconds": summary["train_seconds"]}, step=0)
        mlrun.log_artifact(run_dir / CURVE)
    checkpoint.publish(run_dir, output)
    _Progress(run_dir, name, summary["iterations"], summary["iterations"], state="published")


def _train(config: dict, output: Path, ctx, card: dict, key: str, tables) -> dict:
    run_dir = output.parent
    settings = config["train"]
    iterations = settings["iterations"]
    dev = ctx.device
    distributed.local_batch_size(settings["batch_size"], ctx, f"{config['paper']}/{config['experiment']}")
    digest = config_hash(training_config(config))

    torch.manual_seed(config["seed"])
    model = build_model(config["model"], card["num_classes"], card["ignore_index"]).to(dev)
    coarsest = max(getattr(model, "strides", (1,)))
    if any(side % coarsest for side in crop_pair(settings["crop_size"])):
        # A pyramidal ground truth needs whole cells (SaF Sec. 3.1).
        raise SegreproError(
            f"{config['paper']}/{config['experiment']}: train.crop_size {settings['crop_size']} is not a "
            f"multiple of the coarsest output stride {coarsest}"
        )
    optimizer = build_optimizer(model, settings)
    fast = settings.get("fast", {})
    pinned = bool(fast.get("pin_memory", False)) and dev.type == "cuda"
    channels_last = bool(fast.get("channels_last", False))
    precision = fast.get("precision", "bf16")

    start, resumed_window = 0, []
    state = checkpoint.load_checkpoint(run_dir, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
        # The losses since the last log line: the next logged mean is an unbroken run's.
        resumed_window = list(state.get("window", []))
        if ctx.main:
            print(f"resuming {config['paper']}/{config['experiment']} from iteration {start} "
                  f"(checkpoint {run_dir / CHECKPOINT})", file=sys.stderr)
    elif ctx.main:
        # A fresh start gets a fresh log, and a fresh MLflow run unless the folder's run is of this
        # very configuration (killed before its first checkpoint: one MLflow run per folder).
        if tracking.run_tag(run_dir, "config_hash") != digest:
            (run_dir / tracking.RUN_ID_FILE).unlink(missing_ok=True)
        (run_dir / LOG).unlink(missing_ok=True)
    distributed.same_on_every_rank(start, f"the iteration to resume from ({run_dir / CHECKPOINT})", ctx)
    if ctx.main:
        _truncate_log(run_dir / LOG, start)
    # With several processes: SyncBN inside DDP; `model` stays the plain module (checkpoints).
    forward = fast_path(distributed.wrap(model, ctx), fast, dev)
    curve = _CurveValidation(config, card, dev) if settings.get("val_every", 0) and ctx.main else None

    loader = make_train_loader(
        config["dataset"]["root"], "train", batch_size=settings["batch_size"],
        crop_size=settings["crop_size"], scale_range=tuple(settings["scale_range"]),
        flip=settings["flip"], brightness=settings["brightness"], seed=config["seed"],
        start_iteration=start, iterations=iterations, num_workers=settings["num_workers"],
        photometric=settings.get("photometric", False), pin_memory=pinned,
        base_size=settings.get("base_size"),
        rotate=settings.get("rotate", 0.0), blur=settings.get("blur", 0.0),
    )
    # torch's loader workers die of a SIGTERM their parent did not send, and SLURM signals every
    # process of the job: they must live on to serve the batches up to the checkpoint.
    loader.worker_init_fn = _ignore_stop_signals
    loader = distributed.shard_loader(loader, ctx)  # each process: its slice of the global batch
    tags = _run_tags(config, card, digest, str(dev), tables)
    name = f"{config['paper']}/{config['experiment']}"
    began = time.time()
    with _stop_requests() as stop, distributed.main_only(tracking.Run(run_dir, config, tags), ctx) as mlrun:
        if ctx.main:
            _replay(mlrun, _read_log(run_dir / LOG))
        milestones = _Progress(run_dir, name, iterations, start, enabled=ctx.main)
        model.train()
        with tqdm(total=iterations, initial=start, desc=f"{config['paper']}/{config['experiment']}",
                  file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 15.0, unit="it",
                  disable=not ctx.main) as progress:
            window: list[float] = resumed_window
            iteration = start
            for images, labels, _ids in _batches(loader):
                lr = poly_lr(settings["lr"], iteration, iterations, settings["poly_power"])
                torch.manual_seed(_iteration_seed(config["seed"], iteration, ctx.rank))
                images = images.to(dev, non_blocking=pinned)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                loss, parts = train_step(forward, optimizer, images, labels.to(dev, non_blocking=pinned), lr, precision)
                loss, parts = distributed.mean_over_ranks(loss, parts, ctx)  # the global batch's
                if not math.isfinite(loss):
                    distributed.fail_together(
                        f"{config['paper']}/{config['experiment']}: loss is {loss} at iteration "
                        f"{iteration}; lower train.lr in params", ctx
                    )
                iteration += 1
                window.append(loss)
                progress.update(1)
                if iteration % settings["log_every"] == 0 or iteration == iterations:
                    record = {"iteration": iteration, "loss": sum(window) / len(window), "lr": lr,
                              **{f"loss_{k}": v for k, v in parts.items()}}
                    window.clear()
                    progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
                    if ctx.main:
                        _append(run_dir / LOG, record)
                    mlrun.log_metrics_once({k: v for k, v in record.items() if k != "iteration"}, step=iteration)
                    milestones.update(iteration, record["loss"])
                if curve and (iteration % settings["val_every"] == 0 or iteration == iterations):
                    record = {"iteration": iteration, "val_miou": curve.miou(model)}
                    _append(run_dir / LOG, record)
                    mlrun.log_metrics_once({"val_miou": record["val_miou"]}, step=iteration)
                stop_now = distributed.agree_on_stop(stop, ctx)  # every rank stops at the same iteration
                if (ctx.main and (iteration % settings["checkpoint_every"] == 0 or stop_now)
                        and iteration < iterations):
                    checkpoint.save_checkpoint(run_dir, model, optimizer, iteration, digest, window)
                    mlrun.flush()  # the MLflow run in step with the checkpoint
                if stop_now and iteration < iterations:
                    raise Preempted(
                        f"{config['paper']}/{config['experiment']} stopped by "
                        f"{signal.Signals(stop_now[0]).name} at iteration {iteration}: checkpoint written, "
                        f"the same command resumes it"
                    )

        seconds = time.time() - began
        summary = {"iterations": iterations, "resumed_from": start, "train_seconds": seconds,
                   "device": str(dev), "git_commit": git_commit(), "processes": ctx.world_size}
        if dev.type == "cuda":
            summary["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        # The process's peak resident memory (Linux: KiB), the CPU counterpart of the above.
        summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mlrun.log_metrics_once({"train_seconds": seconds}, step=0)
        if ctx.main:
            # Written first under its second name: from here on, a rerun never trains again.
            checkpoint.save_finished(run_dir, model, config, digest, card, summary, key)
            from segrepro.pipeline.train_log import plot_training_curve

            plot_training_curve(_read_log(run_dir / LOG), run_dir / CURVE, name)
            mlrun.log_artifact(run_dir / CURVE)
    if ctx.main:
        # The model appears once its MLflow run is complete.
        checkpoint.publish(run_dir, output)
        milestones.write(iterations, "done")
    return summary


class _CurveValidation:
    """The mIoU of the first `train.val_images` validation images, each predicted whole at its own
    size in one pass (not the evaluator's protocol: training must not depend on the evaluation
    code, see segrepro.pipeline.codedeps), for the training curve. Eval mode, no gradients and no random
    numbers drawn: the training, and so the model, is exactly what it is without it."""

    def __init__(self, config: dict, card: dict, device: torch.device):
        dataset = SegmentationDataset(config["dataset"]["root"], "val")
        self.images = [dataset[i] for i in range(min(config["train"].get("val_images", len(dataset)), len(dataset)))]
        self.card, self.device = card, device

    def miou(self, model: torch.nn.Module) -> float:
        matrix = ConfusionMatrix(self.card["num_classes"], self.card["ignore_index"])
        model.eval()
        try:
            with torch.inference_mode():
                for image, label, _id in self.images:
                    logits = _whole_image_logits(model, torch.as_tensor(image).unsqueeze(0).to(self.device))
                    matrix.update(logits[0].argmax(0), torch.as_tensor(label).to(self.device))
        finally:
            model.train()
        return matrix.summary(self.card["class_names"])["miou"]


def _whole_image_logits(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Logits (1,K,H,W) of one image (1,3,H,W): zero-padded to a multiple of 32 (every model's
    coarsest stride here; zero is the mean after normalisation), predicted, cropped back."""
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (0, -width % 32, 0, -height % 32))
    logits = model.predict(padded)
    if logits.shape[-2:] != padded.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


def train_step(model, optimizer, images, labels, lr: float, precision: str = "bf16") -> tuple[float, dict[str, float]]:
    """One optimizer step at base learning rate `lr`: each parameter group gets lr x its lr_mult
    (1 for groups without one, e.g. a checkpoint of an older optimizer), as semseg's tool/train.py
    sets base and 10x groups from the same poly rate. On CUDA the forward pass runs under bf16
    autocast unless `precision` is fp32; the loss is taken in fp32."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    net = getattr(model, "module", model)  # the model inside DDP (or torch.compile): its loss
    on_cuda = images.device.type == "cuda"
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_cuda and precision == "bf16"):
        outputs = model(images)
    loss, parts = net.loss(outputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), {name: value.item() for name, value in parts.items()}


def _batches(loader):
    """The loader's batches; a data error raised in a loader worker comes back as a traceback in
    the message, so keep only its last line (the error itself) to stay a one-line error."""
    try:
        yield from loader
    except SegreproError as err:
        last = str(err).strip().splitlines()[-1]
        raise SegreproError(last.removeprefix("segrepro.core.errors.SegreproError: ")) from None


def _append(log: Path, record: dict) -> None:
    with open(log, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _read_log(path: Path) -> list[dict]:
    from segrepro.pipeline.train_log import read_log  # tolerates a torn last line

    return read_log(path)


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log lines written after the checkpoint a resumed run starts from, and a last line
    torn by a crash (the resumed run writes it again)."""
    if not path.exists():
        return
    kept = [record for record in _read_log(path) if record["iteration"] <= iteration]
    atomic.write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
