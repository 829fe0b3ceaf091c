"""GPU checks (skipped without CUDA): bf16 autocast keeps the softmax fp32, state stays on the device,
the GPU statistics agree with the CPU fp32 reference, and images decoded on the GPU (decode="gpu") or by the fast
path on CUDA give the statistics of the fast path within its documented tolerances, bad files skipped alike."""

import numpy as np
import pytest
import torch

from attnflow.stats import attention_stats, metrics_from_qk
from attnflow.metrics import patch_distances
from attnflow.tap import AttentionTap
from conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_autocast_maps_are_fp32_softmax():
    model = tiny_model(img_size=224).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with AttentionTap(model) as tap, torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    for attn in tap.maps:
        assert attn.dtype == torch.float32 and attn.is_cuda
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("amp,rtol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_gpu_statistics_match_cpu(amp, rtol):
    model = tiny_model(img_size=224)
    batches = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cpu = attention_stats(model, batches, device="cpu", progress=False, compile=False)
    gpu = attention_stats(model, batches, device="cuda", amp=amp, progress=False)  # compiled on CUDA
    assert gpu.meta["device"].startswith("cuda") and gpu.meta["dtype"] == ("bfloat16" if amp == "bf16" else "float32")
    np.testing.assert_array_equal(gpu.frame["count"], cpu.frame["count"])
    np.testing.assert_allclose(gpu.frame["mean"], cpu.frame["mean"], rtol=rtol, atol=1e-4)


def test_peak_memory_does_not_grow_with_images():
    model = tiny_model(img_size=224).cuda()
    batch = torch.randn(16, 3, 224, 224, device="cuda")
    peaks = []
    for n in (4, 16):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        attention_stats(model, [batch] * n, device="cuda", progress=False)
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.01 + 1024 * 1024, peaks


def test_fast_qk_route_matches_attn_drop_route_in_bf16():
    model = tiny_model(img_size=224)
    batches = [torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fast = attention_stats(model, batches, device="cuda", amp="bf16", progress=False, fast_qk=True)
    slow = attention_stats(model, batches, device="cuda", amp="bf16", progress=False, fast_qk=False)
    assert fast.meta["fast_qk_blocks"] == len(model.blocks)
    assert fast.meta["qk_kernel"] == "triton" and fast.meta["qk_kernel_fallback"] is None
    np.testing.assert_allclose(fast.frame["mean"], slow.frame["mean"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("n_prefix,grid,heads,head_dim", [
    (1, (14, 14), 12, 64),   # ViT-B/16 at 224 px
    (5, (16, 16), 6, 64),    # DINOv2-S/14 with registers at 224 px
    (1, (28, 28), 12, 64),   # ViT-B/16 at 448 px: many query and key tiles
    (0, (16, 16), 16, 80),   # I-JEPA ViT-H/14: no [cls], head dim padded to 128
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_kernel_matches_torch_route_at_full_scale(n_prefix, grid, heads, head_dim, dtype):
    from attnflow.kernels.qk_metrics import qk_metrics_triton
    from attnflow.kernels.route import disagreement

    N = n_prefix + grid[0] * grid[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(16, heads, N, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(16, heads, N, head_dim, device="cuda", generator=g).to(dtype)
    dist = patch_distances(grid, (16, 16), "cuda")
    args = (head_dim ** -0.5, n_prefix, n_prefix > 0, dist)
    got = qk_metrics_triton(q, k, *args)
    ref = metrics_from_qk(q, k, *args)
    assert disagreement(got, ref) is None
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6, equal_nan=True)


# --- image decoding on CUDA (attnflow.data.decode): decode="gpu" against "fast", fast on CUDA against the CPU ---
# fp32, no compile, maps tapped (fast_qk off): only the decoding differs between the runs compared.
DECODE_LOOP = {"batch_size": 4, "workers": 0, "progress": False, "amp": "fp32", "compile": False, "fast_qk": False,
               "img_size": 64}


def _mean_differences(a, b):
    a, b = a.frame.set_index(["block", "head", "metric"]), b.frame.set_index(["block", "head", "metric"])
    return (a["mean"] - b["mean"]).abs().groupby("metric").max(), a["mean"]


def test_gpu_decode_statistics_agree_with_fast_decode_on_real_photos(photo_folder):
    model = tiny_model(img_size=64)
    fast = attention_stats(model, photo_folder, device="cuda", decode="fast", **DECODE_LOOP)
    gpu = attention_stats(model, photo_folder, device="cuda", decode="gpu", **DECODE_LOOP)
    assert (fast.meta["decode"], gpu.meta["decode"]) == ("fast", "gpu")
    assert fast.meta["images_used"] == gpu.meta["images_used"] >= 5 and gpu.meta["images_skipped"] == 0
    diff, means = _mean_differences(fast, gpu)
    for metric, value in diff.items():  # the tolerances of fast against pil (docs/performance.md)
        if metric.endswith("entropy"):
            assert value < 1e-3, (metric, value)
        elif metric == "attention_distance":  # in pixels
            assert value < 1e-3 * float(means.xs(metric, level="metric").abs().max()), (metric, value)
        else:
            assert value < 1e-4, (metric, value)


def test_gpu_decode_skips_and_counts_a_corrupt_jpeg_as_fast_decode_does(tmp_path, photos):
    from PIL import Image

    for i, name in enumerate(("astronaut", "chelsea", "coffee"), start=1):
        Image.fromarray(photos[name]).save(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    data = (tmp_path / "ILSVRC2012_val_00000001.JPEG").read_bytes()
    (tmp_path / "a_truncated.jpg").write_bytes(data[: len(data) // 2])  # a valid header: decoded on the device
    (tmp_path / "b_garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"x" * 500)  # refused by the worker already
    model = tiny_model(img_size=64)
    fast = attention_stats(model, tmp_path, device="cuda", decode="fast", **DECODE_LOOP)
    gpu = attention_stats(model, tmp_path, device="cuda", decode="gpu", **DECODE_LOOP)
    assert fast.meta["images_used"] == gpu.meta["images_used"] == 3
    assert fast.meta["images_skipped"] == gpu.meta["images_skipped"] == 2
    assert gpu.meta["skipped"] == fast.meta["skipped"]  # same files, same order, same reasons


def test_fast_decode_on_cuda_matches_the_cpu(photo_folder):
    """The uint8 batches are pinned and copied non-blocking: their pixels arrive intact, the statistics agree."""
    from attnflow.data.decode import TensorTransform
    from attnflow.data.images import ImageBatch
    from attnflow.data.transforms import eval_transform

    model = tiny_model(img_size=64)
    fast = TensorTransform.of(eval_transform(model, 64))
    images = torch.stack([fast(p) for p in sorted(photo_folder.iterdir())])
    n = images.shape[0]
    batch = ImageBatch(images.pin_memory(), torch.full((n,), -1), torch.arange(n), [])
    on_cuda = fast.on_device(batch, torch.device("cuda")).images.cpu()
    torch.testing.assert_close(on_cuda, fast.on_device(batch, torch.device("cpu")).images, rtol=0, atol=1e-6)
    cuda = attention_stats(model, photo_folder, device="cuda", decode="fast", **{**DECODE_LOOP, "workers": 2})
    cpu = attention_stats(model, photo_folder, device="cpu", decode="fast", **DECODE_LOOP)
    assert cuda.meta["images_used"] == cpu.meta["images_used"] >= 5
    np.testing.assert_array_equal(cuda.frame["count"], cpu.frame["count"])
    np.testing.assert_allclose(cuda.frame["mean"], cpu.frame["mean"], rtol=1e-4, atol=1e-4)
