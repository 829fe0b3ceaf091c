"""A Triton kernel that turns one block's queries and keys straight into per-head metrics.

The ``fast_qk`` route (:class:`~attnflow.tap.QueryKey`) lets timm keep flash attention and rebuilds the map
``softmax((q * scale) @ k^T)`` for the statistics. In torch that map, ``[B, H, N, N]`` fp32, is written and
read several times per block, which on a GPU costs more than the attention itself. This kernel never
materialises it: one program per (image, one or two heads, tile of query rows) reduces its tile's logits,
computed in registers, to that tile's share of the seven metrics of :data:`~attnflow.metrics.METRICS`, and
the wrapper adds up the shares of the tiles. It reads ``q`` and ``k`` and writes ``[B, H, tiles, 7]``; the
distance ``d_ij`` between patch centres is computed in registers from a table of the centres when the
distance matrix is a :func:`~attnflow.metrics.patch_distances` one (:func:`grid_geometry`), else read from
the matrix, and two heads of a program share it. Rows and keys past the last full tile go in tiles of 16,
so a 197-token ViT-B/16 pads each head to 208 x 208 logits, not 256 x 224.

Per query row ``i`` with logits ``s_j``:

- over the patch keys, an online softmax (as in flash attention) keeps the running max ``mp`` and, with
  ``u_j = (s_j - mp) log2(e)`` (one FMA per logit) and ``exp(s_j - mp) = 2^u_j``, ``ep = sum 2^u_j`` (>= 1,
  so it never underflows), ``epl = sum 2^u_j u_j`` and ``epd = sum 2^u_j d_ij``, rescaled whenever ``mp``
  grows;
- the few prefix keys ([cls], registers) and the row's own key (the diagonal) get one logit vector each.

Then the patch-renormalised entropy is ``log(ep) - ln(2) epl / ep``, ``patch_self = exp(s_ii - mp) / ep``, the
distance is ``epd / ep``; with ``m`` the max over all keys and ``z`` the full softmax denominator relative to
it, ``patch_cls = exp(s_i0 - m) / z`` and the [cls] patch mass is ``ep exp(mp - m) / z``. The patch metrics
are averaged over patch rows; the [cls] ones are read from row 0.

Logits are rounded to the input dtype before the softmax, as timm's non-fused path does under autocast
(``(q * scale)`` and ``q @ k^T`` in bf16, softmax in fp32), so the kernel reproduces the map the
``attn_drop`` route taps, up to the summation order of the dot products
(which can put a rare logit one bf16 ulp apart).

Triton ships with CUDA builds of torch; without it this module still imports and the torch route runs.
Under ``TRITON_INTERPRET=1`` the kernel also runs on CPU tensors (slowly), which is how the CPU test suite
checks its arithmetic; ``benchmarks/kernel_resources.py`` builds it for sm_80/sm_90 without a GPU.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from typing import Any, Callable

import torch

from ..metrics import CLS_METRICS, METRICS, patch_distances

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds may lack Triton; the torch route needs none
    triton = None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supported(device: torch.device | str) -> bool:
    """Whether the kernel can run for tensors on ``device``: CUDA with Triton importable, or any device
    under ``TRITON_INTERPRET=1``."""
    if triton is None:
        return False
    return interpreting() or torch.device(device).type == "cuda"



if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    LN2 = tl.constexpr(0.6931471805599453)
    VERY_NEGATIVE = tl.constexpr(-1.0e30)  # a finite "-inf": (m_old - m_new) * 0 stays 0 on the first tile
    TAIL = tl.constexpr(16)                # rows and keys past the last full tile go in tiles of 16 (tl.dot's least)

    @triton.jit
    def round_as(x, like, UPCAST: tl.constexpr):
        """fp32 ``x`` rounded to ``like``'s dtype (nearest even), returned as fp32.

        bf16 by Veltkamp's split, ``c = x (2^16 + 1)``, ``x' = c - (c - x)``: three fp32 operations that give
        the nearest-even bf16 of any normal ``|x| < 5e33`` (checked bit for bit in the tests), where the
        conversion instruction would run on the GPU's slow conversion unit, which the exponentials already
        keep busy. ``.rn`` keeps ptxas from fusing the product into an FMA, which would skip its rounding."""
        if like.dtype == tl.bfloat16:
            if UPCAST:  # the interpreter has no inline PTX (and truncates fp32 -> bf16): round the bits
                bits = x.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                y = bits.to(tl.float32, bitcast=True)
            else:
                y = tl.inline_asm_elementwise(
                    "{ .reg .f32 c, t; mul.rn.f32 c, $1, 0f47800080; sub.rn.f32 t, c, $1; sub.rn.f32 $0, c, t; }",
                    "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            y = x.to(like.dtype).to(tl.float32)
        return y

    @triton.jit
    def fast_exp2(x, UPCAST: tl.constexpr):
        """``2^x`` as one ``ex2.approx.ftz`` (2 ulp; results below 1e-38 flush to 0), where ``tl.exp2`` also
        emits the denormal range fix-up: the per-element exponential is the kernel's hottest instruction."""
        if UPCAST:  # the interpreter has no inline PTX
            y = tl.exp2(x)
        else:
            y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                          is_pure=True, pack=1)
        return y

    @triton.jit
    def logits(q, k, ROUND: tl.constexpr, UPCAST: tl.constexpr):
        """``q @ k`` (``[BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N]``) in fp32, rounded to ``k``'s dtype if ROUND.

        fp32 inputs use a true fp32 product (no TF32), as torch's default matmul does."""
        if UPCAST:  # the interpreter's dot mishandles bf16; bf16 products are exact in fp32
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        elif k.dtype == tl.float32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if ROUND:
            s = round_as(s, k, UPCAST)
        return s

    @triton.jit
    def row_dot(q, k_row, ROUND: tl.constexpr, UPCAST: tl.constexpr):
        """``[BLOCK_M]`` logits of each query row with one key row each (``k_row``: ``[BLOCK_D]`` broadcast
        or ``[BLOCK_M, BLOCK_D]``), fp32 sums of exact products, rounded like :func:`logits`."""
        s = tl.sum(q.to(tl.float32) * k_row.to(tl.float32), 1)
        if ROUND:
            s = round_as(s, k_row, UPCAST)
        return s

    @triton.jit
    def key_distances(DIST, stride_dist, COORDS, stride_coord, rows, cols, row_y, row_x,
                      DIST_FROM_GRID: tl.constexpr):
        """``[BLOCK_M, BLOCK_N]`` distances from query rows ``rows`` (token index) to patches ``cols``."""
        if DIST_FROM_GRID:  # Euclidean distance of the patch centres, as patch_distances computes it
            dy = row_y[:, None] - tl.load(COORDS + cols)[None, :]
            dx = row_x[:, None] - tl.load(COORDS + stride_coord + cols)[None, :]
            d = tl.sqrt(dy * dy + dx * dx)
        else:  # DIST is indexed by token row and patch column, zero-padded past every tile: no mask
            d = tl.load(DIST + rows[:, None] * stride_dist + cols[None, :])
        return d

    @triton.jit
    def patch_key_step(q, k_base, rows, cols, offs_d, d_ok, d, NUM_PREFIX, N_PATCH, stride_kn, stride_kd,
                       DIST, stride_dist, COORDS, stride_coord, row_y, row_x, m_p, ep, epl, epd,
                       OWN_D: tl.constexpr, MASKED: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
                       DIST_FROM_GRID: tl.constexpr):
        """One online-softmax step of one head over the patch keys ``cols``: the running max ``m_p``
        (natural units) and the sums ``ep``, ``epl`` (base 2), ``epd`` of the rows, updated and returned with
        the distances ``d`` from the rows to ``cols``, which the step computes if OWN_D (after the
        exponentials, so that they and the logits are not live at once), else takes from the head before.
        Only a MASKED tile may reach past the last patch."""
        k_ptrs = k_base + (cols + NUM_PREFIX)[None, :] * stride_kn + offs_d[:, None] * stride_kd
        if MASKED:
            k = tl.load(k_ptrs, mask=d_ok[:, None] & (cols < N_PATCH)[None, :], other=0.0)
            # columns past the last patch get a finite -1e30: their exp is 0 and 0 * u stays 0
            s = logits(q, k, ROUND, UPCAST) + tl.where(cols < N_PATCH, 0.0, VERY_NEGATIVE)[None, :]
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            s = logits(q, k, ROUND, UPCAST)
        m_new = tl.maximum(m_p, tl.max(s, 1))
        alpha = tl.exp2((m_p - m_new) * LOG2E)
        # base 2: u = (s - m_new) log2(e) in one FMA per logit, e = 2^u = exp(s - m_new)
        u = s * LOG2E - (m_new * LOG2E)[:, None]
        e = fast_exp2(u, UPCAST)
        if OWN_D:
            d = key_distances(DIST, stride_dist, COORDS, stride_coord, rows, cols, row_y, row_x, DIST_FROM_GRID)
        epl = alpha * (epl + (m_p - m_new) * LOG2E * ep) + tl.sum(e * u, 1)
        ep = alpha * ep + tl.sum(e, 1)
        epd = alpha * epd + tl.sum(e * d, 1)
        return m_new, ep, epl, epd, d

    @triton.jit
    def key_tiles(q0, q1, k_base, stride_kh, rows, offs_d, d_ok, start, stop, NUM_PREFIX, N_PATCH, stride_kn,
                  stride_kd, DIST, stride_dist, COORDS, stride_coord, row_y, row_x, m_p0, ep0, epl0, epd0,
                  m_p1, ep1, epl1, epd1, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HEADS: tl.constexpr,
                  ROUND: tl.constexpr, UPCAST: tl.constexpr, DIST_FROM_GRID: tl.constexpr):
        """:func:`patch_key_step` over the key tiles ``[start, stop)`` of BLOCK_N keys, for the program's
        first head and, when HEADS is 2, its second (``k_base + stride_kh``), which reuses each tile's
        distances. Returns both heads' running state (the second unchanged when HEADS is 1)."""
        for start_n in range(start, stop, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            m_p0, ep0, epl0, epd0, d = patch_key_step(
                q0, k_base, rows, cols, offs_d, d_ok, 0.0, NUM_PREFIX, N_PATCH, stride_kn, stride_kd, DIST,
                stride_dist, COORDS, stride_coord, row_y, row_x, m_p0, ep0, epl0, epd0, True, MASKED, ROUND,
                UPCAST, DIST_FROM_GRID)
            if HEADS == 2:
                m_p1, ep1, epl1, epd1, d = patch_key_step(
                    q1, k_base + stride_kh, rows, cols, offs_d, d_ok, d, NUM_PREFIX, N_PATCH, stride_kn, stride_kd,
                    DIST, stride_dist, COORDS, stride_coord, row_y, row_x, m_p1, ep1, epl1, epd1, False, MASKED,
                    ROUND, UPCAST, DIST_FROM_GRID)
        return m_p0, ep0, epl0, epd0, m_p1, ep1, epl1, epd1

    @triton.jit
    def scaled_queries(q_base, rows, row_ok, offs_d, d_ok, stride_qn, stride_qd, scale, UPCAST: tl.constexpr):
        """``[BLOCK_M, BLOCK_D]`` queries times the scale, rounded to their dtype (timm scales q first)."""
        q_in = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q = round_as(q_in.to(tl.float32) * scale, q_in, UPCAST)
        if not UPCAST:
            q = q.to(q_in.dtype)
        return q

    @triton.jit
    def prefix_sums(q, k_base, offs_d, d_ok, NUM_PREFIX, stride_kn, stride_kd, BLOCK_M: tl.constexpr,
                    ROUND: tl.constexpr, UPCAST: tl.constexpr):
        """The prefix keys ([cls], registers): few, so one logit vector each. Per row, their max ``m_pre``,
        ``sum exp(s - m_pre)`` and [cls]'s term ``exp(s_0 - m_pre)``."""
        m_pre = tl.full([BLOCK_M], VERY_NEGATIVE, tl.float32)
        z_pre = tl.zeros([BLOCK_M], tl.float32)
        e_cls = tl.zeros([BLOCK_M], tl.float32)
        for j in range(0, NUM_PREFIX):
            k_j = tl.load(k_base + j * stride_kn + offs_d * stride_kd, mask=d_ok, other=0.0)
            s_j = row_dot(q, k_j[None, :], ROUND, UPCAST)
            m_new = tl.maximum(m_pre, s_j)
            alpha = tl.exp(m_pre - m_new)
            e_j = tl.exp(s_j - m_new)
            z_pre = z_pre * alpha + e_j
            e_cls = tl.where(j == 0, e_j, e_cls * alpha)
            m_pre = m_new
        return m_pre, z_pre, e_cls

    @triton.jit
    def row_shares(q, k_base, rows, row_ok, offs_d, d_ok, N_PATCH, NUM_PREFIX, stride_kn, stride_kd,
                   m_pre, z_pre, e_cls, m_p, ep, epl, epd, ROUND: tl.constexpr, UPCAST: tl.constexpr):
        """``[8]``: the seven metrics' shares (METRICS order, then a 0) of one head's rows ``rows``:
        patch-row sums divided by the patch count, [cls]-row values where ``rows`` hold row 0."""
        row_is_patch = row_ok & (rows >= NUM_PREFIX)
        # each patch row's own key (the diagonal), directly
        k_diag = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=row_is_patch[:, None] & d_ok[None, :], other=0.0)
        e_diag = tl.exp(row_dot(q, k_diag, ROUND, UPCAST) - m_p)

        ep_safe = tl.where(row_ok, ep, 1.0)
        m_all = tl.maximum(m_pre, m_p)
        patch_share = ep_safe * tl.exp(m_p - m_all)                  # sum over patches of exp(s - m_all)
        z = patch_share + z_pre * tl.exp(m_pre - m_all)
        to_cls = e_cls * tl.exp(m_pre - m_all) / z
        entropy = tl.log(ep_safe) - LN2 * epl / ep_safe
        first = rows == 0
        # in METRICS order: cls_self, cls_patch_entropy, cls_patch_mass, patch_cls, patch_self,
        # patch_patch_entropy, attention_distance
        slot = tl.arange(0, 8)
        return (tl.where(slot == 0, tl.sum(tl.where(first, to_cls, 0.0), 0), 0.0)
                + tl.where(slot == 1, tl.sum(tl.where(first, entropy, 0.0), 0), 0.0)
                + tl.where(slot == 2, tl.sum(tl.where(first, patch_share / z, 0.0), 0), 0.0)
                + tl.where(slot == 3, tl.sum(tl.where(row_is_patch, to_cls, 0.0), 0) / N_PATCH, 0.0)
                + tl.where(slot == 4, tl.sum(tl.where(row_is_patch, e_diag / ep_safe, 0.0), 0) / N_PATCH, 0.0)
                + tl.where(slot == 5, tl.sum(tl.where(row_is_patch, entropy, 0.0), 0) / N_PATCH, 0.0)
                + tl.where(slot == 6, tl.sum(tl.where(row_is_patch, epd / ep_safe, 0.0), 0) / N_PATCH, 0.0))

    @triton.jit
    def row_tile_shares(q_base, k_base, stride_qh, stride_kh, DIST, stride_dist, COORDS, stride_coord, start_m,
                        stride_qn, stride_qd, stride_kn, stride_kd, N, NUM_PREFIX, N_PATCH, scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEADS: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr,
                        DIST_FROM_GRID: tl.constexpr):
        """The ``[8]`` shares (:func:`row_shares`) of the query rows ``start_m + [0, BLOCK_M)`` of one head,
        and of the next head when HEADS is 2 (else zeros): the two heads share each tile's distances."""
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        q0 = scaled_queries(q_base, rows, row_ok, offs_d, d_ok, stride_qn, stride_qd, scale, UPCAST)
        m_pre0, z_pre0, e_cls0 = prefix_sums(q0, k_base, offs_d, d_ok, NUM_PREFIX, stride_kn, stride_kd, BLOCK_M,
                                             ROUND, UPCAST)
        q1 = q0         # the second head's queries: unused when HEADS is 1
        m_pre1 = m_pre0
        z_pre1 = z_pre0
        e_cls1 = e_cls0
        if HEADS == 2:
            q1 = scaled_queries(q_base + stride_qh, rows, row_ok, offs_d, d_ok, stride_qn, stride_qd, scale, UPCAST)
            m_pre1, z_pre1, e_cls1 = prefix_sums(q1, k_base + stride_kh, offs_d, d_ok, NUM_PREFIX, stride_kn,
                                                 stride_kd, BLOCK_M, ROUND, UPCAST)

        # patch centres (pixels) of the query rows, from the table of patch centres (DIST_FROM_GRID), which
        # is padded past every tile; prefix rows read patch 0's and are not counted
        row_patch = tl.maximum(rows - NUM_PREFIX, 0)
        if DIST_FROM_GRID:
            row_y = tl.load(COORDS + row_patch)
            row_x = tl.load(COORDS + stride_coord + row_patch)
        else:
            row_y = tl.zeros([BLOCK_M], tl.float32)
            row_x = row_y

        # patch keys: online softmax over key tiles (as in flash attention), every sum relative to the
        # running patch max m_p and rescaled whenever it grows; full tiles unmasked, then the rest in
        # masked tiles of 16 keys
        m_p0 = tl.full([BLOCK_M], VERY_NEGATIVE, tl.float32)
        ep0 = tl.zeros([BLOCK_M], tl.float32)       # sum e,          e = exp(s - m_p)
        epl0 = tl.zeros([BLOCK_M], tl.float32)      # sum e (s - m_p) log2(e)
        epd0 = tl.zeros([BLOCK_M], tl.float32)      # sum e d
        m_p1 = m_p0     # the second head's state: carried unchanged when HEADS is 1
        ep1 = ep0
        epl1 = epl0
        epd1 = epd0
        n_full = (N_PATCH // BLOCK_N) * BLOCK_N
        m_p0, ep0, epl0, epd0, m_p1, ep1, epl1, epd1 = key_tiles(
            q0, q1, k_base, stride_kh, rows, offs_d, d_ok, 0, n_full, NUM_PREFIX, N_PATCH, stride_kn, stride_kd,
            DIST, stride_dist, COORDS, stride_coord, row_y, row_x, m_p0, ep0, epl0, epd0, m_p1, ep1, epl1, epd1,
            BLOCK_N, False, HEADS, ROUND, UPCAST, DIST_FROM_GRID)
        m_p0, ep0, epl0, epd0, m_p1, ep1, epl1, epd1 = key_tiles(
            q0, q1, k_base, stride_kh, rows, offs_d, d_ok, n_full, N_PATCH, NUM_PREFIX, N_PATCH, stride_kn,
            stride_kd, DIST, stride_dist, COORDS, stride_coord, row_y, row_x, m_p0, ep0, epl0, epd0, m_p1, ep1,
            epl1, epd1, TAIL, True, HEADS, ROUND, UPCAST, DIST_FROM_GRID)

        shares0 = row_shares(q0, k_base, rows, row_ok, offs_d, d_ok, N_PATCH, NUM_PREFIX, stride_kn, stride_kd,
                             m_pre0, z_pre0, e_cls0, m_p0, ep0, epl0, epd0, ROUND, UPCAST)
        shares1 = tl.zeros([8], tl.float32)
        if HEADS == 2:
            shares1 = row_shares(q1, k_base + stride_kh, rows, row_ok, offs_d, d_ok, N_PATCH, NUM_PREFIX,
                                 stride_kn, stride_kd, m_pre1, z_pre1, e_cls1, m_p1, ep1, epl1, epd1, ROUND, UPCAST)
        return shares0, shares1

    @triton.jit
    def qk_metrics_kernel(
        Q, K, DIST, COORDS, OUT, stride_dist, stride_coord, stride_out_bh,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        H, N, NUM_PREFIX, N_PATCH, scale, GRID_W,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEADS: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr, DIST_FROM_GRID: tl.constexpr,
    ):
        # one program per (image, HEADS heads, tile of BLOCK_M query rows); the tiles of one head are
        # neighbours in launch order, so they run together and read that head's keys from L2. GRID_W
        # (0: distances read) is only the autotuner's key
        n_tiles = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0) // n_tiles                   # (image * H + first head) / HEADS
        tile = tl.program_id(0) % n_tiles
        b = pid // (H // HEADS)
        h = (pid % (H // HEADS)) * HEADS
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
        n_full = N // BLOCK_M
        if tile < n_full:
            shares0, shares1 = row_tile_shares(
                q_base, k_base, stride_qh, stride_kh, DIST, stride_dist, COORDS, stride_coord, tile * BLOCK_M,
                stride_qn, stride_qd, stride_kn, stride_kd, N, NUM_PREFIX, N_PATCH, scale, HEAD_DIM, BLOCK_D,
                BLOCK_M, BLOCK_N, HEADS, ROUND, UPCAST, DIST_FROM_GRID)
        else:  # the last program of a head: the rows past the full tiles, in tiles of 16 (not padded to BLOCK_M)
            shares0 = tl.zeros([8], tl.float32)
            shares1 = tl.zeros([8], tl.float32)
            for start_m in range(n_full * BLOCK_M, N, TAIL):
                part0, part1 = row_tile_shares(
                    q_base, k_base, stride_qh, stride_kh, DIST, stride_dist, COORDS, stride_coord, start_m,
                    stride_qn, stride_qd, stride_kn, stride_kd, N, NUM_PREFIX, N_PATCH, scale, HEAD_DIM, BLOCK_D,
                    TAIL, BLOCK_N, HEADS, ROUND, UPCAST, DIST_FROM_GRID)
                shares0 += part0
                shares1 += part1
        # each tile's shares in its own slot; the wrapper sums the slots, so no atomics and a fixed order
        slot = tl.arange(0, 8)
        out = OUT + (b * H + h).to(tl.int64) * stride_out_bh + tile * 7
        tl.store(out + slot, shares0, mask=slot < 7)
        if HEADS == 2:
            tl.store(out + stride_out_bh + slot, shares1, mask=slot < 7)

    # Tiles whose warps split only the query rows keep the row reductions inside a warp (BLOCK_M = 16 per
    # warp, or 64 per warpgroup on Hopper); benchmarks/kernel_resources.py builds each for sm_80/sm_90 and
    # reports its registers and a static model of its hot loop (its pipes mode). The autotuner picks per (token
    # count, heads, head size, prefix count, grid) on the GPU at hand. On an H100
    # (benchmarks/results/h100_qk_kernel_configs_b256.json, ViT-B/16 bf16, 224 and 448 px) every config that
    # computes the distances beat every one that reads them, and a two-pass variant (exact row max first, no
    # rescaling) lost to one pass at every tile: the one-head tiles are the three leaders there. Two heads per
    # program share each tile's distances, which takes a quarter off the conversion-unit work that bounds the
    # hot loop in the static model; they need more registers, capped (maxnreg) so that three programs of 4
    # warps fit an SM. The leader again with at most 96 registers fits five programs per SM instead of four
    # (it spills 64 bytes, outside the hot loop). Not timed on a GPU yet: the autotuner decides.
    _GRID_TILES = ((64, 32, 4, 1, None), (64, 16, 4, 2, 168), (32, 16, 2, 1, None), (64, 64, 4, 1, None),
                   (64, 32, 4, 2, 168), (32, 16, 2, 2, None), (64, 32, 4, 1, 96))
    _READ_TILES = ((32, 16, 2, 1, None), (64, 32, 4, 1, None), (64, 16, 4, 1, None), (64, 64, 4, 1, None))
    _CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "HEADS": heads, "DIST_FROM_GRID": from_grid},
                              num_warps=w, num_stages=2, maxnreg=maxnreg)
                for from_grid, tiles in ((True, _GRID_TILES), (False, _READ_TILES))
                for bm, bn, w, heads, maxnreg in tiles]

    def _prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        """Distances computed from the grid where there is one (``GRID_W > 0``), else read; two heads per
        program only for an even head count."""
        has_grid = named_args["GRID_W"] > 0
        return [c for c in configs
                if c.kwargs["DIST_FROM_GRID"] == has_grid and named_args["H"] % c.kwargs["HEADS"] == 0]

    _AUTOTUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    tuned = triton.autotune(_CONFIGS, key=["N", "H", "HEAD_DIM", "NUM_PREFIX", "GRID_W"],
                            prune_configs_by={"early_config_prune": _prune}, **_AUTOTUNE_KW)(qk_metrics_kernel)


def _kernels() -> tuple[Any, Any]:
    """(plain kernel, autotuned kernel)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use the torch route (qk_kernel='torch')")
    return qk_metrics_kernel, tuned


_MAX_TILE = 128
"""Largest BLOCK_M / BLOCK_N of any config: the padding of :func:`_padded_distances`."""
_MIN_TILE = 16
"""Smallest BLOCK_M / BLOCK_N (``tl.dot`` needs 16): the row-tile count the shares buffer is sized for."""

_per_tensor: dict[int, tuple[weakref.ref, dict[tuple, Any]]] = {}
"""id(distances) -> (weak reference to it, what was derived from it); tensors hash by identity but compare
elementwise, so a WeakKeyDictionary cannot hold them."""


def _derived(distances: torch.Tensor, key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, computed once per ``distances`` tensor (while it lives) and ``key``."""
    entry = _per_tensor.get(id(distances))
    if entry is None or entry[0]() is not distances:
        for stale in [k for k, (ref, _) in _per_tensor.items() if ref() is None]:
            del _per_tensor[stale]
        entry = _per_tensor[id(distances)] = (weakref.ref(distances), {})
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def _padded_distances(distances: torch.Tensor, num_prefix: int, device: torch.device) -> torch.Tensor:
    """``distances`` placed at rows ``num_prefix:`` (token index) of a zero matrix whose rows and columns are
    padded to a multiple of the largest tile, so the kernel loads tiles without masks (and, with a row stride
    divisible by 16, vectorised). Cached per ``distances`` tensor while it lives.

    Returns:
        ``[round_up(num_prefix + n_patches), round_up(n_patches)]`` float32 on ``device``.
    """
    def build() -> torch.Tensor:
        n_patch = distances.shape[0]
        rows = -(-(num_prefix + n_patch) // _MAX_TILE) * _MAX_TILE
        cols = -(-n_patch // _MAX_TILE) * _MAX_TILE
        padded = torch.zeros(rows, cols, device=device, dtype=torch.float32)
        padded[num_prefix:num_prefix + n_patch, :n_patch] = distances.to(device=device, dtype=torch.float32)
        return padded

    return _derived(distances, ("padded", num_prefix, str(device)), build)


def _patch_centres(distances: torch.Tensor, geometry: tuple[int, float, float], device: torch.device) -> torch.Tensor:
    """Row ``0``: the y, row ``1``: the x of each patch centre (pixels, row-major patches), from ``geometry``
    (:func:`grid_geometry`); zero past the last patch and padded by a full tile more than any tile reaches,
    so the kernel loads it without masks. Cached per ``distances`` tensor while it lives.

    Returns:
        ``[2, round_up(n_patches) + max tile]`` float32 on ``device``.
    """
    def build() -> torch.Tensor:
        grid_w, patch_h, patch_w = geometry
        n_patch = distances.shape[0]
        patches = torch.arange(n_patch, dtype=torch.float64)
        centres = torch.zeros(2, -(-n_patch // _MAX_TILE) * _MAX_TILE + _MAX_TILE, dtype=torch.float64)
        centres[0, :n_patch] = torch.div(patches, grid_w, rounding_mode="floor") * patch_h
        centres[1, :n_patch] = torch.remainder(patches, grid_w) * patch_w
        return centres.to(device=device, dtype=torch.float32)

    return _derived(distances, ("centres", str(device)), build)


def grid_geometry(distances: torch.Tensor) -> tuple[int, float, float] | None:
    """``(grid width, patch height, patch width)`` if ``distances`` is the matrix
    :func:`~attnflow.metrics.patch_distances` gives for some grid and patch size (checked elementwise to
    1e-3 px), else ``None``. The kernel then computes each distance in registers instead of reading the
    matrix; cached per tensor while it lives.
    """
    return _derived(distances, ("geometry",), lambda: _infer_geometry(distances))


def _infer_geometry(distances: torch.Tensor) -> tuple[int, float, float] | None:
    """Read the grid from the first row (patch 0 to every patch, row-major), then check the whole matrix."""
    n = distances.shape[0]
    if distances.dim() != 2 or n < 2 or distances.shape != (n, n):
        return None
    first = distances[0].double().cpu()
    if abs(float(first[0])) > 1e-3:
        return None
    patch_w = float(first[1])
    along = torch.arange(n, dtype=torch.float64) * patch_w       # patch 0 to patch j on the first row
    off_row = (first - along).abs() > 1e-3
    grid_w = int(off_row.nonzero()[0]) if off_row.any() else n
    if n % grid_w:
        return None
    patch_h = float(first[grid_w]) if grid_w < n else patch_w
    if patch_w <= 0 or patch_h <= 0:
        return None
    expected = patch_distances((n // grid_w, grid_w), (patch_h, patch_w), distances.device)
    if not torch.allclose(distances.float(), expected, rtol=0.0, atol=1e-3):
        return None
    return grid_w, patch_h, patch_w


def _autotuning() -> bool:
    """Whether a launch without explicit tiles goes through the autotuner (not under the interpreter)."""
    return not interpreting()


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def qk_metrics_triton(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, has_cls: bool,
                      distances: torch.Tensor, *, block_m: int | None = None,
                      block_n: int | None = None, heads_per_program: int | None = None,
                      distances_from_grid: bool | None = None) -> torch.Tensor:
    """Metrics of ``softmax((q * scale) @ k^T)`` per image and head, without materialising the map.

    Same contract as :func:`attnflow.stats.metrics_from_qk` (the torch route it replaces).

    Args:
        q, k: ``[B, H, N, d]`` queries and keys (any strides; fp32, bf16 or fp16), ``N = num_prefix +
            n_patches``.
        scale: the block's softmax scale.
        num_prefix: prefix tokens before the patches; has_cls: token 0 is [cls] (else [cls] columns NaN).
        distances: ``[n_patches, n_patches]`` patch distances (:func:`~attnflow.metrics.patch_distances`).
        block_m, block_n: query/key tile sizes (powers of two, 16 to 128); heads_per_program: 1, or 2 (for
            an even ``H``) heads per program, which then share each tile's distances. Default: all three
            autotuned on CUDA; 32, 32 and 1 when any is given or under the interpreter.
        distances_from_grid: compute each distance in registers from the patch grid instead of reading
            ``distances``: the default whenever ``distances`` is a
            :func:`~attnflow.metrics.patch_distances` matrix (:func:`grid_geometry`); ``False`` reads it.

    Returns:
        ``[B, H, M]`` float32 in :data:`~attnflow.metrics.METRICS` order.
    """
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, N, d = q.shape
    n_patch = N - num_prefix
    if distances.shape != (n_patch, n_patch):
        raise ValueError(f"distances must be [{n_patch}, {n_patch}] for {N} tokens with {num_prefix} prefix "
                         f"tokens, got {tuple(distances.shape)}")
    for name, tile in (("block_m", block_m), ("block_n", block_n)):
        if tile is not None and (tile < _MIN_TILE or tile > _MAX_TILE or tile & (tile - 1)):
            raise ValueError(f"{name} must be a power of two from {_MIN_TILE} to {_MAX_TILE}, got {tile}")
    if heads_per_program not in (None, 1, 2) or H % (heads_per_program or 1):
        raise ValueError(f"heads_per_program must be 1 or 2 and divide the {H} heads, got {heads_per_program}")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    plain, tuned = _kernels()
    # each row tile stores its share in its slot; sized for the smallest tile. Only the slots of the tile size
    # that ran are read: the autotuner's trial runs of other sizes leave values in the others
    shares = torch.empty(B, H, -(-N // _MIN_TILE), len(METRICS), device=q.device, dtype=torch.float32)
    geometry = grid_geometry(distances)
    if distances_from_grid and geometry is None:
        raise ValueError("distances_from_grid=True needs a patch_distances matrix; these distances are not one")
    # distances computed from a table of patch centres, or read from a padded copy of the matrix; the one
    # not used is replaced by any fp32 tensor
    if geometry is not None and distances_from_grid is not False:
        dist, centres, grid_w = shares, _patch_centres(distances, geometry, q.device), geometry[0]
    else:
        dist, centres, grid_w = _padded_distances(distances, num_prefix, q.device), shares, 0
    args = (q, k, dist, centres, shares, dist.stride(0), centres.stride(0), shares.stride(1), *q.stride(),
            *k.stride(), H, N, num_prefix, n_patch, float(scale), grid_w)
    flags = {"HEAD_DIM": d, "BLOCK_D": _block_d(d), "ROUND": q.dtype != torch.float32,
             "UPCAST": interpreting()}
    explicit = {"BLOCK_M": block_m or 32, "BLOCK_N": block_n or 32, "HEADS": heads_per_program or 1,
                "DIST_FROM_GRID": grid_w > 0}
    autotune = _autotuning() and block_m is None and block_n is None and heads_per_program is None

    def grid(meta: dict) -> tuple[int]:
        return (B * (H // meta["HEADS"]) * triton.cdiv(N, meta["BLOCK_M"]),)

    # Triton launches on the current CUDA device: make it the tensors' one (e.g. cuda:3 in a torchrun job)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if autotune:
            tuned[grid](*args, **flags)
            ran_block_m = tuned.best_config.kwargs["BLOCK_M"]   # the config of the launch just made
        else:
            plain[grid](*args, **flags, **explicit)
            ran_block_m = explicit["BLOCK_M"]
    values = shares[:, :, :triton.cdiv(N, ran_block_m)].sum(2)
    if not has_cls:
        values[..., [METRICS.index(m) for m in CLS_METRICS]] = float("nan")
    return values
