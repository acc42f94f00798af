"""timm attention modules whose own forward fixes the head count, as subclasses with the same
parameters and function whose head width is read off the projections (imported only where
timm is, by `tasprune.models.attention.split_attention`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import apply_rot_embed_cat
from timm.layers.pos_embed_rel import RelPosBias
from timm.models import (
    cait,
    crossvit,
    davit,
    edgenext,
    eva,
    fastvit,
    metaformer,
    nextvit,
    pvt_v2,
    twins,
    xcit,
)
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention
from torch import Tensor, nn
from torch.nn import functional as F


def _attend(mod: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T * scale) v per head (batch, heads, tokens, head width), with the
    module's attention dropout, its heads concatenated: (batch, tokens, heads x head width)."""
    dropout = getattr(mod, "attn_drop", None)
    drop = dropout.p if dropout is not None and mod.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=mod.scale)
    return out.transpose(1, 2).flatten(2)


def _split(t: Tensor, heads: int) -> Tensor:
    """(batch, tokens, heads x head width) as (batch, heads, tokens, head width)."""
    return t.reshape(t.size(0), t.size(1), heads, -1).transpose(1, 2)


def _reduced(mod: Any, x: Tensor, size: tuple[int, int]) -> Tensor:
    """PVT's and Twins' spatially reduced tokens that k and v read: the token map pooled
    and/or strided by ``sr``, then normalised (and activated)."""
    b, n, c = x.shape
    pool = getattr(mod, "pool", None)
    if pool is None and mod.sr is None:
        return x
    m = x.transpose(1, 2).reshape(b, c, *size)
    if pool is not None:
        m = pool(m)
    x = mod.norm(mod.sr(m).reshape(b, c, -1).transpose(1, 2))
    act = getattr(mod, "act", None)
    return act(x) if act is not None else x


def _tokens(mod: Any, x: Tensor) -> Tensor:
    """A ViT attention on tokens (batch, tokens, width) with one fused qkv linear, its head
    width read off qkv."""
    b, n, _ = x.shape
    qkv = mod.qkv(x)
    heads = mod.num_heads
    q, k, v = qkv.reshape(b, n, 3, heads, qkv.size(-1) // 3 // heads).permute(2, 0, 3, 1, 4)
    out = mod.proj(_attend(mod, q, k, v))
    return mod.proj_drop(out) if hasattr(mod, "proj_drop") else out  # type: ignore[no-any-return]


class MetaFormerAttention(metaformer.Attention):
    """timm MetaFormer's (CAFormer's) attention with its heads a width choice: timm reshapes
    the heads' concatenation to the input's width, which fixes the head count."""

    def forward(self, x: Tensor) -> Tensor:
        return _tokens(self, x)


class FastVitAttention(fastvit.Attention):
    """timm FastViT's attention (on a feature map) with its heads a width choice: timm
    reshapes the heads' concatenation to the input's width, which fixes the head count."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        out = _tokens(self, x.flatten(2).transpose(-2, -1))
        return out.transpose(-2, -1).reshape(b, -1, h, w)


class DaVitWindowAttention(davit.WindowAttention):
    """timm DaViT's window attention with its heads a width choice: timm derives the head
    width from the input's, which fixes the head count."""

    def forward(self, x: Tensor) -> Tensor:
        return _tokens(self, x)


def _channels(mod: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v of an attention across channels, (batch, heads, head width, tokens), the
    head width read off qkv."""
    b, n, _ = x.shape
    qkv = mod.qkv(x)
    qkv = qkv.reshape(b, n, 3, mod.num_heads, qkv.size(-1) // 3 // mod.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)
    return q, k, v


def _cross_covariance(mod: Any, x: Tensor) -> Tensor:
    """XCiT's cross-covariance attention: per head, each channel attends to the head's
    channels (softmax of the cosine over tokens of q's and k's channels, times a per-head
    temperature), computed as timm's unfused path computes it."""
    b, n, _ = x.shape
    q, k, v = _channels(mod, x)
    scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * mod.temperature
    out = (mod.attn_drop(scores.softmax(dim=-1)) @ v).permute(0, 3, 1, 2).reshape(b, n, -1)
    return mod.proj_drop(mod.proj(out))  # type: ignore[no-any-return]


class XcaAttention(xcit.XCA):
    """timm XCiT's cross-covariance attention with its heads a width choice (products per
    channel pair within a head: `tasprune.models.attention`'s ``across``): timm reshapes the
    heads' output to the input's width, which fixes the head count."""

    across_channels = True

    def forward(self, x: Tensor) -> Tensor:
        return _cross_covariance(self, x)


class EdgeNextAttention(edgenext.CrossCovarianceAttn):
    """timm EdgeNeXt's cross-covariance attention (XCiT's) with its heads a width choice."""

    across_channels = True

    def forward(self, x: Tensor) -> Tensor:
        return _cross_covariance(self, x)


class DaVitChannelAttention(davit.ChannelAttention):
    """timm DaViT's channel attention with its heads a width choice: per head, softmax(k^T v)
    over the head's channels weighs q's channels, so q is what reaches the output (the search
    masks q's rows: ``output_part``)."""

    across_channels = True
    output_part = 0

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = _channels(self, x)  # (batch, heads, head width, tokens)
        weights = ((k * self.scale) @ v.transpose(-2, -1)).softmax(dim=-1)
        out = weights @ q  # (batch, heads, head width, tokens)
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, n, -1))  # type: ignore[no-any-return]


class ClassAttention(cait.ClassAttn):
    """timm's class attention (CaiT, XCiT: the class token attends to every token) with its
    heads a width choice: timm derives the head width from the input's."""

    def forward(self, x: Tensor) -> Tensor:
        heads = self.num_heads
        q, k, v = (_split(t, heads) for t in (self.q(x[:, :1]), self.k(x), self.v(x)))
        return self.proj_drop(self.proj(_attend(self, q, k, v)))  # type: ignore[no-any-return]


class TalkingHeadAttention(cait.TalkingHeadAttn):
    """timm CaiT's talking-heads attention (linears across the heads before and after the
    softmax, ``proj_l`` and ``proj_w``) with its heads a width choice: timm derives the head
    width from the input's, which fixes the head count."""

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, heads, qkv.size(-1) // 3 // heads).permute(2, 0, 3, 1, 4)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = self.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        weights = self.proj_w(scores.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = (self.attn_drop(weights) @ v).transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(out))  # type: ignore[no-any-return]


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


class SubSampleAttention(twins.GlobalSubSampleAttn):
    """timm Twins' attention on spatially reduced keys with its heads a width choice: timm
    derives the head width from the input's, which fixes the head count."""

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        q = _split(self.q(x), self.num_heads)
        k, v = (_split(t, self.num_heads) for t in self.kv(_reduced(self, x, size)).chunk(2, -1))
        return self.proj_drop(self.proj(_attend(self, q, k, v)))  # type: ignore[no-any-return]


class PvtAttention(pvt_v2.Attention):
    """timm PVT v2's attention on spatially reduced keys with its heads a width choice: timm
    reshapes the heads' concatenation to the input's width, which fixes the head count."""

    def forward(self, x: Tensor, feat_size: list[int]) -> Tensor:
        q = _split(self.q(x), self.num_heads)
        kv = self.kv(_reduced(self, x, (feat_size[0], feat_size[1])))
        k, v = (_split(t, self.num_heads) for t in kv.chunk(2, -1))
        return self.proj_drop(self.proj(_attend(self, q, k, v)))  # type: ignore[no-any-return]


class NextVitAttention(nextvit.EfficientAttention):
    """timm Next-ViT's attention (keys from average-pooled tokens) with its heads a width
    choice: timm reshapes the heads' concatenation to the input's width."""

    def forward(self, x: Tensor) -> Tensor:
        q = _split(self.q(x), self.num_heads)
        if self.sr is not None:
            x = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        k, v = _split(self.k(x), self.num_heads), _split(self.v(x), self.num_heads)
        return self.proj_drop(self.proj(_attend(self, q, k, v)))  # type: ignore[no-any-return]


class CrossAttention(crossvit.CrossAttention):
    """timm CrossViT's fusion attention (one branch's class token attends to the other's
    tokens) with its heads a width choice: timm derives the head width from the input's."""

    def forward(self, x: Tensor) -> Tensor:
        heads = self.num_heads
        q = _split(self.wq(x[:, :1]), heads)
        k, v = _split(self.wk(x), heads), _split(self.wv(x), heads)
        return self.proj_drop(self.proj(_attend(self, q, k, v)))  # type: ignore[no-any-return]


class HeadsRelPosBias(RelPosBias):
    """timm's relative position bias (MaxxViT, CoAtNet) with its head count read off its
    table (timm's keeps the shape it was built with, which fixes the head count)."""

    def get_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index]  # type: ignore[index]
        bias = bias.view(*self.bias_shape[:2], -1).permute(2, 0, 1)
        return bias.unsqueeze(0).contiguous()


class EvaSplitAttention(eva.EvaAttention):
    """timm EVA's attention with its heads a width choice: its fused q/k/v weight runs as
    three linears (``q_proj``, ``k_proj``, ``v_proj``; timm calls ``F.linear`` on the fused
    weight with q's and v's biases, which no module call shows) and its head width is read
    off them (timm reshapes to the input's width). The state dict is timm's: ``qkv.weight``
    (the three stacked), ``q_bias`` and ``v_bias``. Made by `adopt`, only where the heads
    are independent until the output projection (no normalisation over the heads'
    concatenation, no gate)."""

    @staticmethod
    def takes(mod: Any) -> bool:
        plain = isinstance(mod.norm, nn.Identity) and mod.gate is None
        return plain and mod.qkv is not None and not mod.qkv_bias_separate

    @staticmethod
    def adopt(mod: Any) -> None:
        w = mod.qkv.weight.detach()
        rows = w.shape[0] // 3
        biases = (mod.q_bias, None, mod.v_bias)
        for i, child in enumerate(("q_proj", "k_proj", "v_proj")):
            bias = biases[i]
            lin = nn.Linear(w.shape[1], rows, bias=bias is not None, device=w.device, dtype=w.dtype)
            lin.weight = nn.Parameter(w[i * rows : (i + 1) * rows].clone())
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone())
            setattr(mod, child, lin)
        mod.qkv = mod.q_bias = mod.v_bias = mod.k_bias = None
        mod._register_state_dict_hook(_eva_saved)
        mod.register_load_state_dict_pre_hook(_eva_loaded)

    def forward(
        self,
        x: Tensor,
        rope: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        heads = self.num_heads
        projections: tuple[Any, ...] = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (_split(p(x), heads) for p in projections)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, self.rotate_half

            def rotated(t: Tensor) -> Tensor:
                turned = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)
                return torch.cat([t[:, :, :npt, :], turned], dim=2).type_as(v)

            q, k = rotated(q), rotated(k)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=bool(is_causal)
        )  # (an exporter's trace hands the flag over as a tensor)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))  # type: ignore[no-any-return]


def _eva_saved(module: Any, state: dict[str, Tensor], prefix: str, meta: object) -> None:
    """Save as timm's EVA attention does: ``qkv.weight`` stacked, ``q_bias`` and ``v_bias``. A
    state of the live parameters (``keep_vars=True``, what tracers read) keeps the linears."""
    weights = [f"{prefix}{c}.weight" for c in ("q_proj", "k_proj", "v_proj")]
    if weights[0] not in state or isinstance(state[weights[0]], nn.Parameter):
        return
    state[f"{prefix}qkv.weight"] = torch.cat([state.pop(k) for k in weights])
    for part in ("q", "v"):
        bias = state.pop(f"{prefix}{part}_proj.bias", None)
        if bias is not None:
            state[f"{prefix}{part}_bias"] = bias


def _eva_loaded(module: Any, state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load timm's EVA attention state into the three linears."""
    stacked = state.pop(f"{prefix}qkv.weight", None)
    if stacked is not None:
        for c, t in zip(("q_proj", "k_proj", "v_proj"), stacked.chunk(3), strict=True):
            state[f"{prefix}{c}.weight"] = t
    for part in ("q", "v"):
        bias = state.pop(f"{prefix}{part}_bias", None)
        if bias is not None:
            state[f"{prefix}{part}_proj.bias"] = bias


# timm's class -> the subclass it becomes (where its ``takes``, if any, accepts the module;
# its ``adopt``, if any, then rearranges the module in place)
SUBCLASSES: dict[type, type] = {
    WindowMultiHeadAttention: SwinCrAttention,
    metaformer.Attention: MetaFormerAttention,
    fastvit.Attention: FastVitAttention,
    cait.ClassAttn: ClassAttention,
    cait.TalkingHeadAttn: TalkingHeadAttention,
    twins.GlobalSubSampleAttn: SubSampleAttention,
    pvt_v2.Attention: PvtAttention,
    nextvit.EfficientAttention: NextVitAttention,
    crossvit.CrossAttention: CrossAttention,
    RelPosBias: HeadsRelPosBias,
    davit.WindowAttention: DaVitWindowAttention,
    xcit.XCA: XcaAttention,
    edgenext.CrossCovarianceAttn: EdgeNextAttention,
    davit.ChannelAttention: DaVitChannelAttention,
    eva.EvaAttention: EvaSplitAttention,
}
