"""Transformers: a multi-head attention module's heads are one width choice in whole heads,
runs of transformer blocks are depth choices, the embedding width is searched only on
request, attention's token-token products are in the cost (and the counter sees them), and
the pruned network is the searched network at its shape, with ``num_heads`` following."""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tasprune
from conftest import TINY_RUN, needs_fashion_mnist
from tasprune.config import SearchConfig
from tasprune.cost import model_cost
from tasprune.models import get_model_spec
from tasprune.models.attention import head_count
from tasprune.models.layer_cost import counting
from tasprune.models.traced import register_module, traced
from tasprune.search.space import choice_widths
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")
timm = pytest.importorskip("timm")


def _vit(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=7,
        depth=depth,
        embed_dim=48,
        num_heads=4,
        mlp_ratio=2,
        num_classes=10,
        in_chans=1,
    ).eval()


def _counted(net: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    with counting(net) as fc:
        net(x)
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def test_heads_mlp_widths_and_blocks_are_the_choices() -> None:
    name = register_module(_vit(), torch.zeros(1, 1, 28, 28))
    tr = traced(name)
    for i in range(3):
        heads = tr.groups[f"blocks.{i}.attn.qkv"]
        assert (heads.full, heads.multiple, heads.fixed) == (48, 12, None)
        assert tr.groups[f"blocks.{i}.mlp.fc1"].fixed is None
    assert [st.blocks for st in tr.stages.values()] == [["blocks.0", "blocks.1", "blocks.2"]]
    # The embedding width (the stream attention reads) is searched only on request.
    spec = get_model_spec(name)
    assert tr.groups["patch_embed.proj"].embedding
    assert choice_widths(spec, "patch_embed.proj", 48, SearchConfig()) == [48]
    assert len(choice_widths(spec, "patch_embed.proj", 48, SearchConfig(search_embedding=True))) > 1
    assert choice_widths(spec, "blocks.0.attn.qkv", 48, SearchConfig()) == [12, 24, 36, 48]


def test_the_pruned_vit_has_the_heads_widths_and_blocks_of_its_shape() -> None:
    x = torch.rand(4, 1, 28, 28)
    tas = tasprune.TAS(_vit(), x[:2], epochs=1, flops_ratio=0.5)
    full = traced(tas.name).full_shape()
    shape = full.replace(
        widths={"blocks.0.attn.qkv": 24, "blocks.1.attn.qkv": 12, "blocks.0.mlp.fc1": 38},
        depths={"blocks.0": 2},
    )
    small = tas.prune(shape)
    assert type(small).__name__ == "VisionTransformer"
    assert [b.attn.num_heads for b in small.blocks[:2]] == [2, 1]
    assert [b.attn.attn_dim for b in small.blocks[:2]] == [24, 12]
    assert small.blocks[0].attn.qkv.weight.shape == (72, 48)  # q, k, v: 2 heads of 12 each
    assert small.blocks[1].attn.proj.weight.shape == (48, 12)
    assert small.blocks[0].mlp.fc1.weight.shape == (38, 48)
    assert isinstance(small.blocks[2], torch.nn.Identity)
    # outputs and cost at a shape: test_any_vit_prunes_heads_and_blocks_to_what_was_searched


def _searched_is_pruned(tas: tasprune.TAS, shape: Shape, small: torch.nn.Module, x: Any) -> Any:
    """The searched network at ``shape`` computes what the pruned ``small`` does; its output."""
    tas.model.eval()
    tas.supernet.training = False
    with torch.no_grad(), tas.supernet.fixed(shape):
        want = tas.model(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


def _tv_vit() -> torch.nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(28, 7, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64).eval()


@pytest.mark.parametrize("build", [_vit, _tv_vit], ids=["timm", "torchvision"])
def test_any_vit_prunes_heads_and_blocks_to_what_was_searched(
    build: object, tmp_path: Path
) -> None:
    """timm's Attention and torchvision's nn.MultiheadAttention (split into q/k/v linears
    with the same state dict): the pruned network at a shape with fewer heads and blocks is
    the searched one there and costs what was predicted, attention's products included, and
    exports to ONNX with parity."""
    net = build()  # type: ignore[operator]
    channels = 1 if isinstance(net, timm.models.VisionTransformer) else 3
    x = torch.rand(3, channels, 28, 28)
    tas = tasprune.TAS(net, x[:2], epochs=1, flops_ratio=0.5)
    tr = traced(tas.name)
    assert len(tr.attention) == 3 and all(tr.groups[g].fixed is None for g in tr.attention)
    heads = {g: tr.groups[g].multiple * (i + 1) for i, g in enumerate(tr.attention)}
    shape = tr.full_shape().replace(widths=heads, depths={s: 2 for s in tr.stages})
    small = tas.prune(shape).eval()
    assert [a.num_heads for a in _attentions(small)] == [1, 2]  # the third block is skipped
    got = _searched_is_pruned(tas, shape, small, x)
    counted = _counted(small, x[:1])
    assert counted["aten.bmm"] > 0
    assert sum(counted.values()) // 2 == model_cost(tas.name, shape, (channels, 28, 28))[0]
    if channels == 3:  # the state dict is nn.MultiheadAttention's
        assert any(k.endswith("self_attention.in_proj_weight") for k in small.state_dict())
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "vit.onnx"
    torch.onnx.export(small, (x,), str(path), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], got.numpy(), atol=1e-4)


def _tv_maxvit() -> torch.nn.Module:
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    return MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[2, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=5,
    ).eval()


def _tv_swin(v2: bool = False) -> torch.nn.Module:
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    torch.manual_seed(0)
    version = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    net = SwinTransformer(
        patch_size=[2, 2],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[2, 2],
        stochastic_depth_prob=0.0,
        num_classes=5,
        **version,
    ).eval()
    with torch.no_grad():  # trained-like: a bias on k that v2 leaves out, scales per head
        for m in net.modules():
            if hasattr(m, "logit_scale"):
                m.qkv.bias.normal_()
                m.logit_scale.normal_(2.0, 0.3)
    return net


def _tv_swin_v2() -> torch.nn.Module:
    return _tv_swin(v2=True)


def _timm_swin_cr() -> torch.nn.Module:
    torch.manual_seed(0)
    net = timm.create_model(
        "swinv2_cr_tiny_ns_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=5,
    ).eval()
    with torch.no_grad():  # trained-like scales per head
        for m in net.modules():
            if hasattr(m, "logit_scale"):
                m.qkv.bias.normal_()
                m.logit_scale.normal_(2.0, 0.3)
    return net


def _timm_caformer() -> torch.nn.Module:
    from timm.models import metaformer as mf

    torch.manual_seed(0)
    return mf.MetaFormer(
        num_classes=5,
        depths=(1, 1, 2, 1),
        dims=(16, 32, 64, 64),
        token_mixers=[mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
        norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2,
    ).eval()


def _timm_fastvit() -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"layers": (1, 1, 1, 2), "embed_dims": (16, 32, 64, 64), "num_classes": 5}
    return timm.create_model("fastvit_sa12", **kw).eval()


def _timm_xcit() -> torch.nn.Module:  # cross-covariance attention, then class attention
    torch.manual_seed(0)
    kw = {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    return timm.create_model("xcit_nano_12_p16_224", patch_size=8, **kw).eval()


def _timm_edgenext() -> torch.nn.Module:  # cross-covariance attention in a conv network
    torch.manual_seed(0)
    kw = {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 64), "heads": (2, 2, 2, 2)}
    return timm.create_model("edgenext_xx_small", num_classes=5, **kw).eval()


def _timm_eva() -> torch.nn.Module:  # F.linear on the fused q/k/v weight, q and v biases, RoPE
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    net = timm.create_model("eva02_tiny_patch14_224", num_classes=5, **kw).eval()
    with torch.no_grad():  # trained-like biases (timm starts them at zero)
        for m in net.modules():
            if getattr(m, "q_bias", None) is not None:
                m.q_bias.normal_()
                m.v_bias.normal_()
    return net


def _trained_like(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` in eval mode with trained-like batch norms (affine and running statistics away
    from their initial values) and attention position biases, so that a wrong copy shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "attention_biases"):
                m.attention_biases.normal_()
    return net.eval()


def _timm_levit() -> torch.nn.Module:  # interleaved heads in LinearNorms (a linear + its BN)
    torch.manual_seed(0)  # and a downsampling attention: q of its own, [k | v] per head
    kw = {"embed_dim": (32, 48, 64), "key_dim": 8, "num_heads": (2, 2, 4), "depth": (1, 1, 1)}
    net = timm.create_model("levit_128s", img_size=64, num_classes=5, **kw)
    return _trained_like(net)


_timm_levit.side = 64  # type: ignore[attr-defined]


def _timm_tnt() -> torch.nn.Module:  # q and k in one linear, v in another; pixels as a batch
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "inner_dim": 8, "depth": 2}
    heads = {"num_heads_inner": 2, "num_heads_outer": 2}
    return timm.create_model("tnt_s_patch16_224", num_classes=5, **heads, **kw).eval()


def _timm_cait() -> (
    torch.nn.Module
):  # talking heads: linears across the heads, then class attention
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
    net = timm.create_model("cait_xxs24_224", num_classes=5, **kw).eval()
    with torch.no_grad():  # trained-like mixing (timm starts near the identity)
        for m in net.modules():
            if hasattr(m, "proj_l"):
                for p in (*m.proj_l.parameters(), *m.proj_w.parameters()):
                    p.normal_(0.0, 0.5)
    return net


def _timm_efficientformer_v2() -> torch.nn.Module:
    """Talking heads as 1x1 convs, q/k/v as conv + batch norm, a depthwise conv on v's rows
    added to the heads' output, a downsampling attention with a query of its own. Its
    attention modules are rebuilt small (3 heads of 4 + 8, where timm's have 8 of 32 + 128),
    so that the test stays fast."""
    from timm.models import efficientformer_v2 as ef

    torch.manual_seed(0)
    kw = {"depths": (1, 1, 1, 2), "embed_dims": (8, 16, 32, 64), "num_vit": 2, "mlp_ratios": 2}
    net = ef.EfficientFormerV2(img_size=64, num_classes=5, **kw)
    small = {"key_dim": 4, "num_heads": 3, "attn_ratio": 2}
    for name, m in list(net.named_modules()):
        if isinstance(m, ef.Attention2d):
            stride = 2 if m.stride_conv is not None else None
            res = tuple(r * (stride or 1) for r in m.resolution)
            dim = m.k.conv.in_channels
            net.set_submodule(name, ef.Attention2d(dim, resolution=res, stride=stride, **small))
        elif isinstance(m, ef.Attention2dDownsample):
            dim, res = m.k.conv.in_channels, m.resolution
            down = ef.Attention2dDownsample(dim, resolution=res, out_dim=m.out_dim, **small)
            net.set_submodule(name, down)
    with torch.no_grad():  # trained-like head mixing
        for m in net.modules():
            if hasattr(m, "talking_head1"):
                for p in (*m.talking_head1.parameters(), *m.talking_head2.parameters()):
                    p.normal_(0.0, 0.5)
    return _trained_like(net)


_timm_efficientformer_v2.side = 64  # type: ignore[attr-defined]


def _timm_pyramid(name: str) -> torch.nn.Module:  # PVT v2, Twins: keys from reduced tokens
    torch.manual_seed(0)
    kw = {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 64), "num_heads": (2, 2, 2, 4)}
    return timm.create_model(name, num_classes=5, **kw).eval()


def _timm_crossvit() -> torch.nn.Module:  # its fusion: a class token attends to the other branch
    torch.manual_seed(0)
    kw = {"embed_dim": [32, 64], "depth": [[1, 2, 0]], "num_heads": [2, 2], "mlp_ratio": [2, 2, 1]}
    net = timm.create_model(
        "crossvit_tiny_240", img_size=32, img_scale=1.0, patch_size=[8, 16], **kw
    )
    return net.eval()


def _timm_davit() -> torch.nn.Module:  # window attention, then channel attention (q masked)
    torch.manual_seed(0)
    kw = {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 64), "num_heads": (2, 2, 2, 2)}
    return timm.create_model("davit_tiny", window_size=2, num_classes=5, **kw).eval()


@pytest.mark.parametrize(
    ("build", "attentions"),
    [
        (_tv_maxvit, 6),
        (_tv_swin, 4),
        (_tv_swin_v2, 4),
        (_timm_swin_cr, 4),
        (_timm_caformer, 3),
        (_timm_fastvit, 2),
        (_timm_xcit, 3),
        (functools.partial(_timm_pyramid, "pvt_v2_b0"), 4),
        (functools.partial(_timm_pyramid, "twins_pcpvt_small"), 4),
        (_timm_crossvit, 5),
        (_timm_davit, 8),
        (_timm_edgenext, 3),
        (_timm_eva, 2),
        (_timm_levit, 5),
        (_timm_tnt, 4),
        (_timm_cait, 4),
        (_timm_efficientformer_v2, 4),
    ],
    ids=[
        "maxvit",
        "swin",
        "swin_v2",
        "timm_swinv2_cr",
        "caformer",
        "fastvit",
        "xcit_class",
        "pvt_v2",
        "twins",
        "crossvit",
        "davit",
        "edgenext",
        "eva",
        "levit",
        "tnt",
        "cait",
        "efficientformer_v2",
    ],
)
def test_attention_written_for_its_head_count_prunes_heads_to_what_was_searched(
    build: Any, attentions: int, tmp_path: Path
) -> None:
    """torchvision's MaxViT and Swin write their attention so that the head count cannot
    change (MaxViT reshapes the heads' concatenation to the input's width; Swin hands its
    projections' weights to a function that derives the head width from the input's; timm's
    SwinV2-CR, MetaFormer, FastViT, the class attention of CaiT and XCiT and the attention
    across channels of XCiT, EdgeNeXt and DaViT derive it from the input's too; EVA's calls
    ``F.linear`` on its fused q/k/v weight and runs as three linears; LeViT's projections are
    a linear and a batch norm on its rows, cut and masked together): tasprune runs them as `MaxVitAttention`, `SwinAttention`, `SwinAttentionV2`
    and the subclasses of `tasprune.models.timm_attention`
    (subclasses with the same parameters and function), whose heads are searched like any
    other's (Swin's shifted windows, v2's cosine attention and bias MLP, MaxViT's grid
    attention included); pruned to one head each the network is the searched one there,
    costs what was predicted and exports with parity."""
    net = build()
    side = getattr(build, "side", 32)  # LeViT's tokens: 4 x 4 at 64 px
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = net(x)
    tas = tasprune.TAS(net, x[:1], epochs=1, flops_ratio=0.6)
    tr = traced(tas.name)
    assert len(tr.attention) == attentions
    assert all(tr.groups[g].fixed is None for g in tr.attention)
    shape = tr.full_shape().replace(widths={g: tr.groups[g].multiple for g in tr.attention})
    small = tas.prune(shape).eval()
    read = {a.name for a in tr.attention.values()}
    heads = [head_count(small.get_submodule(n)) for n in sorted(read)]
    assert heads == [1] * attentions
    assert all(head_count(m) == head_count(net.get_submodule(n)) for n, m in _others(small, read))
    tas.model.eval()
    tas.supernet.training = False
    with torch.no_grad(), tas.supernet.fixed(tr.full_shape()):  # the same function
        torch.testing.assert_close(tas.model(x), ref, rtol=1e-5, atol=1e-5)
    got = _searched_is_pruned(tas, shape, small, x)
    counted = _counted(small, x[:1])
    assert counted["aten.bmm"] > 0
    assert sum(counted.values()) // 2 == model_cost(tas.name, shape, (3, side, side))[0]
    assert set(small.state_dict()) == set(net.state_dict())
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "net.onnx"
    torch.onnx.export(small, (x,), str(path), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], got.numpy(), atol=1e-4)


def test_a_pruned_eva_saves_timms_keys_and_rebuilds_from_a_fresh_original(tmp_path: Path) -> None:
    """EVA's attention runs as three linears, but what is saved is timm's (``qkv.weight``,
    ``q_bias``, ``v_bias``, cut to the kept heads): the shape and that state re-applied to a
    freshly built original give the same network."""
    net = _timm_eva()
    x = torch.randn(2, 3, 32, 32)
    tas = tasprune.TAS(net, x[:1], epochs=1, flops_ratio=0.6)
    tr = traced(tas.name)
    shape = tr.full_shape().replace(widths={g: tr.groups[g].multiple for g in tr.attention})
    small = tas.prune(shape).eval()
    state = small.state_dict()
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 16, 32)  # 1 head of 16, q k v
    assert state["blocks.0.attn.q_bias"].shape == state["blocks.0.attn.v_bias"].shape == (16,)
    shape.save(tmp_path / "shape.json", model=tas.name)
    again = tasprune.prune(
        _timm_eva(), tmp_path / "shape.json", example_inputs=x[:1], pruned_state=state
    )
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), small(x))


def test_attention_with_normalised_q_and_k_prunes_to_what_was_searched() -> None:
    """timm's qk_norm: a LayerNorm over each head's q and k, which the graph had as a mask
    site of the groups the heads replace (the searchable network failed to build)."""
    torch.manual_seed(0)
    net = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        qk_norm=True,
        num_classes=5,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    tas = tasprune.TAS(net, x, epochs=1, flops_ratio=0.6)
    tr = traced(tas.name)
    assert len(tr.attention) == 2 and all(tr.groups[g].fixed is None for g in tr.attention)
    shape = tr.full_shape().replace(widths={g: tr.groups[g].multiple for g in tr.attention})
    small = tas.prune(shape).eval()
    _searched_is_pruned(tas, shape, small, x)
    assert sum(_counted(small, x[:1]).values()) // 2 == model_cost(tas.name, shape, (3, 32, 32))[0]


def _others(net: torch.nn.Module, read: set[str]) -> list[tuple[str, torch.nn.Module]]:
    from tasprune.models.attention import attention_modules

    return [(n, m) for n, m in attention_modules(net) if n not in read]


def _readable(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules holding a head count, innermost (not MaxViT's wrapper)."""
    from tasprune.models.attention import attention_modules

    return [m for _, m in attention_modules(net)]


def _attentions(net: torch.nn.Module) -> list[torch.nn.Module]:
    from tasprune.models.attention import is_attention

    return [m for m in net.modules() if is_attention(m)]


def test_window_attention_costs_every_window() -> None:
    """Swin's attention runs on windows (rows = images x windows): its linear layers and
    token products cost per image what the counter counts."""
    net = timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=56,
        window_size=7,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
        num_classes=10,
        in_chans=1,
    ).eval()
    name = register_module(net, torch.zeros(1, 1, 56, 56))
    tr = traced(name)
    heads = [g for g in tr.groups.values() if g.name.endswith("attn.qkv")]
    assert len(heads) == 4 and all(g.fixed is None for g in heads)
    # its blocks reshape the token stream between their two sums: still depth choices
    assert [st.blocks for st in tr.stages.values()] == [
        [f"layers.{i}.blocks.0", f"layers.{i}.blocks.1"] for i in (0, 1)
    ]
    shape = tr.full_shape().replace(widths={g.name: g.multiple for g in heads})
    small = tasprune.TAS(net, torch.zeros(2, 1, 56, 56), epochs=1, flops_ratio=0.5).prune(shape)
    counted = _counted(small.eval(), torch.zeros(1, 1, 56, 56))
    assert sum(counted.values()) // 2 == model_cost(name, shape, (1, 56, 56))[0]


def test_attention_it_cannot_read_keeps_its_heads_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from torchvision.models import VisionTransformer

    class Opaque(torch.nn.Module):
        """An attention with one projection the reader does not know."""

        def __init__(self) -> None:
            super().__init__()
            self.num_heads = 2
            self.mix = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(x)

    Opaque.__name__ = "OpaqueAttention"
    vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    vit.encoder.layers[0].mlp.add_module("odd", Opaque())
    with caplog.at_level(logging.INFO, logger="tasprune.models.analysis"):
        tr = traced(register_module(vit, torch.zeros(1, 3, 32, 32)))
    assert any("encoder.layers.encoder_layer_0.mlp.odd" in r.message for r in caplog.records)
    assert tr.groups["encoder.layers.encoder_layer_1.mlp.0"].fixed is None
    assert len(tr.stages) == 1


def test_a_full_shape_is_the_unpruned_transformer() -> None:
    x = torch.rand(2, 1, 28, 28)
    vit = _vit()
    name = register_module(vit, x[:1])
    small = tasprune.TAS(vit, x[:1], epochs=1, flops_ratio=0.5).prune(traced(name).full_shape())
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), vit(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_is_multihead_attention(batch_first: bool) -> None:
    """`SplitAttention` computes what nn.MultiheadAttention computes, for each way it is
    called, and saves and loads its state dict."""
    from tasprune.models.attention import SplitAttention, split_attention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    wrap = split_attention(torch.nn.Sequential(copy.deepcopy(mha)))
    split = wrap[0]
    assert isinstance(split, SplitAttention)
    b, n_q, n_k = 3, 5, 7
    x, y = torch.randn(b, n_q, 16), torch.randn(b, n_k, 16)
    if not batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    padding = torch.zeros(b, n_k, dtype=torch.bool)
    padding[:, -2:] = True
    causal = torch.triu(torch.ones(n_q, n_k, dtype=torch.bool), 1)
    calls = [
        {},
        {"need_weights": False},
        {"key_padding_mask": padding},
        {"average_attn_weights": False},
        {"attn_mask": causal},
        {"attn_mask": torch.randn(b * 4, n_q, n_k), "need_weights": False},
    ]
    for kw in calls:
        want, want_w = mha(x, y, y, **kw)
        got, got_w = split(x, y, y, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got_w is None) == (want_w is None)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    state = wrap.state_dict()
    assert set(state) == set(torch.nn.Sequential(mha).state_dict())
    fresh = split_attention(torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4)))
    fresh.load_state_dict(state)
    fresh[0].batch_first = batch_first
    torch.testing.assert_close(fresh.eval()[0](x, y, y)[0], mha(x, y, y)[0])
    unbatched = x[0] if batch_first else x[:, 0]
    torch.testing.assert_close(
        split(unbatched, unbatched, unbatched)[0],
        mha(unbatched, unbatched, unbatched)[0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_ordering_moves_whole_heads_and_keeps_the_function() -> None:
    """Before a search the teacher's heads are sorted by their weights' L1 norm (whole
    heads; the MLP widths by their rows' L1 norm): the same function, heads in order."""
    from tasprune.importance import order_channels
    from tasprune.models.vit import ViT

    torch.manual_seed(0)
    net = ViT(10, 1, depth=2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ordered = order_channels(net, "bn", (1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), net(x), rtol=1e-5, atol=1e-5)
    for block in ordered.blocks:
        qkv = block.attn.qkv.weight.detach().abs().reshape(3, 4, 24, -1).mean((0, 2, 3))
        proj = block.attn.proj.weight.detach().abs().reshape(-1, 4, 24).mean((0, 2))
        score = (qkv * 3 + proj).tolist()
        assert score == sorted(score, reverse=True)
        fc1 = block.mlp[0].weight.detach().abs().sum(1).tolist()
        assert fc1 == sorted(fc1, reverse=True)
    assert not torch.equal(ordered.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize(
    "build",
    [
        _tv_maxvit,
        _tv_swin,
        _tv_swin_v2,
        _timm_xcit,
        _timm_davit,
        _timm_levit,
        _timm_cait,
        _timm_efficientformer_v2,
    ],
    ids=["maxvit", "swin", "v2", "xcit", "davit", "levit", "cait", "efficientformer_v2"],
)
def test_ordering_window_attention_keeps_the_function(build: Any) -> None:
    """Sorting the heads of torchvision's MaxViT and Swin moves their per-head tables (and
    Swin v2's per-head scales and bias-MLP rows) with them, and those of XCiT's attention
    across channels its per-head temperatures, LeViT's the batch norms on their rows, CaiT's
    the rows and columns of its linears across the heads and EfficientFormerV2's the depthwise
    conv on v's rows: the same function."""
    from tasprune.importance import order_channels
    from tasprune.models.attention import split_attention

    net = split_attention(build())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    side = getattr(build, "side", 32)
    ordered = order_channels(net, "bn", (3, side, side))
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), net(x), rtol=1e-4, atol=1e-4)

    def qkv(m: torch.nn.Module) -> torch.Tensor:
        fused = next(getattr(m, c) for c in ("qkv", "to_qkv", "kv", "v") if hasattr(m, c))
        return next(fused.parameters())  # its (first) weight

    pairs = zip(_readable(ordered), _readable(net), strict=True)
    assert any(not torch.equal(qkv(a), qkv(b)) for a, b in pairs)  # heads did move


def test_a_block_that_does_not_trace_is_asked_at_run_time() -> None:
    """A residual block whose forward the tracer cannot follow (a branch on a tensor's
    value) is a depth choice when, with its branches' outputs zeroed, it returns its input;
    a block that is not residual is not."""

    class Branchy(torch.nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.residual = residual
            self.f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.abs().sum() >= 0):  # data-dependent: symbolic tracing fails here
                return x + self.f(x) if self.residual else self.f(x)
            return x

    for residual in (True, False):
        blocks = [Branchy(residual) for _ in range(3 if residual else 2)]  # two sources
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), *blocks)
        tr = traced(register_module(net, torch.zeros(2, 4)))
        assert len(tr.stages) == int(residual)


def test_the_latency_table_times_attention_at_every_head_count() -> None:
    """A latency budget sees attention's token products: the cost function asks the table
    for them at each candidate head count, and the op runs at those widths."""
    from tasprune.latency_table import LatencyTable, TableKey
    from tasprune.search.supernet import SuperNet

    name = register_module(_vit(depth=2), torch.zeros(1, 1, 28, 28))
    net = SuperNet(name, num_classes=10, in_channels=1, input_size=(28, 28))
    table = LatencyTable(TableKey("test device", "eager", "torch test", 1, 2))
    net.latency_table = table
    with table.collecting() as wanted:
        net.expected_costs()
    attention = sorted((op, cout) for op, _, cout in wanted if op.kind == "attention")
    assert {cout for _, cout in attention} == {12, 24, 36, 48}  # 1 to 4 heads of 12
    op = attention[0][0]
    assert (op.size, op.head_dim, op.instances) == ((17, 17), 12, 1)  # 16 patches + cls token
    y = op.build(1, 24)(op.example(2, 1, 24))
    assert tuple(y.shape) == (2, 17, 24)


def test_the_latency_table_times_interleaved_attention_at_its_cost() -> None:
    """An interleaved attention's width counts q/k and v per head (2 heads of 4 + 8 here): the
    table's op runs that many heads, and its products cost what the cost function counts per
    head (tokens x tokens x (4 + 8)), not twice that."""
    from tasprune.latency_table import Op

    for size in ((5, 5), (5, 3)):  # keys from other tokens (a reduced map)
        op = Op("attention", size=size, head_dim=4, value_dim=8)
        attend = op.build(1, 24)
        x = op.example(1, 1, 24)
        with counting(attend) as fc:
            y = attend(x)
        assert tuple(y.shape) == (1, 5, 16)  # 2 heads of v's 8
        assert fc.get_total_flops() // 2 == size[0] * size[1] * 2 * (4 + 8)


def test_the_latency_table_times_attention_across_channels_at_its_cost() -> None:
    """Attention across channels (XCiT's): per head, each of its 4 channels attends to the
    head's 4 channels over 5 tokens: the op costs tokens x 4 x 4 per head, twice."""
    from tasprune.latency_table import Op

    op = Op("attention", size=(5, 5), head_dim=4, across=True)
    assert "channels" in op.label()
    attend = op.build(1, 12)
    with counting(attend) as fc:
        y = attend(op.example(1, 1, 12))
    assert tuple(y.shape) == (1, 5, 12)
    assert fc.get_total_flops() // 2 == 3 * 5 * 4 * 4 * 2


@pytest.mark.parametrize("seed", [0, 1])
def test_the_shipped_vit_builds_every_shape_at_its_cost(seed: int) -> None:
    """vit_fmnist at random shapes of its space (heads, MLP widths, blocks): built by
    create_model, it costs what the cost function says (attention included) at 28 and 32 px,
    and its weights move from the unpruned network."""
    import random

    from tasprune.models import create_model
    from tasprune.search.supernet import SuperNet

    net = SuperNet("vit_fmnist", num_classes=10, in_channels=1, input_size=(28, 28))
    shape = net.sample(random.Random(seed))
    small = create_model("vit_fmnist", shape, num_classes=10, in_channels=1).eval()
    for side in (28, 32):
        counted = _counted(small, torch.rand(1, 1, side, side))
        assert sum(counted.values()) // 2 == model_cost("vit_fmnist", shape, (1, side, side))[0]
    full = create_model("vit_fmnist", num_classes=10, in_channels=1)
    state = get_model_spec("vit_fmnist").transfer(full.state_dict(), shape, 10, 1)
    small.load_state_dict(state)


@needs_fashion_mnist
def test_tasprune_run_prunes_the_shipped_vit_and_it_loads_elsewhere(tmp_path: Path) -> None:
    """The shipped recipe, shrunk to a smoke run: teacher, search, student and report; the
    student has fewer heads or blocks, is in the band, and a fresh process loads it to the
    same outputs."""
    import subprocess
    import sys

    from tasprune import pipeline
    from tasprune.config import load_recipe

    recipe = load_recipe("fmnist-vit", TINY_RUN)
    out = tmp_path / "run"
    pipeline.run(recipe, out, progress=False)
    assert (out / "report.md").is_file()
    student = tasprune.load(out / "student" / "model.pt").eval()
    full = model_cost("vit_fmnist", None, (1, 28, 28))[0]
    with torch.no_grad():
        counted = _counted(student, torch.rand(1, 1, 28, 28))
    small = sum(counted.values()) // 2
    assert 0.45 * full - 1 <= small <= 0.5 * full + 1
    x = torch.rand(2, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, tasprune; net = tasprune.load(sys.argv[1]).eval(); "
        "torch.save(net(torch.load(sys.argv[2])).detach(), sys.argv[3])"
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(out / "student" / "model.pt"),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        check=True,
    )
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), student(x))


def _interleaved(name: str, **kw: Any) -> torch.nn.Module:
    """A small timm ``name`` (MaxxViT's and CoAtNet's from their config, narrower)."""
    import dataclasses

    from timm.models import maxxvit

    torch.manual_seed(0)
    if name.startswith(("maxvit", "coatnet")):
        cfg = maxxvit.model_cfgs[name.rsplit("_", 1)[0]]
        small = dataclasses.replace(cfg, depths=(1, 1, 1, 1), stem_width=(8, 16), **kw)
        net = maxxvit.MaxxVit(small, img_size=64, num_classes=5).eval()
    else:
        net = timm.create_model(name, num_classes=5, **kw).eval()
    with torch.no_grad():  # trained-like position biases (timm starts them at 0)
        for n, p in net.named_parameters():
            if "bias" in n and p.dim() == 2:
                p.normal_()
    return net


@pytest.mark.parametrize(
    ("name", "side", "kw"),
    [
        ("coatnet_nano_rw_224", 64, {"embed_dim": (32, 32, 64, 128)}),
        ("maxvit_nano_rw_256", 64, {"embed_dim": (32, 32, 64, 128)}),
        ("efficientformer_l1", 224, {"depths": (1, 1, 1, 2), "embed_dims": (16, 32, 64, 64)}),
        (
            "tiny_vit_5m_224",
            224,
            {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 64), "num_heads": (1, 2, 2, 4)},
        ),
    ],
    ids=["coatnet", "maxxvit", "efficientformer", "tiny_vit"],
)
def test_interleaved_heads_prune_to_what_was_searched(
    name: str, side: int, kw: dict[str, Any], tmp_path: Path
) -> None:
    """One fused projection with the heads one after the other ([q | k | v] of head 0, then
    of head 1; v wider than q and k in EfficientFormer): the choice counts heads, the search
    masks each head's v rows; ordering the heads keeps the function, and pruned to about half
    the heads the network is the searched one there, costs what was predicted (attention's
    products included) and exports with parity."""
    from tasprune.models.attention import find_attention, permute_heads

    net = _interleaved(name, **kw)
    x = torch.randn(2, 3, side, side)
    found = find_attention(net)[0]
    assert found and all(a.steps and a.unit == 1 for a in found)
    with torch.no_grad():
        ref = net(x)
        moved = copy.deepcopy(net)
        for att in found:
            permute_heads(moved, att, list(range(att.heads))[::-1])
        torch.testing.assert_close(moved(x), ref, rtol=1e-4, atol=1e-4)
    tas = tasprune.TAS(net, x[:1], epochs=1, flops_ratio=0.6)
    tr = traced(tas.name)
    searched = [g for g in tr.attention if tr.groups[g].fixed is None]
    assert len(searched) == sum(a.heads > 1 for a in found)
    half = {g: tr.groups[g].full // 2 for g in searched}
    shape = tr.full_shape().replace(widths=half)
    small = tas.prune(shape).eval()
    heads = sorted(head_count(m) or 0 for m in _readable(small) if (head_count(m) or 0) > 0)
    assert heads == sorted(max(1, a.heads // 2) if a.heads > 1 else 1 for a in found)
    got = _searched_is_pruned(tas, shape, small, x)
    counted = _counted(small, x[:1])
    assert counted["aten.bmm"] > 0
    assert sum(counted.values()) // 2 == model_cost(tas.name, shape, (3, side, side))[0]
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "net.onnx"
    torch.onnx.export(small, (x,), str(path), input_names=["x"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], got.numpy(), atol=1e-4)
