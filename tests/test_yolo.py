"""Ultralytics YOLOv8n as its users hold it (built from its YAML, no hand-written C2f): every
width is searched, C2f's ``chunk(2)`` halves are one width choice pruned alike, and the pruned
network computes what the searched network computes at the kept shape, costing what the
analysis predicts."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from tasprune.cost import model_cost

pytestmark = pytest.mark.usefixtures("fast_cpu")


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type]:
    """Ultralytics' DetectionModel, offline (its settings in a folder of the test's own).
    Importing Ultralytics replaces PIL's ``Image.open`` process-wide (a HEIF fallback that
    pip-installs a plugin); the original is put back afterwards for the other tests."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("ultralytics")
    saved = {k: os.environ.get(k) for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR")}
    os.environ.update({"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder)})
    image_open = Image.open
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    yield tasks.DetectionModel
    Image.open = image_open
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _loss(out: object) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in tree_flatten(out)[0] if torch.is_tensor(t))  # type: ignore[return-value]


def test_yolov8n_searches_every_width_and_prunes_c2f_halves_alike(yolo: type) -> None:
    from tasprune.models.traced import traced

    torch.manual_seed(0)
    model = yolo("yolov8n.yaml", nc=3, verbose=False).eval()
    x = torch.rand(2, 3, 64, 64)
    tas = tasprune.TAS(model, x[:1], epochs=1, flops_ratio=0.5, arch_lr=0.5)
    tr = traced(tas.name)
    assert all(g.fixed is None for g in tr.groups.values()), [
        (n, g.fixed) for n, g in tr.groups.items() if g.fixed
    ]
    c2f = [n for n, m in model.named_modules() if type(m).__name__ == "C2f"]
    assert len(c2f) == 8
    assert {f"{n}.cv1.conv" for n in c2f} <= {n for n, g in tr.groups.items() if g.segments == 2}
    net = tas.model
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):
        net.train()
        loss = _loss(net(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tas.arch_step(lambda: _loss(net(x)))
    tas.end_epoch()
    shape = tas.shape()
    small = tas.prune().eval()
    assert type(small) is type(model)
    narrower = 0
    for name in c2f:  # both halves of cv1's output keep the same width
        block = small.get_submodule(name)
        assert block.cv1.conv.out_channels == 2 * block.m[0].cv1.conv.in_channels
        narrower += block.cv1.conv.out_channels < model.get_submodule(name).cv1.conv.out_channels
    assert narrower >= 6
    net.eval()
    with torch.no_grad(), tas.supernet.fixed(shape):
        tas.supernet.training = False
        want = tas.supernet.net(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x[:1])
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shape)[0]
    assert 0.45 <= model_cost(tas.name, shape)[0] / model_cost(tas.name)[0] <= 0.5 + 1e-9
    # C2f's bottlenecks are a depth choice where it has two: a dropped one leaves C2f.m and
    # its segment of the concatenation leaves cv2's input
    stages = {n: st.consumer for n, st in tr.stages.items()}
    assert stages == {"model.4.m.0": "model.4.cv2.conv", "model.6.m.0": "model.6.cv2.conv"}
    shallow = shape.replace(depths=dict.fromkeys(stages, 1))
    fresh = yolo("yolov8n.yaml", nc=3, verbose=False)
    short = tasprune.prune(fresh, shallow, example_inputs=x[:1])
    short.load_state_dict(tas.supernet.plain_state_dict(shallow))
    assert len(short.model[4].m) == len(short.model[6].m) == 1
    assert short.model[4].cv2.conv.in_channels == 3 * short.model[4].c
    with torch.no_grad(), tas.supernet.fixed(shallow):
        want = tas.supernet.net(x)
    with torch.no_grad():
        got = short.eval()(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        short(x[:1])
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shallow)[0]


def test_a_chunk_along_the_channels_is_one_width_in_equal_parts() -> None:
    """A plain module with C2f's pattern (chunk in two; the second half feeds a residual
    block and both reach the concatenation): one group whose two segments are masked and
    pruned alike, the pruned copy equal to the searched one."""

    class Split(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cv1 = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
            )
            self.m = torch.nn.Sequential(
                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            )
            self.cv2 = torch.nn.Conv2d(24, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.cv1(x).relu().chunk(2, 1)
            return self.cv2(torch.cat([a, b, b + self.m(b).relu()], 1))

    from tasprune.models.traced import traced

    torch.manual_seed(0)
    model, x = Split().eval(), torch.rand(2, 3, 16, 16)
    tas = tasprune.TAS(model, x, epochs=1, flops_ratio=0.6)
    g = traced(tas.name).groups["cv1.0"]
    assert (g.full, g.segments, g.fixed) == (8, 2, None)
    shape = tas.shape().replace(widths={"cv1.0": 5})
    small = tas.prune(shape).eval()
    assert (small.cv1[0].out_channels, small.m[0].in_channels, small.cv2.in_channels) == (10, 5, 15)
    with torch.no_grad(), tas.supernet.fixed(shape):
        tas.supernet.net.eval()
        tas.supernet.training = False
        want = tas.supernet.net(x)
    torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_yolo11n_searches_its_attention_heads(yolo: type) -> None:
    """YOLO11n: its C2PSA attention's heads are a width choice (its inside is not walked by
    Torch-Pruning, whose walk there did not end, so the whole graph is traced)
    (q/k/v in one conv with its batch norm, [q | k | v] per head, a depthwise conv on v added
    to the heads' output), its token products costed, nothing left as a constant rest; at one
    head the pruned network is the searched one, and it costs what the analysis predicts."""
    import copy

    from tasprune.models.layer_cost import cost_layers
    from tasprune.models.traced import traced

    torch.manual_seed(0)
    model = yolo("yolo11n.yaml", nc=3, verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    tas = tasprune.TAS(model, x, epochs=1, flops_ratio=0.6)
    tr = traced(tas.name)
    assert len(tr.searchable_groups()) >= 50
    assert [a.name for a in tr.attention.values()] == ["model.10.m.0.attn"]
    assert all(tr.groups[g].fixed is None for g in tr.attention)
    assert cost_layers(tr, copy.deepcopy(tr.template), tr.example)[2] == 0
    one = tr.full_shape().replace(widths=dict.fromkeys(tr.attention, 1))
    small = tas.prune(one).eval()
    assert small.model[10].m[0].attn.num_heads == 1
    with torch.no_grad(), tas.supernet.fixed(one):
        tas.supernet.net.eval()
        tas.supernet.training = False
        want = tas.supernet.net(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    shape = tas.shape()
    small = tas.prune().eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x)
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shape)[0]
    assert model_cost(tas.name, shape)[0] / model_cost(tas.name)[0] <= 0.6 + 1e-9
