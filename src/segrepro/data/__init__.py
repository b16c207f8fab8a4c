"""Datasets in one on-disk layout: the synthetic generator and the reader used for all of them."""

from segrepro.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IterationBatchSampler,
    SegmentationDataset,
    TrainAugment,
    load_card,
    make_train_loader,
    normalize,
)
from segrepro.data.synthetic import CLASS_NAMES, generate_dataset, render_scene

__all__ = [
    "CLASS_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IterationBatchSampler",
    "SegmentationDataset",
    "TrainAugment",
    "generate_dataset",
    "load_card",
    "make_train_loader",
    "normalize",
    "render_scene",
]
