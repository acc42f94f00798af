"""Coverage of the traced path: every torchvision classification CNN and a fixed list of timm
CNN families, each through the whole path a user's network takes, on a small input.

Per model, in its own subprocess (a crash or hang is that model's failure), four checks:

1. **path**: build -> channel groups and depth stages from the traced graph -> SuperNet -> two
   search iterations (weight + architecture step on random data) -> derive at FLOPs ratio 0.5
   (projected into the band) -> physical prune -> forward -> counted FLOPs (torch.utils.
   flop_counter) equal to the prediction and inside the band -> ONNX export with the ONNX
   Runtime parity check.
2. **full shape**: the unpruned network gets trained-like weights (every norm layer's affine
   drawn around 1 / 0, its running statistics measured on random data then perturbed per
   channel, every constant-initialised parameter such as a zero bias or a layer scale drawn
   around its value), so that a wrong copy of any tensor shows; ``tasprune.prune`` at the FULL
   shape from its state dict (the teacher -> student transfer of a real run) must reproduce its
   outputs.
3. **checkpoint**: the network pruned at the searched shape from those weights is saved as a
   real run saves its student (``save_checkpoint`` of ``portable_state`` with
   ``distill.model_meta``'s meta), loaded by ``tasprune.load`` in a fresh process, and its
   outputs must match the in-process network's.
4. **report**: what a user's run ends with. ``tasprune.run`` of a one-epoch recipe (teacher,
   search, distill, each 1 epoch at lr 0.01 on a random ImageFolder of 40 + 20 images at the
   model's input side) must finish every stage and write report.json, report.md and the plots:
   widths, search trajectory, training, and depths exactly when the network has depth choices
   (else the report's note), with the pruned network inside the FLOPs band. A whole run costs
   1 to 3 times the path check (5-19 s on small networks, 140 s on vgg11_bn at 224 px, one
   thread), so this check runs on the fixed, diverse list ``REPORT_MODELS`` only (residual
   with depth choices, MNASNet, plain convs without depth choices, concatenations, timm's
   SE/hard-swish blocks, LayerNorm + layer scale); "-" in the table elsewhere.

Outputs are compared with ``TOLERANCE``: max |a - b| <= 1e-6 x max(1, max |reference|), a few
float32 ulps; the table says "exact" when they are bitwise equal (so far every one). One
swapped pair of channels in any tensor moved MNASNet's and ConvNeXt's outputs by 5e-5 to 20.
A model passes only if every check that applies to it passes; the checks add about 10 s to a
small model, and ``--timeout`` (default 900 s per model) bounds them all.

    python bench/bench_coverage.py [--only torchvision|timm] [--transformers]
                                   [--models NAME ...] [--fresh] [--results DIR]

``--transformers`` runs the transformer lists (torchvision's ViT, Swin and MaxViT; the timm
transformer and hybrid families of ``TIMM_TRANSFORMERS``) at their own input sizes; a model
with multi-head attention passes only if every attention module's heads are searched and the
FLOP counter sees attention's products (on the math attention kernel) in the pruned network.

Resumable: models already in DIR/coverage.json (default bench/results) with these four checks
are skipped (``--fresh`` redoes them; an entry written by the earlier, path-only version is
redone and does not count as passing). Writes DIR/coverage.json and DIR/coverage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RATIO = 0.5
SIDE = 64
CHECKS = ("path", "full_shape", "checkpoint", "report")
TOLERANCE = 1e-6  # relative to max(1, max |reference output|)
# The user's run (check 4) on these only: each a different kind of network.
REPORT_MODELS = (
    "torchvision:resnet18",  # residual streams, depth choices
    "torchvision:mnasnet0_5",  # its loading needs the state's version metadata
    "torchvision:vgg11_bn",  # plain convs: width choices, no depth choices
    "torchvision:densenet121",  # concatenations, no depth choices
    "timm:mobilenetv3_small_050",  # squeeze-excite, hard-swish, depthwise
    "timm:convnext_atto",  # LayerNorm, layer scale, depth choices
)

# Excluded by rule: networks over 200 M parameters at 10 classes (time, and ONNX's 2 GB
# limit): regnet_y_128gf, vit_h_14, vit_l_16, vit_l_32. The list is
# torchvision.models.list_models(module=torchvision.models) of torchvision 0.29.1 minus
# those: 67 CNNs and 6 transformers (vit_b_16, vit_b_32, swin_t/s/b, swin_v2_t/s/b, maxvit_t).
TRANSFORMER_PREFIXES = ("vit_", "swin_", "swin3d", "maxvit_")
TOO_LARGE = ("regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32")
# The timm list: the smallest variant of each CNN family (fixed before the first run).
TIMM = [
    "resnet18",
    "resnet18d",
    "resnet26t",
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "wide_resnet50_2",
    "resnetv2_50",
    "resnetrs50",
    "res2net50_14w_8s",
    "res2next50",
    "resnest14d",
    "skresnet18",
    "eca_resnet33ts",
    "gcresnet33ts",
    "regnetx_002",
    "regnety_002",
    "regnetz_b16",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "mnasnet_small",
    "mixnet_s",
    "fbnetc_100",
    "spnasnet_100",
    "tinynet_e",
    "lcnet_050",
    "ghostnet_050",
    "ghostnetv2_100",
    "hardcorenas_a",
    "semnasnet_050",
    "densenet121",
    "dla34",
    "dpn48b",
    "convnext_atto",
    "convnextv2_atto",
    "cspresnet50",
    "cspdarknet53",
    "cs3darknet_s",
    "darknet53",
    "nf_resnet26",
    "rexnet_100",
    "hrnet_w18_small",
    "selecsls42b",
    "vovnet39a",
    "ese_vovnet19b_dw",
    "gernet_s",
    "repvgg_a0",
    "inception_v3",
    "xception41",
    "mobileone_s0",
    "repghostnet_050",
    "hgnet_tiny",
    "hgnetv2_b0",
    "vgg11_bn",
    "fastvit_t8",
    "efficientvit_b0",
    "tresnet_m",
    "dm_nfnet_f0",
]


# The timm transformers and hybrids: the smallest variant of each family (fixed before the
# first run). A model with multi-head attention passes only if every attention module's heads
# are searched and the counter sees attention's products in the pruned network.
TIMM_TRANSFORMERS = [
    "deit_tiny_patch16_224",
    "vit_tiny_patch16_224",
    "eva02_tiny_patch14_224",
    "cait_xxs24_224",
    "swin_tiny_patch4_window7_224",
    "swinv2_cr_tiny_ns_224",
    "efficientvit_m0",
    "levit_128s",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "mobilevit_xxs",
    "mobilevitv2_050",
    "edgenext_xx_small",
    "coatnet_nano_rw_224",
    "coat_lite_tiny",
    "fastvit_sa12",
    "poolformer_s12",
    "convformer_s18",
    "caformer_s18",
    "pit_ti_224",
    "tnt_s_patch16_224",
    "xcit_nano_12_p16_224",
    "crossvit_tiny_240",
    "twins_pcpvt_small",
    "pvt_v2_b0",
    "nextvit_small",
    "maxvit_nano_rw_256",
    "tiny_vit_5m_224",
    "davit_tiny",
    "gcvit_xxtiny",
]


def torchvision_models(transformers: bool = False) -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [
        n
        for n in sorted(names)
        if n.startswith(TRANSFORMER_PREFIXES) == transformers and n not in TOO_LARGE
    ]


def is_transformer(model: str) -> bool:
    kind, name = model.split(":", 1)
    return name in TIMM_TRANSFORMERS if kind == "timm" else name.startswith(TRANSFORMER_PREFIXES)


def input_side(model: str) -> int:
    from tasprune.models.traced import min_side

    if is_transformer(model):  # position embeddings and windows fix the input size
        if model.startswith("timm:"):
            import timm

            cfg = timm.models.get_pretrained_cfg(model[5:])
            return int(cfg.input_size[-1]) if cfg is not None else 224
        return 224
    if model.split(":", 1)[1].startswith(("vgg", "alexnet")):
        return 224  # ONNX's adaptive average pool needs the 7x7 grid to divide the feature map
    return max(SIDE, min_side(model))


class Check:
    """One check's record: its current step, and ok / failed with the step and why."""

    def __init__(self) -> None:
        self.step = ""
        self.detail: str | None = None  # e.g. the output difference, for the table

    def diff(self, got: Any, ref: Any) -> None:
        """Record how far ``got`` is from ``ref``; raise when beyond ``TOLERANCE``."""
        import torch

        if tuple(got.shape) != tuple(ref.shape):
            raise RuntimeError(f"output shape {tuple(got.shape)}, not {tuple(ref.shape)}")
        if torch.equal(got, ref):
            self.detail = "exact"
            return
        diff = float((got - ref).abs().max())
        scale = max(1.0, float(ref.abs().max()))
        self.detail = f"{diff:.1e}"
        if not diff <= TOLERANCE * scale:  # also catches NaN
            raise RuntimeError(f"outputs differ by {diff:.3g} (max |reference| {scale:.3g})")


def run_one(model: str) -> dict[str, Any]:
    """Every check on one model: ok / failed / skipped (with the step and why) per check."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, Any] = {"model": model, "checks": {}, "details": {}, "errors": {}}
    out["check_seconds"] = {}
    t0 = time.perf_counter()
    found: dict[str, Any] = {}  # what one check hands to the next
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        steps: list[tuple[str, Callable[[Check], None], tuple[str, ...]]] = [
            ("path", lambda c: check_path(model, c, out, found), ()),
            ("full_shape", lambda c: check_full_shape(model, c, found), ()),
            ("checkpoint", lambda c: check_checkpoint(model, c, found, Path(tmp)), ("path",)),
            ("report", lambda c: check_user_run(model, c, found, Path(tmp)), ()),
        ]
        for name, fn, needs in steps:
            if name == "report" and model not in REPORT_MODELS:
                out["checks"][name] = "-"
                continue
            missing = [n for n in needs if out["checks"].get(n) != "ok"]
            if missing:
                out["checks"][name] = "skipped"
                out["errors"][name] = f"needs the {', '.join(missing)} check"
                continue
            c, started = Check(), time.perf_counter()
            try:
                fn(c)
                out["checks"][name] = "ok"
            except Exception as err:  # noqa: BLE001  (the table records every failure)
                first = str(err).splitlines()[0] if str(err) else ""
                out["checks"][name] = "failed"
                out["errors"][name] = f"{c.step}: {type(err).__name__}: {first[:300]}"
            out["check_seconds"][name] = round(time.perf_counter() - started, 1)
            if c.detail is not None:
                out["details"][name] = c.detail
    failed = [n for n in CHECKS if out["checks"][n] not in ("ok", "-")]
    out["status"] = "failed" if failed or out.get("attention_error") else "ok"
    if failed:
        step, _, error = out["errors"][failed[0]].partition(": ")
        out.update(step=f"{failed[0]}/{step}", error=error)
    elif out.get("attention_error"):
        out.update(step="path/heads", error=out["attention_error"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def heads_status(tr: Any) -> tuple[list[str], dict[str, str]]:
    """The multi-head attention modules of a traced network (a single head has no head count
    to search) and, for those whose heads are not searched, why ("Class: reason")."""
    from tasprune.models.attention import attention_modules, head_count

    mods = {n: m for n, m in attention_modules(tr.template) if head_count(m) != 1}
    fixed = {a.name: tr.groups[g].fixed for g, a in tr.attention.items()}
    missing = {
        n: f"{type(m).__name__}: {fixed.get(n) or 'its projections are not read'}"
        for n, m in mods.items()
        if n not in fixed or fixed[n] is not None
    }
    return list(mods), missing


def check_path(model: str, c: Check, out: dict[str, Any], found: dict[str, Any]) -> None:
    """Search, derive, prune, exact FLOPs inside the band, ONNX parity."""
    import torch
    import torch.nn.functional as F

    from tasprune.config import SearchConfig
    from tasprune.models import create_model
    from tasprune.models.layer_cost import counting
    from tasprune.models.traced import traced
    from tasprune.search.supernet import SuperNet

    c.step = "build"
    side = input_side(model)
    tr = traced(model)
    c.step = "groups"
    attention, missing = heads_status(tr)
    out["attention_modules"] = len(attention)
    out["heads_searched"] = len(attention) - len(missing)
    if missing:
        first, why = next(iter(missing.items()))
        out["attention_error"] = (
            f"the heads of {len(missing)} of {len(attention)} attention modules are not "
            f"searched ({first}: {why})"
        )
    out["width_choices"] = len(tr.searchable_groups())
    out["fixed_widths"] = len(tr.groups) - len(tr.searchable_groups())
    out["depth_choices"] = len(tr.stages)
    c.step = "supernet"
    cfg = SearchConfig(epochs=1, batch_size=8, flops_ratio=RATIO)
    net = SuperNet(
        model, num_classes=10, in_channels=3, input_size=(side, side), options=cfg.space()
    )
    net.train()
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.01, momentum=0.9)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.05)
    budget = cfg.budget
    c.step = "search"
    for _ in range(2):
        x, y = torch.randn(8, 3, side, side), torch.randint(0, 10, (8,))
        w_opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        w_opt.step()
        a_opt.zero_grad()
        flops, _ = net.expected_cost()
        hard, _ = net.argmax_cost()
        loss = F.cross_entropy(net(x), y) + budget.loss(flops, hard, net.full_flops, 2.0)
        loss.backward()
        a_opt.step()
    c.step = "derive"
    shape = net.project(net.derive(), budget)
    predicted, params = net.shape_cost(shape)
    out["flops_ratio"] = predicted / net.full_flops
    found.update(shape=shape, flops=predicted, params=params)
    c.step = "prune"
    pruned = create_model(model, shape, num_classes=10, in_channels=3).eval()
    c.step = "forward"
    # one image: the cost is per image, and what runs once per call whatever the batch (Swin
    # v2's bias MLP) counts once
    with counting(pruned) as counter:
        logits = pruned(torch.randn(1, 3, side, side))
    if tuple(logits.shape) != (1, 10):
        raise RuntimeError(f"output shape {tuple(logits.shape)}, not (1, 10)")
    c.step = "flops"
    counted = counter.get_total_flops() // 2  # 2 FLOPs per MAC
    products = counter.get_flop_counts().get("Global", {})
    out["attention_macs"] = sum(v for k, v in products.items() if "bmm" in str(k)) // 2
    if attention and out["attention_macs"] == 0 and "attention_error" not in out:
        out["attention_error"] = "the counter sees no attention products in the pruned network"
    out["counted_equals_predicted"] = counted == predicted
    out["params_equal"] = sum(p.numel() for p in pruned.parameters()) == params
    if counted != predicted:
        raise RuntimeError(f"counted {counted} MACs, predicted {predicted}")
    if not budget.contains(predicted, net.full_flops):
        raise RuntimeError(f"FLOPs ratio {predicted / net.full_flops:.3f} outside the band")
    c.step = "onnx"
    onnx_parity(pruned, side)


def onnx_parity(model: Any, side: int) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.rand(2, 3, side, side)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(got - ref).max())
    if diff > 1e-4 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"ONNX Runtime differs from PyTorch by {diff:.3g}")


def give_trained_weights(net: Any, side: int) -> None:
    """Random but non-trivial weights, in place: no two channels of a norm layer or of a
    constant-initialised parameter alike, so a tensor copied to the wrong place, or not at
    all, changes the outputs."""
    import torch
    from torch import nn

    norms = [
        m
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    with torch.no_grad():
        for p in net.parameters():
            if p.numel() > 1 and bool(p.min() == p.max()):  # zero biases, ones, layer scales
                value = float(p.flatten()[0])
                if value == 0.0:
                    p.normal_(0.0, 0.1)
                else:  # around the value, at least 0.1: a 1e-6 layer scale hides its block
                    size = max(abs(value), 0.1) if value > 0 else -max(abs(value), 0.1)
                    p.copy_(size * torch.empty_like(p).uniform_(0.5, 1.5))
        for m in norms:
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            m.reset_running_stats()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = None  # a cumulative average: the statistics of this batch
        net.train()
        net(torch.randn(8, 3, side, side))
        net.eval()
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            mean, var = m.running_mean, m.running_var
            assert mean is not None and var is not None  # track_running_stats
            std = var.clamp_min(1e-3).sqrt()
            mean.add_(0.1 * std * torch.randn_like(std))
            var.mul_(torch.empty_like(std).uniform_(0.8, 1.25))


def check_full_shape(model: str, c: Check, found: dict[str, Any]) -> None:
    """The network pruned at the full shape from trained weights is the original network."""
    import torch

    import tasprune
    from tasprune.models import create_model, get_model_spec
    from tasprune.weights import portable_state

    c.step = "build"
    side = input_side(model)
    full = get_model_spec(model).full_shape()
    original = create_model(model, full, num_classes=10, in_channels=3)
    c.step = "weights"
    give_trained_weights(original, side)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = original(x)
    if not bool(torch.isfinite(ref).all()) or float(ref.std()) == 0.0:
        raise RuntimeError("the trained-like network's outputs are not finite or constant")
    state = portable_state(original)
    found.update(state=state, x=x)
    c.step = "prune"
    copy = tasprune.prune(model, full, num_classes=10, in_channels=3, state=state).eval()
    c.step = "compare"
    with torch.no_grad():
        c.diff(copy(x), ref)


def check_checkpoint(model: str, c: Check, found: dict[str, Any], tmp: Path) -> None:
    """The pruned network, saved as a run saves its student, loaded in a fresh process."""
    import torch

    import tasprune
    from tasprune.api import as_array_dataset
    from tasprune.checkpoint import save_checkpoint
    from tasprune.data import Augment
    from tasprune.distill import model_meta
    from tasprune.weights import portable_state

    side, shape = input_side(model), found["shape"]
    c.step = "weights"
    state = found.get("state")
    if state is None:  # the full-shape check failed before its weights: plain ones then
        state = portable_state(tasprune.create_model(model, num_classes=10, in_channels=3))
    x = found.get("x", torch.randn(2, 3, side, side))
    c.step = "prune"
    student = tasprune.prune(model, shape, num_classes=10, in_channels=3, state=state).eval()
    with torch.no_grad():
        ref = student(x)
    c.step = "save"
    images = torch.randint(0, 256, (10, 3, side, side), dtype=torch.uint8)
    data = as_array_dataset(torch.utils.data.TensorDataset(images, torch.arange(10)), "random")
    aug = Augment().resolve(data.name, data.image_size)
    meta = model_meta(
        model, shape, data, "student", augment=aug, flops=found["flops"], params=found["params"]
    )
    ckpt = tmp / "student" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    save_checkpoint(ckpt, {"model": portable_state(student), "meta": meta})
    torch.save(x, tmp / "x.pt")
    c.step = "load"
    proc = subprocess.run(
        [sys.executable, __file__, "--reload", str(ckpt), str(tmp / "x.pt"), str(tmp / "y.pt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1])
    c.step = "compare"
    got = torch.load(tmp / "y.pt", weights_only=True)
    if got["params"] != sum(p.numel() for p in student.parameters()):
        raise RuntimeError(f"the loaded network has {got['params']} parameters")
    c.diff(got["logits"], ref)


def reload(ckpt: str, inputs: str, outputs: str) -> None:
    """The fresh process of the checkpoint check: load as a user does, run, save the outputs."""
    import torch

    import tasprune

    torch.set_num_threads(1)
    loaded = tasprune.load(ckpt)
    x = torch.load(inputs, weights_only=True)
    with torch.no_grad():
        logits = loaded.net(x)
    params = sum(p.numel() for p in loaded.net.parameters())
    torch.save({"logits": logits, "params": params}, outputs)


def random_image_folder(root: Path, side: int) -> None:
    """train/ (4 per class) and val/ (2 per class) of random RGB PNGs, 10 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for k in range(10):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def check_user_run(model: str, c: Check, found: dict[str, Any], tmp: Path) -> None:
    """A user's whole run, one epoch per stage, down to the report and its plots."""
    import tasprune
    from tasprune.config import load_recipe
    from tasprune.models import get_model_spec

    c.step = "data"
    side = input_side(model)
    random_image_folder(tmp / "images", side)
    train = {"epochs": 1, "batch_size": 8, "lr": 0.01, "grad_clip": 1.0}
    recipe = load_recipe(
        None,
        {
            "name": "coverage",
            "model": model,
            "device": "cpu",
            "data": {"name": "imagefolder", "root": str(tmp / "images"), "image_size": side},
            "teacher": {"train": train},
            "search": {**train, "valid_batches": 1, "flops_ratio": RATIO},
            "distill": {"init": "teacher", "train": train},
            "report": {"latency_batches": [1], "latency_repeats": 1},
        },
    )
    c.step = "run"
    run = tmp / "run"
    result = tasprune.run(recipe, run, progress=False)
    c.step = "report"
    if set(result["status"].values()) != {"ran"}:
        raise RuntimeError(f"stages {result['status']}")
    report = json.loads((run / "report.json").read_text())
    if not (run / "report.md").is_file():
        raise RuntimeError("no report.md")
    plots = {"widths", "search_trajectory", "training"}
    if get_model_spec(model).full_shape().depths:
        plots.add("depths")
    elif not any(n.startswith("depths.png skipped") for n in report["notes"]):
        raise RuntimeError("no depth choices, and no note saying the depth plot is skipped")
    drawn = {p.stem for p in (run / "plots").glob("*.png")}
    if drawn != plots or set(report["plots"]) != plots:
        raise RuntimeError(f"plots {sorted(drawn)}, not {sorted(plots)}")
    if report["search"].get("pruned_in_band") is not True:
        raise RuntimeError(f"pruned FLOPs ratio {report['pruned']['flops_ratio']:.3f} off band")
    c.detail = f"FLOPs ratio {report['pruned']['flops_ratio']:.3f}"


COLUMNS = {
    "path": "search, prune, FLOPs, ONNX",
    "full_shape": "full shape from trained weights",
    "checkpoint": "checkpoint in a fresh process",
    "report": "user's run + report",
}


def whole_path(r: dict[str, Any]) -> bool:
    """Recorded with every check of this version (an older, path-only entry is not)."""
    return set(r.get("checks", {})) == set(CHECKS)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ["model", "status", *COLUMNS.values()]
    head += ["width choices", "depth choices", "FLOPs ratio", "s", "failed check/step: why"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        ratio = f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else ""
        why = f"{r.get('step')}: {r.get('error', '')}" if r["status"] != "ok" else ""
        cells = []
        for check in CHECKS:
            state = r.get("checks", {}).get(check, "not run")
            detail = r.get("details", {}).get(check)
            cells.append(f"{state} ({detail})" if state == "ok" and detail else state)
        status = r["status"] if whole_path(r) else "old (path only)"
        rows.append(
            f"| {name} | {status} | {' | '.join(cells)} | {r.get('width_choices', '')} | "
            f"{r.get('depth_choices', '')} | {ratio} | {r['seconds']} | {why.replace('|', '/')} |"
        )
    return "\n".join(rows)


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for kind, transformers in [(k, t) for k in ("torchvision", "timm") for t in (False, True)]:
        rs = [
            r
            for n, r in results.items()
            if n.startswith(kind + ":") and is_transformer(n) == transformers
        ]
        if not rs:
            continue
        if transformers:
            kind += " transformers"
        ok = sum(r["status"] == "ok" and whole_path(r) for r in rs)
        per = []
        for check in CHECKS:
            done = [r for r in rs if r.get("checks", {}).get(check, "-") != "-"]
            passed = sum(r["checks"][check] == "ok" for r in done)
            per.append(f"{COLUMNS[check]} {passed}/{len(done)}")
        old = sum(not whole_path(r) for r in rs)
        stale = f"; {old} recorded without the whole-path checks count as failing" if old else ""
        lines.append(f"- {kind}: {ok} of {len(rs)} pass every check ({', '.join(per)}){stale}")
    lines.append(
        f"- {COLUMNS['report']}: on the {len(REPORT_MODELS)} networks of REPORT_MODELS only "
        f"({', '.join(REPORT_MODELS)}); '-' elsewhere"
    )
    return "\n".join(lines)


def isolated(script: str, model: str, timeout: int) -> dict[str, Any]:
    """``script --one model`` in a subprocess, one thread: the record its last stdout line
    holds; a crash (no record) or a hang is a failed record naming the step "process" or
    "timeout". The coverage scripts' one way of running a model alone."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, script, "--one", model],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
        try:
            r: dict[str, Any] = json.loads(last[0]) if last else {}
        except json.JSONDecodeError:
            r = {}
        if "status" not in r:
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            r = {"model": model, "status": "failed", "step": "process", "error": why[:300]}
    except subprocess.TimeoutExpired:
        r = {"model": model, "status": "failed", "step": "timeout", "error": f"over {timeout} s"}
    r.setdefault("seconds", round(time.perf_counter() - t0, 1))
    return r


def run_isolated(model: str, timeout: int) -> dict[str, Any]:
    """``run_one`` in a subprocess; a crash or a hang is that model's failure."""
    r = isolated(__file__, model, timeout)
    if r["status"] != "ok" and "checks" not in r:  # the whole process failed: every check did
        r["checks"] = {
            n: "-" if n == "report" and model not in REPORT_MODELS else "failed" for n in CHECKS
        }
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["torchvision", "timm"])
    ap.add_argument(
        "--transformers", action="store_true", help="the transformer lists instead of the CNNs"
    )
    ap.add_argument("--models", nargs="+", help="names with their prefix (torchvision:...)")
    ap.add_argument("--fresh", action="store_true", help="redo models already recorded")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument(
        "--results", type=Path, default=RESULTS, help="folder of coverage.json and coverage.md"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess entry
    ap.add_argument("--reload", nargs=3, help=argparse.SUPPRESS)  # the checkpoint's fresh load
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    if args.reload:
        reload(*args.reload)
        return
    tv, tm = torchvision_models(args.transformers), TIMM_TRANSFORMERS if args.transformers else TIMM
    models = args.models or (
        ([] if args.only == "timm" else [f"torchvision:{n}" for n in tv])
        + ([] if args.only == "torchvision" else [f"timm:{n}" for n in tm])
    )
    folder: Path = args.results
    path = folder / "coverage.json"
    data = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results: dict[str, dict[str, Any]] = data["models"]
    for i, model in enumerate(models):
        if model in results and whole_path(results[model]) and not args.fresh:
            continue
        r = run_isolated(model, args.timeout)
        results[model] = r
        print(
            f"[{i + 1}/{len(models)}] {model}: {r['status']} "
            f"{r.get('step', '')} {r.get('error', '')[:120]} ({r['seconds']} s)",
            flush=True,
        )
        data.update(
            ratio=RATIO,
            input_side=SIDE,
            checks=list(CHECKS),
            tolerance=TOLERANCE,
            report_models=list(REPORT_MODELS),
            torch_pruning_metapruner_anchor="61 of 65",
        )
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "coverage.md").write_text(summary(results) + "\n\n" + table(results) + "\n")
    print(summary(results))


if __name__ == "__main__":
    main()
