"""Datasets, layouts, manifests and per-model transforms."""

from .cub import CUB200
from .images import (BadImage, DataError, ImageBatch, ImageFolderDataset, collate_skip_bad, evenly_spaced,
                     find_images, load_rgb)
from .imagenet import (ImageNetTrain, imagenet_class_names, imagenet_train, imagenet_val, imagenet_wnids,
                       read_val_ground_truth)
from .labeled import LabeledImageList
from .manifests import Manifest, UnknownManifestError, list_manifests, load_manifest
from .subsets import imagenet_subset
from .transforms import eval_transform
from .verify import VerifyReport, verify_dataset

__all__ = ["BadImage", "CUB200", "DataError", "ImageBatch", "ImageFolderDataset", "ImageNetTrain",
           "LabeledImageList", "Manifest", "UnknownManifestError", "VerifyReport", "collate_skip_bad",
           "eval_transform", "evenly_spaced", "find_images", "imagenet_class_names", "imagenet_subset",
           "imagenet_train", "imagenet_val", "imagenet_wnids", "list_manifests", "load_manifest", "load_rgb",
           "read_val_ground_truth", "verify_dataset"]
