"""The probes, the fixed-aggregation statistics and the localization on CUDA give what they give on the CPU
(float32; cuDNN's TF32 convolution of the patch embedding rounds a little) and run under bf16 autocast."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from attnflow.cli import main
from attnflow.localize import localize, read_boxes
from attnflow.models.load import load_model
from attnflow.aggregation.analysis import aggregation_statistics
from localize_data import ARCH, KW, write_boxes
from cub_data import probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_probe_on_cuda_matches_cpu(cub, tmp_path):
    assert probe(cub, tmp_path / "cpu", "--device", "cpu", "--amp", "none") == 0
    assert probe(cub, tmp_path / "gpu", "--device", "cuda", "--amp", "none") == 0
    assert probe(cub, tmp_path / "bf16", "--device", "cuda", "--amp", "bf16") == 0
    cpu, gpu, bf16 = (pd.read_parquet(tmp_path / d / "results.parquet") for d in ("cpu", "gpu", "bf16"))
    assert json.loads((tmp_path / "gpu" / "results.json").read_text())["device"].startswith("cuda")
    np.testing.assert_allclose(gpu["train_loss"], cpu["train_loss"], rtol=2e-2)
    assert np.isfinite(bf16["train_loss"]).all() and bf16["top1"].between(0, 100).all()


def test_aggregation_statistics_on_cuda_match_cpu(photo_folder):
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    runs = {device: aggregation_statistics(model, photo_folder, img_size=64, batch_size=4, device=device,
                                           amp="none", progress=False).frame for device in ("cpu", "cuda")}
    bf16 = aggregation_statistics(model, photo_folder, img_size=64, batch_size=4, device="cuda", amp="bf16",
                                  progress=False).frame
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert (cpu["count"] == gpu["count"]).all()
    entropy = cpu["metric"] == "entropy"
    np.testing.assert_allclose(gpu.loc[entropy, "mean"], cpu.loc[entropy, "mean"], rtol=1e-4)
    np.testing.assert_allclose(gpu.loc[~entropy, "mean"], cpu.loc[~entropy, "mean"], atol=1e-4)
    np.testing.assert_allclose(bf16.loc[entropy, "mean"], cpu.loc[entropy, "mean"], rtol=1e-2)


def test_localize_on_cuda_matches_cpu(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    truth = read_boxes(tmp_path / "boxes.csv")
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    runs = {device: localize(model, photo_folder, truth, img_size=64, batch_size=4, device=device, amp="none",
                             progress=False) for device in ("cpu", "cuda")}
    n = runs["cpu"].meta["images_used"]
    assert runs["cuda"].meta["images_used"] == n and runs["cuda"].meta["device"].startswith("cuda")
    values = {d: r.frame.set_index(["source", "metric", "iou_threshold"])["value"] for d, r in runs.items()}
    np.testing.assert_allclose(values["cuda"], values["cpu"], atol=100 / n + 1e-9)  # at most one image apart
    bf16 = localize(model, photo_folder, truth, img_size=64, batch_size=4, device="cuda", amp="bf16", progress=False)
    assert bf16.meta["images_used"] == n


def test_localize_and_aggregate_clis_on_cuda(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    model = ["--model", ARCH, "--random-init", "--img-size", "64",
             *[x for k, v in KW.items() for x in ("--model-kw", f"{k}={v}")]]
    assert main(["localize", *model, "--data", str(photo_folder), "--boxes", str(tmp_path / "boxes.csv"),
                 "--out", str(tmp_path / "loc"), "--device", "cuda", "--examples", "2", "--no-progress"]) == 0
    assert main(["aggregate", *model, "--data", str(photo_folder), "--out", str(tmp_path / "agg"),
                 "--device", "cuda", "--no-progress"]) == 0
    assert (tmp_path / "loc" / "examples.png").exists() and (tmp_path / "agg" / "kld.png").exists()
