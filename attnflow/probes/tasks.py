"""Task datasets of the probe: ImageNet-1k, ImageNet-1%, CUB-200-2011 or any class-folder tree.

The loaders themselves live in :mod:`attnflow.data`; this module only picks them per task and attaches the
protocol's transforms (training: RandomResizedCrop + flip unless ``train_aug="none"`` or a single-view cache;
validation: the model's eval transform at ``crop_pct``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch.utils.data import Dataset

from ..data.transforms import eval_transform
from ..errors import AttnflowError
from .imagedata import train_transform
from .protocols import ProbeConfig


@dataclass
class TaskData:
    """Training and validation sets of a task, with provenance."""

    train: Dataset
    val: Dataset
    num_classes: int
    info: dict
    train_transform: Callable
    val_transform: Callable


    def train_eval(self) -> Dataset:
        """The training images through the validation transform (how held-out training images are scored)."""
        if self.train_transform is self.val_transform:
            return self.train
        if not hasattr(self.train, "transform"):
            raise AttnflowError(f"cannot score held-out images of {type(self.train).__name__}: it has no transform")
        dataset = copy.copy(self.train)
        dataset.transform = self.val_transform
        return dataset


def _subdir(root: Path, *names: str, hint: str = "") -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise AttnflowError(f"{root} has no {' or '.join(names)} folder{hint}")


def load_task(config: ProbeConfig, root: str | Path, model: nn.Module) -> TaskData:
    """Build the datasets of ``config.task`` under ``root``.

    Layouts: ``imagenet``: ``ROOT/train`` (wnid folders) + ``ROOT/val`` (class folders or flat with the
    shipped labels); ``imagenet-1pct``: ``ROOT/train`` filtered by ``config.split_file`` (default: the shipped
    1% split) + ``ROOT/val``; ``cub``: the released ``CUB_200_2011`` layout; ``folder``: ``ROOT/train`` and
    ``ROOT/val`` (or ``test``) class folders.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise AttnflowError(f"data root {root} does not exist")
    val_tf = eval_transform(model, img_size=config.img_size, crop_pct=config.crop_pct)
    augment = config.train_aug == "rrc-flip" and not (config.cache and config.views == 1)
    train_tf = train_transform(model, config.img_size, config.rrc_scale) if augment else val_tf
    limit = config.limit
    train: Dataset
    val: Dataset
    if config.task == "cub":
        from ..data.cub import CUB200

        train = CUB200(root, "train", train_tf, limit=limit)
        val = CUB200(root, "test", val_tf, limit=limit)
    elif config.task in ("imagenet", "imagenet-1pct"):
        from ..data.imagenet import imagenet_train, imagenet_val

        train_root, val_root = _subdir(root, "train"), _subdir(root, "val")
        if config.task == "imagenet":
            train = imagenet_train(train_root, train_tf, limit=limit)
        else:
            from ..data.subsets import imagenet_subset

            train = imagenet_subset(train_root, config.split_file or "imagenet-1pct", train_tf, limit=limit)
        val = imagenet_val(val_root, val_tf, limit=limit)
    else:
        from ..data.images import ImageFolderDataset

        layout = "; the folder task reads ROOT/train/<class>/* and ROOT/val/<class>/* (or ROOT/test/<class>/*)"
        train = ImageFolderDataset(_subdir(root, "train", hint=layout), train_tf, limit=limit)
        val = ImageFolderDataset(_subdir(root, "val", "test", hint=layout), val_tf, limit=limit)
        if not train.classes:
            raise AttnflowError(f"{root}/train has no class folders")
        if train.classes != val.classes:
            raise AttnflowError(f"{root}: train and val class folders differ")
    classes = list(getattr(train, "classes", []))
    info = {"task": config.task, "root": str(root), "n_train": len(train), "n_val": len(val),
            "num_classes": len(classes), "train_transform": repr(train_tf), "val_transform": repr(val_tf)}
    return TaskData(train, val, len(classes), info, train_tf, val_tf)
