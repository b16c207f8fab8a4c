"""Time one model on this machine, in a process of its own (SaF Table 5 and Table B).

`python -m segrepro.measure.efficiency_probe` reads a job (JSON, written by segrepro.measure.efficiency) on stdin
and prints the measurement (JSON) on stdout. A fresh process per model keeps one model's memory
out of the next one's peak, and the table module's code free of models and torch.

- testing FPS: images per second of `model.predict` on one image at a time (batch 1, no_grad,
  eval mode), `test_images` of them after `warmup` unmeasured ones, as the paper averages over 50;
- training it/s: the trainer's own step (`segrepro.engine.train.train_step`: forward, loss, backward,
  SGD update) on a batch of `batch_size`, `train_steps` of them after `warmup`;
- training memory: on CUDA the peak of torch's allocator over the training steps (reserved: what
  the process holds; allocated: what tensors used), which leaves out the CUDA context; on a CPU
  likewise the process's peak resident set size less what it held before the model was built (the
  interpreter and the libraries: `rss_before_model_gb`; the whole peak is `peak_rss_gb`).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from segrepro.core.devices import device_name
from segrepro.core.errors import SegreproError
from segrepro.engine.train import build_optimizer, train_step
from segrepro.models.factory import build_model
from segrepro.models.saf.context_heads import build_comparison_model

GB = 2**30  # the paper's "G" of memory: binary, as memory tools count it
LABEL_BLOCK = 16  # side of the constant blocks of the synthetic label maps


def build(job: dict) -> torch.nn.Module:
    """The row's model: the experiment's own (SaF) model, or a comparison head on its features."""
    if job["head"] is None:
        return build_model(job["model"], job["num_classes"])
    return build_comparison_model(job["model"], job["num_classes"], job["head"], job["resnet_output_stride"])


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def _seconds(run, repeats: int, device: torch.device) -> tuple[float, float]:
    """Wall time and this process's CPU time of `repeats` calls; CUDA work is waited for before the
    clocks stop. CPU time below wall time x threads means other processes shared the cores."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def synthetic_batch(job: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images, and labels made of constant 16x16 blocks, so that the pyramidal
    ground truth has unity and mix cells as on real label maps (the values do not change the work
    of any other loss)."""
    size, batch = job["input_size"], job["batch_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    blocks = torch.randint(job["num_classes"], (batch, size // LABEL_BLOCK, size // LABEL_BLOCK), device=device)
    labels = blocks.repeat_interleave(LABEL_BLOCK, dim=1).repeat_interleave(LABEL_BLOCK, dim=2)
    return images, labels


def measure(job: dict) -> dict:
    """Testing FPS, training it/s and training memory of the job's model (see the module doc)."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegreproError(f"device {job['device']}: CUDA is not available here")
    if job["input_size"] % 32:
        raise SegreproError(f"input size {job['input_size']} is not a multiple of 32 (the coarsest stride)")
    torch.manual_seed(0)
    rss_before_model = peak_rss_gb()
    model = build(job).to(device)
    bf16 = device.type == "cuda" and job["precision"] == "bf16"  # the trainer's rule: a CPU runs fp32

    model.eval()
    image = torch.randn(1, 3, job["input_size"], job["input_size"], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        _seconds(lambda: model.predict(image), job["warmup"], device)
        test_seconds, test_cpu_seconds = _seconds(lambda: model.predict(image), job["test_images"], device)

    model.train()
    optimizer = build_optimizer(model, job["train"])
    images, labels = synthetic_batch(job, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the testing phase's blocks must not count as training memory
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        train_step(model, optimizer, images, labels, job["train"]["lr"], job["precision"])

    _seconds(step, job["warmup"], device)
    train_seconds, train_cpu_seconds = _seconds(step, job["train_steps"], device)

    result = {
        "device_name": device_name(device, threads=False),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "test_fps": job["test_images"] / test_seconds,
        "train_its": job["train_steps"] / train_seconds,
        "test_seconds": test_seconds,
        "train_seconds": train_seconds,
        "test_cpu_seconds": test_cpu_seconds,
        "train_cpu_seconds": train_cpu_seconds,
    }
    if device.type == "cuda":
        result["train_mem_gb"] = torch.cuda.max_memory_reserved(device) / GB
        result["train_mem_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        result["peak_rss_gb"] = peak_rss_gb()
        result["rss_before_model_gb"] = rss_before_model
        result["train_mem_gb"] = result["peak_rss_gb"] - rss_before_model
    return result


def main() -> int:
    try:
        print(json.dumps(measure(json.loads(sys.stdin.read()))))
    except SegreproError as err:
        print(f"segrepro: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
