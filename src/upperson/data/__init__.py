"""Datasets on disk → samples, splits, transforms, masking and samplers for training and evaluation."""

from upperson.data.check import DataReport, SplitSummary, check_dataset
from upperson.data.datasets import ImageDataset, ImageTextDataset, TextDataset, collate_skip_none, read_image
from upperson.data.masking import mask_caption_tokens
from upperson.data.readers import DATASETS, DatasetFormatError, DatasetNotFoundError, load_dataset, pre_caption
from upperson.data.records import EvalSplit, MissingSplitError, Problem, RetrievalDataset, TrainSample
from upperson.data.samplers import GlobalBatchSlices, RandomIdentitySampler, SeededRandomSampler, build_train_batches, build_train_sampler
from upperson.data.transforms import CLIP_MEAN, CLIP_STD, build_transforms

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DataReport",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "EvalSplit",
    "ImageDataset",
    "ImageTextDataset",
    "MissingSplitError",
    "Problem",
    "GlobalBatchSlices",
    "RandomIdentitySampler",
    "RetrievalDataset",
    "SeededRandomSampler",
    "SplitSummary",
    "TextDataset",
    "TrainSample",
    "build_train_batches",
    "build_train_sampler",
    "build_transforms",
    "check_dataset",
    "collate_skip_none",
    "load_dataset",
    "mask_caption_tokens",
    "pre_caption",
    "read_image",
]
