"""CAPI's ViT encoder (Darcet et al. 2025, facebookresearch/capi ``model.py``), written for attnflow.

timm has no equivalent: CAPI uses RMSNorm (eps 1e-5, weight only), linear layers without biases, separate
q/k/v projections, 2-D rotary position embeddings whose frequencies are stored in every block, 16 register
tokens placed on the image border and no [cls] token. This module reproduces the encoder's forward pass so
that the official weights (converted by the ``capi`` converter) give the official encoder output, and it
follows timm's ViT conventions so the attention tap works:

- ``model.blocks[i].attn.fused_attn`` selects ``scaled_dot_product_attention``; when it is ``False`` the
  post-softmax map ``[B, H, N, N]`` is passed through ``model.blocks[i].attn.attn_drop`` (an identity);
- tokens are ordered ``[16 registers, patches row-major]``: ``num_prefix_tokens == 16``,
  ``has_class_token is False``, ``cls_token is None``;
- ``forward_features(x) -> [B, 16 + N, D]`` (after the parameter-free final RMSNorm, as CAPI's ``enc_norm``).

The decoder (used by CAPI only for its global representation) is not built; ``forward`` returns the mean of
the patch tokens, the pooled feature attnflow's probes start from.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, RmsNorm, use_fused_attn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope2d(nn.Module):
    """Rotary embedding driven by 2-D coordinates: ``angle = coords @ freqs``, ``freqs: [2, head_dim]``.

    The frequencies are a parameter (stored in CAPI's files, trained with learning rate 0). Their
    initialisation: ``head_dim // 4`` angular frequencies ``2*pi*max_freq*(max_freq/min_freq)^-t``,
    ``t`` evenly spaced in [0, 1], repeated twice; the first half of the channels follows the first
    coordinate (row), the second half the second coordinate (column).
    """

    def __init__(self, head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_freq = max_freq
        self.min_freq = min_freq
        self.freqs = nn.Parameter(torch.empty(2, head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        quarter = self.head_dim // 4
        steps = torch.linspace(0, -1, quarter, dtype=torch.float64)
        base = self.max_freq * (self.max_freq / self.min_freq) ** steps
        base = torch.cat([base, base])
        freqs = torch.zeros(2, self.head_dim, dtype=torch.float64)
        freqs[0, : self.head_dim // 2] = base
        freqs[1, self.head_dim - self.head_dim // 2:] = base
        with torch.no_grad():
            self.freqs.copy_((freqs * 2 * math.pi).to(self.freqs.dtype))

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, N, head_dim]`` by the angles of ``coords`` ``[B, 1, N, 2]``."""
        angle = coords @ self.freqs  # [B, 1, N, head_dim]
        return x * angle.cos() + rotate_half(x) * angle.sin()


class CapiAttention(nn.Module):
    """Multi-head self-attention with bias-free q/k/v/out projections and 2-D RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = Rope2d(self.head_dim)
        self.attn_drop = nn.Identity()  # the attention tap's hook point: sees [B, H, N, N] post-softmax

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, N, D]``, ``coords``: ``[B, N, 2]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, N, hd]
        k = self.k_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.rope(q, coords[:, None])
        k = self.rope(k, coords[:, None])
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class CapiMlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` without biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CapiBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (no layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=eps)
        self.attn = CapiAttention(dim, num_heads)
        self.norm2 = RmsNorm(dim, eps=eps)
        self.mlp = CapiMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), coords)
        return x + self.mlp(self.norm2(x))


class CapiEncoder(nn.Module):
    """CAPI's ViT encoder with registers and 2-D RoPE, timm-style attributes.

    Args:
        img_size: input side in pixels (RoPE coordinates are resolution-free, so any multiple of the patch
            size works with the same weights).
        patch_size: patch side (14 for the released ViT-L).
        in_chans: input channels.
        embed_dim: token width (1024 for ViT-L).
        depth: number of blocks (24).
        num_heads: attention heads (16).
        mlp_ratio: MLP hidden width over ``embed_dim``.
        num_registers: register tokens (16; a multiple of 4, placed along the image border).
        norm_eps: RMSNorm epsilon.
        num_classes: must be 0 (features only; kept for timm-style calls).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 14, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_registers: int = 16, norm_eps: float = 1e-5, num_classes: int = 0) -> None:
        super().__init__()
        if num_classes:
            raise ValueError("CapiEncoder has no classifier; use num_classes=0")
        if num_registers % 4:
            raise ValueError(f"num_registers must be a multiple of 4 (one side of the border each), "
                             f"got {num_registers}")
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = self.num_reg_tokens = num_registers
        self.has_class_token = False
        self.cls_token = None
        self.pos_embed = None
        self.no_embed_class = True
        self.global_pool = "avg"
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, bias=True)
        self.reg_token = nn.Parameter(torch.zeros(1, num_registers, embed_dim))
        self.blocks = nn.ModuleList(
            [CapiBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.norm = RmsNorm(embed_dim, eps=norm_eps, affine=False)
        self.head = nn.Identity()
        size = self.patch_embed.img_size
        self.pretrained_cfg = {
            "architecture": "capi_vit_large_patch14", "input_size": (in_chans, *size), "interpolation": "bicubic",
            "crop_pct": 0.875, "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}
        self.default_cfg = self.pretrained_cfg
        self.init_weights()

    def init_weights(self) -> None:
        """CAPI's initialisation: xavier-uniform linears and patch projection, registers N(0, 0.02)."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        bias = self.patch_embed.proj.bias
        assert bias is not None  # the PatchEmbed above is built with bias=True
        nn.init.zeros_(bias)
        nn.init.normal_(self.reg_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, Rope2d):
                module.reset_parameters()

    def token_coords(self, grid: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Coordinates ``[R + h*w, 2]`` of the registers (border) and patches (row, column in [0, 1])."""
        h, w = grid
        rows = torch.linspace(0, 1, h, dtype=dtype, device=device)
        cols = torch.linspace(0, 1, w, dtype=dtype, device=device)
        patches = torch.cartesian_prod(rows, cols).reshape(h * w, 2)  # row-major, like the patch tokens
        side = self.num_reg_tokens // 4
        t = torch.arange(side, dtype=dtype, device=device) / side
        zeros, ones = torch.zeros_like(t), torch.ones_like(t)
        border = torch.cat([  # four sides of the unit square, walked around its border
            torch.stack([t, zeros], -1), torch.stack([ones, t], -1),
            torch.stack([1 - t, ones], -1), torch.stack([zeros, 1 - t], -1)])
        low, high = patches.min(0).values, patches.max(0).values  # registers scaled to the visible patches
        return torch.cat([low + border * (high - low), patches])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> tokens ``[B, R + N, D]`` (registers first, final RMSNorm applied)."""
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        x = self.patch_embed(x)  # [B, N, D]
        coords = self.token_coords(grid, x.dtype, x.device).expand(x.shape[0], -1, -1)  # [B, R + N, 2]
        x = torch.cat([self.reg_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks:
            x = block(x, coords)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean of the patch tokens ``[B, D]`` (registers excluded)."""
        return self.head(x[:, self.num_prefix_tokens:].mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def capi_vit_large_patch14(img_size: int = 224, **kwargs) -> CapiEncoder:
    """CAPI ViT-L/14: 1024 wide, 24 blocks, 16 heads, 16 registers (overridable for tests)."""
    cfg = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, num_registers=16)
    return CapiEncoder(img_size=img_size, **{**cfg, **kwargs})
