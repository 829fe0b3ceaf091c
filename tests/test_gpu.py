"""GPU checks (skipped without CUDA): bf16 autocast keeps the softmax fp32, state stays on the device,
and the GPU statistics agree with the CPU fp32 reference."""

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
