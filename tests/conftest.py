"""Shared fixtures: real photos shipped inside installed packages, tiny random-init timm models."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time, i.e. when triton.language (imported by timm) and attnflow.kernels
    # are imported, whether a kernel compiles or runs in its CPU interpreter: so before those imports,
    # without a GPU, choose the interpreter; the same kernel tests then run here and compile on a GPU machine.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)

TINY = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0)
"""Keyword arguments that shrink any timm ViT-family architecture to a tiny test model."""


def tiny_model(arch: str = "vit_small_patch16_224", img_size: int = 64, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny random-init timm model in eval mode (deterministic for a given seed)."""
    torch.manual_seed(seed)
    cfg = {**TINY, "img_size": img_size, **kwargs}
    return timm.create_model(arch, pretrained=False, num_classes=0, **cfg).eval()


def real_photos() -> dict[str, np.ndarray]:
    """Real RGB photos (uint8 ``[H, W, 3]``) from skimage, scikit-learn and matplotlib."""
    import matplotlib.cbook
    import skimage.data

    photos = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
    }
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images):
            photos[name] = img
    except ImportError:  # scikit-learn is a dev extra
        pass
    return photos


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return real_photos()


@pytest.fixture()
def photo_folder(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    """A flat folder of real JPEG photos, named like ImageNet-val files."""
    root = tmp_path / "photos"
    root.mkdir()
    for i, (name, img) in enumerate(sorted(photos.items()), start=1):
        Image.fromarray(img).save(root / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return root


@pytest.fixture()
def cub(tmp_path: Path, photos: dict[str, np.ndarray]) -> Path:
    """A CUB-200-2011 release tree with 12 images: 8 train, 4 test, 3 classes."""
    from cub_data import write_cub_tree

    return write_cub_tree(tmp_path, photos)


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch) -> Path:
    """Empty torch hub and Hugging Face caches under ``tmp_path``, offline mode, and no sockets at all."""
    import socket

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
