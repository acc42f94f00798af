"""Ultralytics' attention (YOLO11's C2PSA) as a subclass with the same parameters and function
whose width is read off its projections (imported only where Ultralytics is, by
`tasprune.models.attention.split_attention`; Ultralytics is AGPL-3.0, an optional extra)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F
from ultralytics.nn.modules import block


class UltralyticsAttention(block.Attention):
    """Ultralytics' attention with its heads a width choice: it reshapes the heads' output to
    the input's width, which fixes the head count; here the width is heads x ``head_dim``."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        heads, kd, vd = self.num_heads, self.key_dim, self.head_dim
        q, k, v = self.qkv(x).view(b, heads, 2 * kd + vd, h * w).split([kd, kd, vd], dim=2)
        c = heads * vd
        if self.format == "coreml":
            out = F.scaled_dot_product_attention(
                q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)
            ).transpose(-2, -1)
        else:
            out = v @ ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1).transpose(-2, -1)
        return self.proj(out.reshape(b, c, h, w) + self.pe(v.reshape(b, c, h, w)))  # type: ignore[no-any-return]


# Ultralytics' class -> the subclass it becomes
SUBCLASSES: dict[type, type] = {block.Attention: UltralyticsAttention}
