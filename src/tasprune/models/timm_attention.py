"""timm attention modules whose own forward fixes the head count, as subclasses with the same
parameters and function whose head width is read off the projections (imported only where
timm is, by `tasprune.models.attention.split_attention`)."""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention
from torch import Tensor
from torch.nn import functional as F


class SwinCrAttention(WindowMultiHeadAttention):
    """timm SwinV2-CR's window attention with its heads a width choice: timm derives the head
    width from the input's (``C // num_heads``), which fixes the head count; here it is read
    off qkv. The bias of each head comes from one MLP (``meta_mlp``) that stays whole: its last
    layer's rows follow the heads' order and the kept heads read the first ones."""

    head_tensors = (("logit_scale", 0),)  # cut and reordered with the heads
    head_rows = ("meta_mlp.fc2.weight", "meta_mlp.fc2.bias")  # reordered, never cut

    def _relative_positional_encodings(self) -> Tensor:
        area = self.window_size[0] * self.window_size[1]
        bias = self.meta_mlp(self.relative_coordinates_log)[:, : self.num_heads]
        return bias.transpose(1, 0).reshape(self.num_heads, area, area).unsqueeze(0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        bw, n, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x)
        qkv = qkv.view(bw, n, 3, heads, qkv.size(-1) // 3 // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scale = torch.clamp(self.logit_scale.reshape(1, heads, 1, 1), max=math.log(100.0)).exp()
        scores = scores * scale + self._relative_positional_encodings()
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.view(bw // windows, windows, heads, n, n)
            scores = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        weights = self.attn_drop(scores.softmax(dim=-1))
        return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(bw, n, -1)))  # type: ignore[no-any-return]


# timm's class -> the subclass it becomes
SUBCLASSES: dict[type, type] = {WindowMultiHeadAttention: SwinCrAttention}
