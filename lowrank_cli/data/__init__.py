"""Data: training/validation images (folders, digits, synthetic), calibration batches, resumable loaders."""

from lowrank_cli.data.calibration import calibration_batches
from lowrank_cli.data.images import ImageData, TensorImages, digits, digits_tensors, load_image_data, synthetic
from lowrank_cli.data.loaders import EpochSampler, eval_loader, train_loader

__all__ = ["EpochSampler", "ImageData", "TensorImages", "calibration_batches", "digits", "digits_tensors", "eval_loader", "load_image_data", "synthetic", "train_loader"]
