"""The Triton q/k metrics kernel vs a float64 brute-force map, and the route that falls back to torch.

Without a GPU, conftest builds the kernel for Triton's CPU interpreter; with one, these tests compile it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from attnflow.stats import attention_stats, metrics_from_qk  # noqa: E402
from attnflow.kernels import route as route_module  # noqa: E402
from attnflow.kernels.qk_metrics import grid_geometry, qk_metrics_triton  # noqa: E402
from attnflow.kernels.route import QKRoute, disagreement  # noqa: E402
from attnflow.metrics import METRICS, attention_metrics, patch_distances  # noqa: E402
from brute_force import brute_force_metrics  # noqa: E402
from conftest import tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_metrics(q, k, scale, num_prefix, has_cls, grid, patch=(16, 16)):
    """The float64 map ``softmax(logits)``, with the logits computed and rounded in the input dtype as in
    timm's non-fused path, then every metric by the brute-force loops of ``tests/brute_force.py``."""
    logits = ((q.cpu() * scale) @ k.cpu().transpose(-2, -1)).double()
    return brute_force_metrics(logits.softmax(-1), num_prefix, has_cls, grid, patch)


def _qk(B, H, N, d, dtype, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # timm's layout: q and k are views of one qkv tensor
        qkv = (torch.randn(B, N, 3, H, d, generator=g) * 1.5).to(DEVICE, dtype).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]
    q = torch.randn(B, H, N, d, generator=g) * 1.5
    k = torch.randn(B, H, N, d, generator=g) * 1.5
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


@pytest.mark.parametrize("num_prefix,grid,d,has_cls,blocks", [
    (1, (7, 7), 16, True, (32, 32, 1)),         # ViT: [cls] + 49 patches, two query and two key tiles
    (5, (4, 6), 24, True, (16, 16, 2)),         # [cls] + 4 registers, non-square grid, head dim padded to 32
    (2, (5, 5), 16, True, (16, 64, 1)),         # DeiT-distilled, one key tile
    (0, (5, 5), 16, False, (32, 16, 2)),        # no [cls] (I-JEPA): [cls] metrics NaN
    (1, (7, 7), 16, True, (None, None, None)),  # the default tiles (autotuned on a GPU)
    (1, (9, 9), 16, True, (64, 64, 2)),         # 82 rows = 64 + 18, 81 keys = 64 + 17: tails of two 16-tiles
    (1, (7, 7), 16, True, (128, 16, 1)),        # fewer rows than one tile: every row, [cls] too, in 16-row tiles
])
@pytest.mark.parametrize("from_grid", [None, False])
def test_kernel_matches_brute_force(num_prefix, grid, d, has_cls, blocks, from_grid):
    """Each tile shape, one or two heads per program, distances computed from the grid (the default for a
    patch_distances matrix) or read from the matrix."""
    N = num_prefix + grid[0] * grid[1]
    q, k = _qk(2, 4, N, d, torch.float32)
    dist = patch_distances(grid, (16, 16))
    got = qk_metrics_triton(q, k, d ** -0.5, num_prefix, has_cls, dist, block_m=blocks[0], block_n=blocks[1],
                            heads_per_program=blocks[2], distances_from_grid=from_grid)
    ref = reference_metrics(q, k, d ** -0.5, num_prefix, has_cls, grid)
    assert got.shape == (2, 4, len(METRICS)) and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().double().numpy(), ref.numpy(), rtol=2e-5, atol=1e-6)
    assert got.isnan().any().item() == (not has_cls)


def test_veltkamp_split_rounds_fp32_to_bf16_like_the_conversion():
    """The kernel rounds bf16 logits on the GPU as ``c = x (2^16 + 1)``, then ``c - (c - x)``
    (three fp32 operations instead of a slow conversion): it must give the nearest-even bf16 bit for bit,
    ties included, for every normal fp32 below 1e33 (a subnormal logit, under 1.2e-38, may round apart; its
    exponential is 1 either way)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2 ** 31 - 1, (1_000_000,), generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, bits.shape, generator=g, dtype=torch.int64) << 31
    for pattern in ("any", "tie"):
        b = bits if pattern == "any" else (bits & 0x7FFF0000) | 0x8000
        x = ((b | sign) & 0xFFFFFFFF).to(torch.int64).numpy().astype(np.uint32).view(np.float32)
        normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny) & (np.abs(x) < 1e33)
        x = torch.from_numpy(x[normal].copy())
        c = x * 65537.0
        split = c - (c - x)
        np.testing.assert_array_equal(split.numpy(), x.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("dtype,rounding_effect", [(torch.bfloat16, 2e-3), (torch.float16, 5e-4)])
def test_kernel_rounds_logits_like_timm_under_autocast(dtype, rounding_effect):
    """bf16/fp16 q and k: q * scale and q @ k^T are rounded to that dtype, as in timm's non-fused path."""
    q, k = _qk(2, 2, 50, 16, dtype, seed=1)
    dist = patch_distances((7, 7), (16, 16))
    got = qk_metrics_triton(q, k, 0.25, 1, True, dist, block_m=32, block_n=32)
    ref = reference_metrics(q, k, 0.25, 1, True, (7, 7))
    # summation order may put single logits one ulp apart after rounding (fp16: 2^-11 relative)
    np.testing.assert_allclose(got.cpu().double().numpy(), ref.numpy(), rtol=2e-4, atol=1e-6)
    # ... and not the fp32 map: the rounding moves some values by several times that tolerance
    ref32 = reference_metrics(q.float(), k.float(), 0.25, 1, True, (7, 7)).numpy()
    effect = (np.abs(got.cpu().double().numpy() - ref32) / np.abs(ref32)).max()
    assert effect > rounding_effect


def test_kernel_reads_strided_views_of_qkv():
    q, k = _qk(2, 3, 50, 16, torch.float32, strided=True)
    assert not q.is_contiguous()
    dist = patch_distances((7, 7), (16, 16))
    got = qk_metrics_triton(q, k, 0.25, 1, True, dist, block_m=32, block_n=32)
    np.testing.assert_allclose(got.cpu().double().numpy(),
                               reference_metrics(q, k, 0.25, 1, True, (7, 7)).numpy(), rtol=2e-5, atol=1e-6)


def test_patch_metrics_survive_rows_dominated_by_cls():
    """Rows whose [cls] logit exceeds every patch logit by ~180: the patch probabilities underflow fp32
    (e^-180), yet their renormalised entropy, self ratio and distance are well defined. The kernel and the
    torch q/k route get them from exp(logit - patch max); only a materialised fp32 map loses them."""
    q, k = _qk(1, 2, 50, 16, torch.float32, seed=2)
    q[..., 0] = 20.0
    k[..., 0] = torch.randn(k.shape[:-1], generator=torch.Generator().manual_seed(3)).to(DEVICE) * 0.5
    k[:, :, 0, 0] = 40.0                                   # the [cls] key: logit ~ 20 * 40 / 4 = 200
    dist = patch_distances((7, 7), (16, 16))
    got = qk_metrics_triton(q, k, 0.25, 1, True, dist, block_m=32, block_n=32).cpu().double()
    ref = reference_metrics(q, k, 0.25, 1, True, (7, 7))
    patch_cols = [METRICS.index(m) for m in ("patch_self", "patch_patch_entropy", "attention_distance")]
    assert torch.isfinite(got[..., patch_cols]).all()
    np.testing.assert_allclose(got[..., patch_cols].numpy(), ref[..., patch_cols].numpy(), rtol=1e-4)
    assert got[..., METRICS.index("patch_cls")].min() > 0.999   # the rows really are all [cls]
    torch_route = metrics_from_qk(q.cpu(), k.cpu(), 0.25, 1, True, dist).double()
    np.testing.assert_allclose(torch_route[..., patch_cols].numpy(), ref[..., patch_cols].numpy(), rtol=1e-4)
    fp32_map = attention_metrics(((q.cpu() * 0.25) @ k.cpu().transpose(-2, -1)).softmax(-1), 1, True, dist)
    assert not torch.isfinite(fp32_map[..., patch_cols]).all()


def test_one_distance_matrix_serves_layouts_with_different_prefixes():
    """The kernel's padded copy of the distances is cached per (tensor, prefix count)."""
    dist = patch_distances((7, 7), (16, 16))
    for num_prefix in (1, 5, 1):
        q, k = _qk(1, 2, num_prefix + 49, 16, torch.float32, seed=num_prefix)
        got = qk_metrics_triton(q, k, 0.25, num_prefix, True, dist, block_m=16, block_n=32)
        np.testing.assert_allclose(got.cpu().double().numpy(),
                                   reference_metrics(q, k, 0.25, num_prefix, True, (7, 7)).numpy(), rtol=2e-5, atol=1e-6)


def test_kernel_with_non_square_patches_computes_their_distances():
    """14x16-pixel patches on a 4x6 grid: the distances computed in registers use both patch sides."""
    q, k = _qk(2, 2, 25, 16, torch.float32, seed=4)
    dist = patch_distances((4, 6), (14, 16))
    assert grid_geometry(dist) == (6, 14.0, 16.0)
    got = qk_metrics_triton(q, k, 0.25, 1, True, dist, block_m=16, block_n=16)
    np.testing.assert_allclose(got.cpu().double().numpy(),
                               reference_metrics(q, k, 0.25, 1, True, (4, 6), (14, 16)).numpy(), rtol=2e-5, atol=1e-6)


def test_kernel_reads_any_other_distance_matrix():
    """Squared distances are no patch_distances matrix: the kernel reads them, and its attention distance is
    the patch-renormalised expectation of the matrix, by a float64 loop over rows."""
    q, k = _qk(1, 2, 50, 16, torch.float32, seed=5)
    squared = patch_distances((7, 7), (16, 16)) ** 2
    assert grid_geometry(squared) is None
    with pytest.raises(ValueError, match="needs a patch_distances matrix"):
        qk_metrics_triton(q, k, 0.25, 1, True, squared, distances_from_grid=True)
    got = qk_metrics_triton(q, k, 0.25, 1, True, squared, block_m=32, block_n=16).cpu()
    probs = ((q.cpu() * 0.25) @ k.cpu().transpose(-2, -1)).double().softmax(-1)[0]      # [H, N, N]
    sq = squared.double()
    for head in range(2):
        rows = [(probs[head, i, 1:] / probs[head, i, 1:].sum() * sq[i - 1]).sum() for i in range(1, 50)]
        expected = sum(rows) / len(rows)
        assert got[0, head, METRICS.index("attention_distance")].item() == pytest.approx(expected.item(), rel=2e-5)


def test_grid_geometry_recognises_patch_distance_matrices_only():
    assert grid_geometry(patch_distances((7, 7), (16, 16))) == (7, 16.0, 16.0)
    assert grid_geometry(patch_distances((3, 5), (14, 16))) == (5, 14.0, 16.0)
    one_row = grid_geometry(patch_distances((1, 6), (16, 16)))
    assert one_row == (6, 16.0, 16.0)
    tampered = patch_distances((7, 7), (16, 16))
    tampered[3, 40] += 0.01
    assert grid_geometry(tampered) is None
    assert grid_geometry(torch.rand(49, 49)) is None


def test_autotuning_computes_distances_where_there_is_a_grid_and_pairs_heads_only_when_even():
    from attnflow.kernels.qk_metrics import _CONFIGS, _prune

    with_grid, without = _prune(_CONFIGS, {"GRID_W": 7, "H": 12}), _prune(_CONFIGS, {"GRID_W": 0, "H": 12})
    assert with_grid and all(c.kwargs["DIST_FROM_GRID"] for c in with_grid)
    assert without and not any(c.kwargs["DIST_FROM_GRID"] for c in without)
    assert len(with_grid) + len(without) == len(_CONFIGS)
    assert {c.kwargs["HEADS"] for c in with_grid} == {1, 2}
    odd_heads = _prune(_CONFIGS, {"GRID_W": 7, "H": 3})                 # two heads per program need an even H
    assert odd_heads and all(c.kwargs["HEADS"] == 1 for c in odd_heads)


def test_autotuned_launch_reads_only_the_slots_of_the_config_that_ran(monkeypatch):
    """Triton's autotuner runs every config on the output buffer before the chosen one: trial runs with
    smaller row tiles fill slots the chosen config does not write. The wrapper must read only the chosen
    config's slots. Emulated on CPU: uninitialised (NaN) memory, trial runs of 16- and 32-row tiles, then
    the 64-row config, reported as ``best_config`` as Triton's autotuner does."""
    from types import SimpleNamespace

    from attnflow.kernels import qk_metrics as module

    plain, _ = module._kernels()

    class TrialsThenBest:
        best_config = None

        def __getitem__(self, grid):
            def launch(*args, **flags):
                named = dict(zip(plain.arg_names, args))
                named["OUT"].fill_(float("nan"))                 # the shares buffer, as torch.empty leaves it
                for block_m in (16, 32, 64):                     # trials, then the "best" last
                    tiles = {"BLOCK_M": block_m, "BLOCK_N": 16, "HEADS": 1 if block_m == 64 else 2,
                             "DIST_FROM_GRID": named["GRID_W"] > 0}
                    plain[grid(tiles)](*args, **flags, **tiles)
                self.best_config = SimpleNamespace(kwargs=tiles)
            return launch

    monkeypatch.setattr(module, "_autotuning", lambda: True)
    monkeypatch.setattr(module, "_kernels", lambda: (plain, TrialsThenBest()))
    q, k = _qk(2, 2, 50, 16, torch.float32, seed=6)
    got = qk_metrics_triton(q, k, 0.25, 1, True, patch_distances((7, 7), (16, 16)))
    np.testing.assert_allclose(got.cpu().double().numpy(),
                               reference_metrics(q, k, 0.25, 1, True, (7, 7)).numpy(), rtol=2e-5, atol=1e-6)


def test_kernel_rejects_mismatched_distances_and_tiles():
    q, k = _qk(1, 1, 50, 16, torch.float32)
    with pytest.raises(ValueError, match=r"distances must be \[49, 49\]"):
        qk_metrics_triton(q, k, 0.25, 1, True, patch_distances((6, 6), (16, 16)))
    with pytest.raises(ValueError, match="block_m must be a power of two from 16 to 128, got 256"):
        qk_metrics_triton(q, k, 0.25, 1, True, patch_distances((7, 7), (16, 16)), block_m=256)
    with pytest.raises(ValueError, match="heads_per_program must be 1 or 2 and divide the 1 heads, got 2"):
        qk_metrics_triton(q, k, 0.25, 1, True, patch_distances((7, 7), (16, 16)), heads_per_program=2)


def test_attention_stats_with_kernel_equals_attn_drop_route():
    model = tiny_model("vit_small_patch14_reg4_dinov2", img_size=56)
    images = [torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fast = attention_stats(model, images, device=DEVICE, progress=False, fast_qk=True, qk_kernel="triton",
                           compile=False, amp="fp32")
    slow = attention_stats(model, images, device=DEVICE, progress=False, fast_qk=False, amp="fp32")
    assert fast.meta["qk_kernel"] == "triton" and fast.meta["fast_qk_blocks"] == 2
    assert slow.meta["qk_kernel"] is None
    np.testing.assert_array_equal(fast.frame["count"], slow.frame["count"])
    np.testing.assert_allclose(fast.frame["mean"], slow.frame["mean"], rtol=1e-5, atol=1e-7)


# --- the auto route: the kernel is checked once per shape and replaced by torch if it fails ----------------

@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    """Each test starts with no check done in this process (the route keeps their outcomes process-wide)."""
    monkeypatch.setattr(route_module, "_CHECKED", {})


def _route(monkeypatch, kernel_fn):
    calls = {"reference": 0}

    def reference(*args):
        calls["reference"] += 1
        return metrics_from_qk(*args)

    monkeypatch.setattr(route_module, "triton_supported", lambda device: True)
    monkeypatch.setattr(route_module, "qk_metrics_triton", kernel_fn)
    # "cuda" only picks the kernel; the tensors stay where the kernel runs
    return QKRoute("auto", torch.device("cuda"), metrics_from_qk, reference), calls


def _args(N=50, seed=0):
    q, k = _qk(4, 2, N, 16, torch.float32, seed=seed)
    return q, k, 0.25, 1, True, patch_distances((math.isqrt(N - 1),) * 2, (16, 16), DEVICE)


def test_auto_route_keeps_a_kernel_that_agrees_and_checks_each_shape_once(monkeypatch):
    route, calls = _route(monkeypatch, qk_metrics_triton)
    assert route.name == "triton"
    for seed in range(3):
        route(*_args(seed=seed))
    assert calls["reference"] == 1 and route.name == "triton" and route.fallback_reason is None
    route(*_args(N=65))                                   # a new token count is checked again
    assert calls["reference"] == 2 and route.name == "triton"


def test_a_later_route_in_the_process_reuses_the_check(monkeypatch, caplog):
    route, calls = _route(monkeypatch, qk_metrics_triton)
    route(*_args())
    again, again_calls = _route(monkeypatch, qk_metrics_triton)
    again(*_args(seed=1))
    assert calls["reference"] == 1 and again_calls["reference"] == 0 and again.name == "triton"
    # a disagreement is remembered too: a later route falls back at once, with the same warning
    wrong, _ = _route(monkeypatch, lambda q, k, *a: qk_metrics_triton(q, k, *a) * 1.01)
    wrong(*_args(N=65))
    later, later_calls = _route(monkeypatch, lambda q, k, *a: qk_metrics_triton(q, k, *a) * 1.01)
    with caplog.at_level(logging.WARNING):
        later(*_args(N=65, seed=2))
    assert later_calls["reference"] == 0 and later.name == "torch" and "disagrees" in later.fallback_reason
    assert "continuing with the torch route (qk_kernel torch)" in caplog.text


def test_auto_route_falls_back_when_the_kernel_disagrees(monkeypatch, caplog):
    route, _ = _route(monkeypatch, lambda q, k, *a: qk_metrics_triton(q, k, *a) * 1.01)
    args = _args()
    with caplog.at_level(logging.WARNING):
        values = route(*args)
    assert route.name == "torch" and "disagrees" in route.fallback_reason
    assert "continuing with the torch route (qk_kernel torch)" in caplog.text
    torch.testing.assert_close(values, metrics_from_qk(*[a.cpu() if torch.is_tensor(a) else a for a in args])
                               .to(values.device), equal_nan=True)


def test_auto_route_falls_back_when_the_kernel_cannot_build(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    route, _ = _route(monkeypatch, broken)
    values = route(*_args())
    assert route.name == "torch" and "PTX assembly failed" in route.fallback_reason
    assert values.shape == (4, 2, len(METRICS))


def test_auto_route_is_torch_on_cpu():
    route = QKRoute("auto", torch.device("cpu"), metrics_from_qk, metrics_from_qk)
    assert route.name == "torch"


def test_unknown_or_unavailable_kernel_is_refused(monkeypatch):
    from attnflow.errors import AttnflowError

    with pytest.raises(AttnflowError, match="unknown qk kernel 'cuda'; choose one of auto, triton, torch"):
        QKRoute("cuda", torch.device("cpu"), metrics_from_qk, metrics_from_qk)
    monkeypatch.setattr(route_module, "triton_supported", lambda device: False)  # CPU, no interpreter
    with pytest.raises(AttnflowError, match=r"needs a CUDA device and Triton \(got cpu\); set qk_kernel to torch$"):
        QKRoute("triton", torch.device("cpu"), metrics_from_qk, metrics_from_qk)


def test_disagreement_tolerates_single_bf16_flips_but_not_a_wrong_metric():
    ref = torch.rand(8, 12, len(METRICS)) + 0.5
    one_flip = ref.clone()
    one_flip[3, 5, 0] *= 1.05                              # one logit one bf16 ulp apart
    assert disagreement(one_flip, ref) is None
    wrong_metric = ref.clone()
    wrong_metric[..., METRICS.index("attention_distance")] *= 1.01
    assert "of values differ" in disagreement(wrong_metric, ref)
    nan_mismatch = ref.clone()
    nan_mismatch[0, 0, 0] = float("nan")
    assert "NaN in one route only" in disagreement(nan_mismatch, ref)


def test_kernel_builds_for_ampere_and_hopper_without_a_gpu(tmp_path):
    """Triton's compiler and bundled ptxas build the kernel for sm_80 and sm_90 here: GPU-only build errors
    (layouts, dot shapes, constexpr branches) that the interpreter cannot see fail this test. The first two
    configs are the one-head and the two-head programs. Their hot loops' machine code (SASS) must do what
    the kernel's design says: no conversion instruction (bf16 rounding by Veltkamp's split), one square root
    per distance, shared by the heads of a program, and one exponential per logit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    repo = Path(__file__).resolve().parents[2]
    report = tmp_path / "builds.json"
    run = subprocess.run([sys.executable, str(repo / "benchmarks" / "kernel_resources.py"), "--arch", "80,90",
                          "--dtype", "bf16", "--configs", "2", "--pipes", "--json", str(report)],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    builds = json.loads(report.read_text())
    assert len(builds) == 4 and {b["HEADS"] for b in builds} == {1, 2}, run.stdout
    for build in builds:
        # no spills for one head; two heads run under a register cap (three programs per SM), may spill a little
        assert build["stack_bytes"] <= (0 if build["HEADS"] == 1 else 64), build
        ops = build["hot_loop"]["opcodes"]
        logits_per_head = build["BLOCK_M"] * build["BLOCK_N"] // (32 * build["num_warps"])  # per thread
        assert "F2F" not in ops, build
        assert ops["MUFU.SQRT"] == logits_per_head, build
        assert build["HEADS"] * logits_per_head <= ops["MUFU.EX2"] <= build["HEADS"] * (logits_per_head + 4), build
