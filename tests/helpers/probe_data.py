"""Synthetic token sets for the probe tests: the class signal planted in a few patch tokens or in [cls]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def planted_tokens(n: int, where: str = "patch", *, patches: int = 16, dim: int = 16, classes: int = 4,
                   signal_tokens: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, 1 + patches, dim]`` ([cls] first) and labels ``[n]``.

    Every token is Gaussian noise plus half a class prototype of a *random* class (distractors). With
    ``where="patch"`` the label's prototype plus a shared "salient" marker is added to ``signal_tokens``
    random patches (a selective aggregator can find them by the marker); with ``where="cls"`` the label's
    prototype is added to the [cls] token only.
    """
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(1234)  # prototypes and marker are shared by train and val
    protos = torch.randn(classes, dim, generator=fixed)
    protos = 4 * protos / protos.norm(dim=1, keepdim=True)
    marker = torch.randn(dim, generator=fixed)
    marker = 4 * marker / marker.norm()
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1 + patches, dim, generator=g)
    x[:, 1:] += 0.5 * protos[torch.randint(0, classes, (n, patches), generator=g)]
    if where == "patch":
        pos = torch.argsort(torch.rand(n, patches, generator=g), dim=1)[:, :signal_tokens] + 1
        x[torch.arange(n)[:, None], pos] += protos[labels][:, None] + marker
    else:
        x[:, 0] += protos[labels]
    return x, labels


def folder_task(root: Path, photos: dict[str, np.ndarray], classes: int) -> Path:
    """A ``folder`` task tree: ``root/train`` and ``root/val`` with ``classes`` class folders of 4 and 2 real
    photos."""
    keys = sorted(photos)
    for split, count in (("train", 4), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(photos[keys[(c + i) % len(keys)]]).resize((40, 36)).save(folder / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Run a test on one intra-op thread: tiny ops are ~100x slower when a second thread must be woken on a
    busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def peaked_abmilp_file(path: Path, seed: int, dim: int = 32) -> Path:
    """A saved AbMILP head of a ``dim``-wide model with [cls] (3 classes), its scorer scaled 20x so that its
    aggregation weights are peaked (a map with a clear maximum), seeded by ``seed``."""
    from attnflow.probes.heads import ProbeHead
    from attnflow.probes.outputs import save_head
    from attnflow.probes.specs import parse_head_spec

    torch.manual_seed(seed)
    head = ProbeHead(parse_head_spec("abmilp"), dim=dim, num_classes=3, has_cls=True)
    with torch.no_grad():
        head.pool.scorer.weight.mul_(20)
    return save_head(path, head, meta={"block": -1, "layernorm": False})
