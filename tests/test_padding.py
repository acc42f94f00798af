"""Zero-padding channel groups for export: the same function, widths on the runtime's blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_shape
from tasprune.models import create_model
from tasprune.padding import pad_channels

pytestmark = pytest.mark.usefixtures("fast_cpu")


def widths(net: nn.Module) -> list[int]:
    return [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("model", "side"),
    [("cifar_resnet20", 32), ("mobilenet_v2", 32), ("torchvision:densenet121", 32)],
)
def test_padding_keeps_the_function_and_aligns_every_width(model: str, side: int) -> None:
    torch.manual_seed(0)
    shape = random_shape(model, 1) if not model.startswith("torchvision:") else None
    if shape is None:
        from test_traced import candidate_shape

        shape = candidate_shape(model, 1)
    net = create_model(model, shape, num_classes=10, in_channels=3).eval()
    for m in net.modules():  # trained-looking BN statistics, so zeros are not trivially zero
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, side, side)
    with torch.no_grad():
        ref = net(x)
    assert pad_channels(net, 8, x[:1]) > 0
    with torch.no_grad():
        got = net.eval()(x)
    assert torch.allclose(got, ref, atol=1e-5)
    stem = widths(net)[0]
    assert all(w % 8 == 0 for w in widths(net) if w != 10), (stem, widths(net)[:8])


def test_onnx_export_is_padded_and_verified(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    import onnx

    from tasprune.checkpoint import save_checkpoint
    from tasprune.export import export_model

    shape = random_shape("cifar_resnet20", 2)
    net = create_model("cifar_resnet20", shape, num_classes=10, in_channels=1)
    meta = {
        "model": "cifar_resnet20",
        "shape": shape.to_dict(),
        "num_classes": 10,
        "in_channels": 1,
        "input_size": [1, 28, 28],
        "role": "student",
        "input": {
            "channels": 1,
            "height": 28,
            "width": 28,
            "mean": [0.5],
            "std": [0.25],
            "value_range": [0.0, 1.0],
        },
    }
    save_checkpoint(tmp_path / "model.pt", {"model": net.state_dict(), "meta": meta})
    padded = export_model(tmp_path / "model.pt", "onnx", tmp_path / "p.onnx")
    plain = export_model(tmp_path / "model.pt", "onnx", tmp_path / "u.onnx", pad_channels=0)

    def conv_outs(path):  # type: ignore[no-untyped-def]
        g = onnx.load(str(path)).graph
        inits = {i.name: i.dims for i in g.initializer}
        return [inits[n.input[1]][0] for n in g.node if n.op_type == "Conv"]

    assert all(c % 8 == 0 for c in conv_outs(padded))
    assert conv_outs(plain) != conv_outs(padded)
