"""Two gloo processes (torch.multiprocessing.spawn) train the same heads as one process on the same batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnflow.probes.fit import fit_bank
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)

HEADS = ["cls", "avg", "abmilp", "ap2"]
# batch 30 with 2 accumulation steps: micro-batches of 15 split 8 / 7 over two processes (uneven shards)
# Attentive probing has parameters whose exact gradient is 0: a constant shift of the pooled vector (v, proj
# biases) is removed by the BatchNorm, and a key bias shifts every logit of the softmax equally. They only
# collect rounding noise, which differs with the summation order; the logits below cover their effect.
NULL_SPACE = ("pool.v.bias", "pool.proj.bias", "pool.norm_v.bias", "pool.k.bias", "pool.norm_k.bias",
              "norm.running_mean")
# Two lrs: each head's is chosen on held-out training samples, scored on both processes' shards of them.
KW = dict(epochs=3, batch_size=30, accum_steps=2, lr=[0.5, 2.0], warmup_epochs=1, seed=4, device="cpu")


def data():
    return planted_tokens(100, seed=0, patches=6, dim=8), planted_tokens(31, seed=1, patches=6, dim=8)


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train, val = data()
        result = fit_bank(train, val, HEADS, **KW)
        frame, bank = result.history, result.bank
        states = [None, None]
        dist.all_gather_object(states, bank.state_dict())
        with torch.no_grad():
            logits = bank.eval()(val[0])
        if rank == 0:
            torch.save({"frame": frame, "states": states, "logits": logits}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    train, val = data()
    result = fit_bank(train, val, HEADS, **KW)
    single, bank = result.history, result.bank
    assert len(result.holdout) > 0 and result.table["selected"].sum() == len(HEADS)
    attentive = tuple(f"heads.{i}." for i, e in enumerate(bank.entries) if e.spec.name == "ap2")
    for state in got["states"]:  # both processes hold the same heads ...
        for (name, a), b in zip(bank.state_dict().items(), state.values()):  # ... equal to one process's
            if name.startswith(attentive) and name.endswith(NULL_SPACE):
                continue
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        for entry, ours, theirs in zip(bank.entries, bank.eval()(val[0]), got["logits"]):
            name = entry.name
            tol = 3e-4 if entry.spec.name == "ap2" else 1e-5  # ap2: the drift of its null-space biases (eval uses an EMA)
            torch.testing.assert_close(theirs, ours, rtol=tol, atol=tol, msg=name)
    frame = got["frame"]
    assert frame[["head", "lr", "epoch", "selected"]].equals(single[["head", "lr", "epoch", "selected"]])
    assert (frame["top1"] - single["top1"]).abs().max() < 1e-9  # same predictions on the val set
    assert (frame["holdout_top1"] - single["holdout_top1"]).abs().max() < 1e-9  # ... and on the held-out samples
    torch.testing.assert_close(torch.tensor(frame["train_loss"].values), torch.tensor(single["train_loss"].values),
                               rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--cache", "--views", "2"]], ids=["images-unreadable", "cache"])
def test_torchrun_probe_cli_equals_one_process(tmp_path, photos, extra):
    """`torchrun --nproc_per_node=2 -m attnflow probe` (gloo, CPU) == the same command in one process; with
    ``--cache`` rank 0 extracts the tokens while rank 1 waits (both writing the same files crashed). Without the
    cache two training images per class are empty files: rank 1's first micro-batch shard is all unreadable (its
    placeholder tokens had no patch, and avg pooling divided by zero)."""
    import os
    import subprocess
    import sys

    import pandas as pd
    from PIL import Image

    from attnflow.cli import main
    from attnflow.probes.outputs import load_head
    from conftest import TINY, tiny_model

    root = tmp_path / "data"
    for split, per_class in (("train", 6), ("val", 3)):
        for c, name in enumerate(sorted(photos)[:2]):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                path = root / split / f"c{c}" / f"{i}.jpg"
                if split == "train" and i < 2 and not extra:
                    path.write_bytes(b"")
                    continue
                img = photos[name][i * 20:, i * 10:]
                Image.fromarray(img).resize((40, 40)).save(path)
    weights = tmp_path / "tiny.pth"
    torch.save(tiny_model(img_size=32).state_dict(), weights)
    args = ["probe", "--model", "vit_small_patch16_224", "--checkpoint", str(weights), "--img-size", "32",
            *[f"--model-kw={k}={v}" for k, v in TINY.items()], "--task", "folder", "--data", str(root),
            "--heads", "cls,avg,abmilp,ap2", "--seeds", "1", "--epochs", "2", "--batch-size", "8", "--accum-steps", "2",
            "--lr", "1.0", "--warmup-epochs", "1", "--workers", "0", "--no-progress", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "attnflow", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (pd.read_parquet(tmp_path / d / "results.parquet") for d in ("two", "one"))
    assert two[["head", "epoch", "top1", "top5"]].equals(one[["head", "epoch", "top1", "top5"]])
    torch.testing.assert_close(torch.tensor(two["train_loss"].values), torch.tensor(one["train_loss"].values),
                               rtol=1e-5, atol=1e-6)
    import json

    assert json.loads((tmp_path / "two" / "results.json").read_text())["world_size"] == 2
    a, b = (load_head(tmp_path / d / "seed0" / "heads" / "abmilp.pt").state_dict() for d in ("two", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    if extra:  # the two-process cache holds what one process extracts
        for split in ("train", "val"):
            two_tokens, one_tokens = ((tmp_path / d / "cache" / split / "tokens.npy").read_bytes()
                                      for d in ("two", "one"))
            assert two_tokens == one_tokens, split
