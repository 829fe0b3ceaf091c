"""`attnflow localize` under torch.distributed: two gloo processes (forked) give the hit counts of one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attnflow.models.load import load_model
from test_localize_cli import ARCH, KW, write_boxes


def _worker(rank: int, store: str, folder: str, boxes: str, out: str) -> None:
    import torch.distributed as dist

    from attnflow.localize import localize, read_boxes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = load_model(ARCH, random_init=True, img_size=64, **KW)
        result = localize(model, folder, read_boxes(boxes), batch_size=2, img_size=64, progress=False)
        if rank == 0:
            result.curve.to_csv(out, index=False)
            Path(out).with_suffix(".json").write_text(json.dumps(result.meta, default=str))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(photo_folder, tmp_path):
    import torch.multiprocessing as mp

    from attnflow.localize import localize, read_boxes

    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"")
    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    out = tmp_path / "two.csv"
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(photo_folder), str(boxes), str(out)), nprocs=2,
                       start_method="fork")
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    one = localize(model, photo_folder, read_boxes(boxes), batch_size=3, img_size=64, progress=False)
    two = pd.read_csv(out)
    np.testing.assert_array_equal(two["hits"], one.curve["hits"])
    assert (two["images"] == one.meta["images_used"]).all()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["world_size"] == 2 and meta["images_skipped"] == 1 and meta["images_used"] == one.meta["images_used"]


def _interrupted_then_resumed_worker(rank: int, store: str, folder: str, boxes: str, out: str, state: str) -> None:
    """Each process is interrupted at its fifth forward, then resumes from its own state file."""
    import torch.distributed as dist

    from attnflow.localize import evaluate, localize, read_boxes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = load_model(ARCH, random_init=True, img_size=64, **KW)
        real, calls = evaluate.MapCapture.__call__, []

        def interrupting(self, images):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return real(self, images)

        evaluate.MapCapture.__call__ = interrupting  # type: ignore[method-assign]
        try:
            localize(model, folder, read_boxes(boxes), batch_size=1, img_size=64, progress=False, state_path=state,
                     checkpoint_every=1)
        except KeyboardInterrupt:
            pass
        evaluate.MapCapture.__call__ = real  # type: ignore[method-assign]
        saved = torch.load(Path(state).with_name(f"loc.rank{rank}.pt"), weights_only=False)
        assert saved["done_items"] == 2 and saved["fingerprint"]["rank"] == rank
        result = localize(model, folder, read_boxes(boxes), batch_size=2, img_size=64, progress=False,
                          state_path=state, resume=True)
        assert result.meta["resumed"] is True
        if rank == 0:
            result.curve.to_csv(out, index=False)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_interrupted_and_resumed_equal_one(photo_folder, tmp_path):
    import torch.multiprocessing as mp

    from attnflow.localize import localize, read_boxes

    for photo in sorted(photo_folder.glob("*.JPEG")):  # more images: each process must get past 4 of them
        number = int(photo.stem.rsplit("_", 1)[1])
        (photo_folder / f"ILSVRC2012_val_{number + 10:08d}.JPEG").write_bytes(photo.read_bytes())
    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    out = tmp_path / "two.csv"
    mp.start_processes(_interrupted_then_resumed_worker, nprocs=2, start_method="fork",
                       args=(str(tmp_path / "store"), str(photo_folder), str(boxes), str(out),
                             str(tmp_path / "loc.pt")))
    assert not list(tmp_path.glob("loc*.pt"))  # every process removed its state at the end
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    one = localize(model, photo_folder, read_boxes(boxes), batch_size=3, img_size=64, progress=False)
    np.testing.assert_array_equal(pd.read_csv(out)["hits"], one.curve["hits"])
