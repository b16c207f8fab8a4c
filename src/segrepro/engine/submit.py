"""Test-server submissions: a trained model, a test protocol (scales, flip) and a split whose labels
are not public -> one zip holding one PNG per image, in the benchmark's own format.

Two numbers the papers report exist only on a server: SaF Table 2 (ADE20K test, the MIT Scene
Parsing Benchmark's score) and HFGD Table 14 (Cityscapes test, pixel-level semantic labelling). The
pipeline writes what to upload; the score comes back from the server, never from here.

The zip holds the PNGs and nothing else (neither server's rules mention other files, the Cityscapes
evaluator walks the whole upload for PNGs); a README.txt beside it says what it is and where it
goes, and the zip's archive comment (not a file) holds the same provenance as JSON for the table.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from segrepro.core import atomic, paths
from segrepro.core.devices import pick_device
from segrepro.core.errors import SegreproError
from segrepro.core.provenance import git_commit
from segrepro.data import cityscapes
from segrepro.data.dataset import SplitImages
from segrepro.data.test_servers import Server, server
from segrepro.engine import inference
from segrepro.engine.checkpoint import load_model
from segrepro.pipeline import tracking

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same predictions give the same bytes


def default_split(card: dict) -> str:
    """The split to submit: the dataset's unlabelled `test` (or its only unlabelled split); a
    dataset without one (the synthetic ones) lets its val images stand in."""
    unlabelled = card.get("unlabelled_splits", [])
    if "test" in unlabelled:
        return "test"
    return unlabelled[0] if len(unlabelled) == 1 else "val"


def _png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _predictions(model, images: SplitImages, protocol: dict, settings: dict, device: torch.device,
                 num_classes: int):
    """(id, class indices uint8 HxW at the image's own size) per image, with the evaluator's
    predictor (segrepro.engine.inference: sliding window, scales, flip) and its bf16 autocast on CUDA."""
    scales = [float(s) for s in protocol["scales"]]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for index in tqdm(range(len(images)), desc="submit", file=sys.stderr):
            image, image_id = images[index]
            x = image.to(device, torch.float32).unsqueeze(0)
            probs = inference.predict_probs(model.predict, x, num_classes, scales, bool(protocol.get("flip", False)),
                                            settings["crop_size"], settings.get("base_size"),
                                            protocol.get("pad", "none"))
            yield image_id, probs.argmax(0).to(torch.uint8).cpu().numpy()


def write_submission(config: dict, model_path: Path, split: str, output_zip: Path, server_name: str,
                     protocol: str = "ms", device: str | None = None) -> dict:
    """Predict every image of the dataset's `split` with the run's test `protocol` and write the
    zip for the server `server_name` (a key of segrepro.data.test_servers.SERVERS) to `output_zip`,
    atomically: a failure leaves no zip. Writes README.txt beside it, tags the model's MLflow run
    with the zip's path, and returns the manifest (also the zip's archive comment)."""
    fmt = server(server_name)
    settings = config["eval"]
    if protocol not in settings["protocols"]:
        raise SegreproError(
            f"unknown test protocol '{protocol}'"
            f" (scale '{config['scale']}' defines: {', '.join(settings['protocols'])})")
    images = SplitImages(config["dataset"]["root"], split)
    stand_in = images.labelled
    names = {}
    for image_id in images.ids:
        name = fmt.file_name(image_id, stand_in)
        if name in names:
            raise SegreproError(f"{images.split_file}: images {names[name]!r} and {image_id!r} would both be {name}")
        names[name] = image_id

    dev = pick_device(device)
    model, record = load_model(model_path, device=str(dev))
    num_classes = int(record["num_classes"])
    if num_classes != int(images.card["num_classes"]):
        raise SegreproError(f"{model_path}: trained for {num_classes} classes, dataset "
                            f"{config['dataset']['name']} has {images.card['num_classes']}")
    if server_name == "cityscapes" and not stand_in and num_classes != len(cityscapes.train_to_label()):
        raise SegreproError(f"{model_path}: a Cityscapes submission needs the 19 train ids,"
                            f" the model has {num_classes} classes")

    manifest = {
        paths.SUBMISSION_KEY: 1, "server": server_name, "benchmark": fmt.benchmark, "url": fmt.url,
        "paper": config["paper"], "experiment": config["experiment"], "scale": config["scale"],
        "dataset": config["dataset"]["name"], "seed": config["seed"], "split": split, "stand_in": stand_in,
        "num_images": len(images), "protocol": protocol, "protocol_settings": settings["protocols"][protocol],
        "backbone": _backbone(config["model"]["backbone"]), "iterations": config["train"]["iterations"],
        "train": record["summary"], "git_commit": git_commit(),
    }
    output_zip = Path(output_zip)
    with atomic.atomic_path(output_zip) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            predictions = _predictions(model, images, settings["protocols"][protocol], settings, dev, num_classes)
            for image_id, pred in predictions:
                values = fmt.encode(pred, num_classes)
                member = zipfile.ZipInfo(fmt.file_name(image_id, stand_in), date_time=_ZIP_TIME)
                member.external_attr = 0o644 << 16
                # PNG is deflated already: stored members cost nothing and unzip anywhere.
                archive.writestr(member, _png(values), compress_type=zipfile.ZIP_STORED)
            archive.comment = json.dumps(manifest, sort_keys=True).encode()
        # Inside the block: a README that cannot be written leaves no zip either.
        atomic.write_text(paths.submission_readme_path(output_zip), _readme(manifest, fmt, output_zip))

    with tracking.Run(Path(model_path).parent, config, tags={f"submission_{protocol}": str(output_zip)}):
        pass
    return manifest


def _backbone(backbone: dict) -> str:
    from segrepro.engine.evaluate import describe_backbone

    return describe_backbone(backbone)


def _readme(manifest: dict, fmt: Server, output_zip: Path) -> str:
    lines = [
        (f"{output_zip.name}: {manifest['num_images']} predictions of split '{manifest['split']}' of dataset"
         f" '{manifest['dataset']}', one PNG per image at the image's own size."),
        f"Benchmark: {fmt.benchmark}. Upload the zip at {fmt.url}.",
        f"Pixel values: {fmt.values}.",
        (f"Model: {manifest['paper']}/{manifest['experiment']}, scale '{manifest['scale']}', seed {manifest['seed']},"
         f" test protocol '{manifest['protocol']}' {json.dumps(manifest['protocol_settings'])}."),
    ]
    if manifest["stand_in"]:
        lines.insert(0, f"NOT A SUBMISSION: dataset '{manifest['dataset']}' has no unlabelled test split; its "
                        f"'{manifest['split']}' images stand in for one, in the benchmark's file format.")
    return "\n".join(lines) + "\n"

