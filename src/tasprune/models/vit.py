"""A small vision transformer, shipped so that a transformer protocol runs on 28x28 images
within a session on a CPU: patch embedding by a strided conv, learned position embedding,
pre-norm blocks (multi-head self-attention, then an MLP, each added onto the token stream),
a final LayerNorm, mean pooling over tokens and a linear classifier. Plain modules: the one
analysis finds its heads, MLP widths and depth like any other network's."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.models.zoo import ship


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, h * d))


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        *,
        image: int = 28,
        patch: int = 4,
        dim: int = 96,
        depth: int = 6,
        num_heads: int = 4,
        mlp_dim: int = 192,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        pos: Tensor = self.pos_embed
        if pos.shape[1] != h * w:  # another input size: the position grid interpolated
            g = math.isqrt(pos.shape[1])
            grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        x = self.norm(self.blocks(x.flatten(2).transpose(1, 2) + pos))
        return self.head(x.mean(1))


@ship("vit_fmnist", (1, 28, 28), "ViT for 28x28 images: patch 4, width 96, 6 blocks of 4 heads")
def vit_fmnist(num_classes: int, in_channels: int) -> nn.Module:
    return ViT(num_classes, in_channels)
