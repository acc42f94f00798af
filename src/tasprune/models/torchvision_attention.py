"""torch and torchvision attention modules whose heads cannot be read as written, as modules with
the same parameters (and state dict) and function whose heads can: ``nn.MultiheadAttention``
(one fused in-projection) as `SplitAttention`, torchvision's MaxViT and Swin v1/v2 attention
(written for a fixed head count) as subclasses. Swapped in by
`tasprune.models.attention.split_attention`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    _get_relative_position_bias,
)


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` with q, k and v as their own linears (``q_proj``,
    ``k_proj``, ``v_proj``), so that its heads are a width choice like any other attention's:
    the same call signature, outputs and state dict (``in_proj_weight``/``in_proj_bias``, its
    three projections stacked), computed with explicit ops whose costs are counted. Made by
    `split_attention` from an ``nn.MultiheadAttention`` of one embedding width without
    ``bias_k``/``bias_v`` or ``add_zero_attn``."""

    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        w, b = mha.in_proj_weight, mha.in_proj_bias
        for i, child in enumerate(("q_proj", "k_proj", "v_proj")):
            lin = nn.Linear(e, e, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight = nn.Parameter(w.detach()[i * e : (i + 1) * e].clone())
            if b is not None:
                lin.bias = nn.Parameter(b.detach()[i * e : (i + 1) * e].clone())
            self.add_module(child, lin)
        self.out_proj = mha.out_proj
        self._register_state_dict_hook(_stacked)
        self.register_load_state_dict_pre_hook(_unstacked)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n_q, n_k, h, d = (
            query.shape[0],
            query.shape[1],
            key.shape[1],
            self.num_heads,
            self.head_dim,
        )
        q = self.q_proj(query).view(b, n_q, h, d).transpose(1, 2)
        k = self.k_proj(key).view(b, n_k, h, d).transpose(1, 2)
        v = self.v_proj(value).view(b, n_k, h, d).transpose(1, 2)
        mask = _additive(attn_mask, key_padding_mask, b, h, n_q, n_k, q.dtype)
        p = self.dropout if self.training else 0.0
        weights: Tensor | None = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * d**-0.5
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = torch.nn.functional.dropout(weights, p) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p
            )
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, h * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def _additive(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    b: int,
    h: int,
    n_q: int,
    n_k: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.MultiheadAttention's masks (True or -inf: not attended) as one additive mask."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.view(1, 1, n_q, n_k) if m.dim() == 2 else m.view(b, h, n_q, n_k)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(b, 1, 1, n_k)
        mask = kp if mask is None else mask + kp
    return mask


def _stacked(module: nn.Module, state: dict[str, Tensor], prefix: str, meta: object) -> None:
    """Save as ``nn.MultiheadAttention`` does: the three projections stacked. A state of the
    live parameters (``keep_vars=True``, what tracers and exporters read) keeps them."""
    for part in ("weight", "bias"):
        keys = [f"{prefix}{c}.{part}" for c in ("q_proj", "k_proj", "v_proj")]
        if keys[0] in state and not isinstance(state[keys[0]], nn.Parameter):
            state[f"{prefix}in_proj_{part}"] = torch.cat([state.pop(k) for k in keys])


def _unstacked(module: nn.Module, state: dict[str, Tensor], prefix: str, *args: object) -> None:
    """Load ``nn.MultiheadAttention``'s stacked projections into the three linears."""
    for part in ("weight", "bias"):
        stacked = state.pop(f"{prefix}in_proj_{part}", None)
        if stacked is not None:
            for c, t in zip(("q_proj", "k_proj", "v_proj"), stacked.chunk(3), strict=True):
                state[f"{prefix}{c}.{part}"] = t


class MaxVitAttention(RelativePositionalMultiHeadAttention):
    """torchvision MaxViT's attention with its heads a width choice: the same parameters and
    function, its windows folded into the batch before the projections (as timm's window
    attention is written, so its token products are read off q and k) and the heads'
    concatenation as wide as n_heads x head_dim (torchvision reshapes it to the input's
    width, which fixes the head count). `split_attention` makes every torchvision MaxViT
    attention one, in place."""

    def forward(self, x: Tensor) -> Tensor:
        b, g, p, d = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = self.to_qkv(x.reshape(b * g, p, d)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b * g, p, h, dh).transpose(1, 2) for t in (q, k, v))
        scores = q @ (k * self.scale_factor).transpose(-2, -1)
        weights = (scores + self.get_relative_positional_bias()).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(b, g, p, h * dh)
        return self.merge(out)  # type: ignore[no-any-return]


class SwinAttention(ShiftedWindowAttention):
    """torchvision Swin's (v1) shifted-window attention with its heads a width choice: the
    same parameters and function, written with its projections called as modules after the
    windows are partitioned (torchvision passes their weights to a function that derives the
    head width from the input's, which fixes the head count), the head width read off q.
    `split_attention` makes every torchvision Swin v1 attention one, in place."""

    def forward(self, x: Tensor) -> Tensor:
        return _windows(self, x, cosine=False)


class SwinAttentionV2(ShiftedWindowAttentionV2):
    """`SwinAttention` for Swin v2: cosine attention with a scale per head, and the bias of
    each head from one MLP (``cpb_mlp``) that stays whole (its last layer's rows follow the
    heads' order; the kept heads read the first rows)."""

    head_tensors = (("logit_scale", 0),)  # cut and reordered with the heads
    head_rows = ("cpb_mlp.2.weight",)  # reordered with the heads, never cut

    def get_relative_position_bias(self) -> Tensor:
        table = self.cpb_mlp(self.relative_coords_table)
        table = table.reshape(-1, table.shape[-1])[:, : self.num_heads]
        index = self.relative_position_index
        return 16 * torch.sigmoid(_get_relative_position_bias(table, index, self.window_size))  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return _windows(self, x, cosine=True)


def _windows(mod: ShiftedWindowAttention, x: Tensor, cosine: bool) -> Tensor:
    """torchvision's shifted-window attention, the projections called as modules."""
    b, h, w, c = x.shape
    ws, shift = mod.window_size, list(mod.shift_size)
    x = F.pad(x, (0, 0, 0, (ws[1] - w % ws[1]) % ws[1], 0, (ws[0] - h % ws[0]) % ws[0]))
    ph, pw = x.shape[1], x.shape[2]
    shift = [0 if ws[i] >= (ph, pw)[i] else shift[i] for i in range(2)]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    gh, gw = ph // ws[0], pw // ws[1]
    x = x.view(b, gh, ws[0], gw, ws[1], c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b * gh * gw, ws[0] * ws[1], c)
    n, heads = x.size(1), mod.num_heads
    qkv = mod.qkv(x)
    width = qkv.size(-1) // 3
    if cosine and mod.qkv.bias is not None:  # v2 adds no bias to k
        qkv = qkv - F.pad(mod.qkv.bias[width : 2 * width], (width, width))
    dh = width // heads
    q, k, v = qkv.reshape(x.size(0), n, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    if cosine:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(mod.logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * dh**-0.5) @ k.transpose(-2, -1)
    scores = scores + mod.get_relative_position_bias()
    if sum(shift) > 0:
        scores = scores.view(b, gh * gw, heads, n, n) + _shift_mask(x, ph, pw, ws, shift)
        scores = scores.view(-1, heads, n, n)
    weights = F.dropout(scores.softmax(-1), mod.attention_dropout, mod.training)
    x = (weights @ v).transpose(1, 2).reshape(x.size(0), n, heads * dh)
    x = F.dropout(mod.proj(x), mod.dropout, mod.training)
    x = x.view(b, gh, gw, ws[0], ws[1], -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _shift_mask(x: Tensor, ph: int, pw: int, ws: list[int], shift: list[int]) -> Tensor:
    """Swin's mask of the shifted windows: -100 between tokens from different regions,
    shaped (1, windows, 1, tokens, tokens)."""
    regions = x.new_zeros((ph, pw))
    count = 0
    for r in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for c in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            regions[r[0] : r[1], c[0] : c[1]] = count
            count += 1
    regions = regions.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3)
    regions = regions.reshape(-1, ws[0] * ws[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    mask = differ.masked_fill(differ != 0, -100.0).masked_fill(differ == 0, 0.0)
    return mask.unsqueeze(1).unsqueeze(0)
