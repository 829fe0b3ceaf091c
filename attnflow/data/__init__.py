"""Datasets, layouts and per-model transforms."""

from .images import (BadImage, DataError, ImageBatch, ImageFolderDataset, collate_skip_bad, evenly_spaced,
                     find_images, load_rgb)
from .transforms import eval_transform

__all__ = ["BadImage", "DataError", "ImageBatch", "ImageFolderDataset", "collate_skip_bad", "evenly_spaced",
           "eval_transform", "find_images", "load_rgb"]
