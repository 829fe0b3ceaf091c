"""GPU checks (skipped without CUDA): bf16 autocast keeps the softmax fp32, state stays on the device,
and the GPU statistics agree with the CPU fp32 reference."""

import numpy as np
import pytest
import torch

from attnflow.collect import attention_stats
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
    np.testing.assert_allclose(fast.frame["mean"], slow.frame["mean"], rtol=1e-3, atol=1e-5)
