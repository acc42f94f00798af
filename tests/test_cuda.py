"""The CUDA path: the device loader, bf16 autocast and channels-last in training, a search
step and a distillation epoch, the CUDA latency table, ``torch.compile``, and a 1-process
NCCL group under torchrun.

Every test is marked ``cuda`` and skips where ``torch.cuda.is_available()`` is False, so the
CPU suite is unaffected; ``bench/gpu_check.sh`` runs them (``pytest -m cuda``) on a GPU
machine. Tiny nets on noise images: seconds each once CUDA is up.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasprune.arrays import ArrayDataset
from tasprune.checkpoint import load_checkpoint
from tasprune.config import DistillConfig, SearchConfig, TrainConfig
from tasprune.cost import model_cost
from tasprune.data import Augment, DeviceLoader, train_test_loaders
from tasprune.engine import fit
from tasprune.models import create_model, get_model_spec
from tasprune.shape import Shape

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = "cifar_resnet20"
CL = torch.channels_last


def _noise(n: int, size: int = 16, seed: int = 0) -> ArrayDataset:
    """``n`` one-channel noise images of ``size`` x ``size`` with labels 0-9."""
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(
        images=torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),
        labels=torch.randint(0, 10, (n,), generator=g),
        num_classes=10,
        mean=(0.5,),
        std=(0.25,),
        name="noise",
    )


def _half_shape() -> Shape:
    full = get_model_spec(MODEL).full_shape()
    return Shape(widths={k: max(1, v // 2) for k, v in full.widths.items()}, depths=full.depths)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_device_loader_gives_the_cpu_loaders_batches_on_the_gpu() -> None:
    """The epoch's randomness is drawn on the CPU, so the device-resident loader yields the
    CPU loader's batches (crop, flip, order), in channels-last when asked."""
    data = _noise(96)
    aug = Augment(crop_padding=2, flip=True)
    cpu = DeviceLoader(data, 32, train=True, augment=aug, seed=3)
    gpu = DeviceLoader(data, 32, train=True, augment=aug, seed=3, device="cuda", channels_last=True)
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8  # copied once, still uint8
    batches = 0
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.float32
        assert xg.is_contiguous(memory_format=CL)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
        assert torch.equal(yg.cpu(), yc)
        batches += 1
    assert batches == len(gpu) == 3


def test_fit_trains_under_bf16_autocast_in_channels_last(tmp_path: Path) -> None:
    """amp (the default) runs the training forward in bf16 and channels_last auto is on for
    CUDA; the parameters stay float32 and model.pt holds float32 CPU tensors."""
    torch.manual_seed(0)
    data = _noise(128)
    train, test = train_test_loaders(data, data, 32, device="cuda")
    model = create_model(MODEL, num_classes=10, in_channels=1)
    seen: list[tuple[bool, torch.dtype, bool]] = []

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append((mod.training, out.dtype, inputs[0].is_contiguous(memory_format=CL)))

    _first_conv(model).register_forward_hook(hook)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05)
    assert cfg.amp and cfg.channels_last == "auto"
    metrics = fit(model, train, test, cfg, tmp_path, device=torch.device("cuda"), progress=False)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["loss"])
    training = [s for s in seen if s[0]]
    assert len(training) == len(train)
    assert {dtype for _, dtype, _ in training} == {torch.bfloat16}
    assert all(cl for _, _, cl in training)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())
    assert _first_conv(model).weight.is_contiguous(memory_format=CL)
    saved = load_checkpoint(tmp_path / "model.pt")["model"]
    floats = [v for v in saved.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in floats)


def test_a_search_step_on_cuda_moves_the_logits_and_counts_the_argmax_cost_there() -> None:
    """One weight + architecture step (bf16 autocast, channels-last) on CUDA: finite losses,
    the logits move, and the argmax cost it computes on the device (no host read) equals the
    exact count of the derived shape."""
    from tasprune.search import SuperNet
    from tasprune.search.step import SearchStepper, make_optimizers

    torch.manual_seed(0)
    cfg = SearchConfig(flops_ratio=0.5, arch_lr=0.1)
    net = SuperNet(MODEL, num_classes=10, in_channels=1, input_size=(16, 16)).cuda()
    net = net.to(memory_format=CL).train()
    net.generator = torch.Generator().manual_seed(0)
    w_opt, w_sched, a_opt = make_optimizers(net, cfg, 10)
    stepper = SearchStepper(net, w_opt, w_sched, a_opt, cfg)
    before = [p.detach().clone() for p in net.arch_parameters()]
    x = torch.randn(16, 1, 16, 16, device="cuda").contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,), device="cuda")
    w_loss, a_loss, b_loss, cost = stepper.step(x, y, x, y)
    assert all(math.isfinite(float(v)) for v in (w_loss, a_loss, b_loss))
    assert isinstance(cost, torch.Tensor) and cost.is_cuda
    after = list(net.arch_parameters())
    assert all(p.is_cuda for p in after)
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))
    exact = net.shape_costs(net.derive())
    on_device = net.argmax_costs()
    for metric in ("flops", "params"):
        assert float(on_device[metric]) == pytest.approx(exact[metric], rel=1e-6)


def test_a_distillation_epoch_on_cuda(tmp_path: Path) -> None:
    """KD from a teacher on CUDA, the student initialised from its leading channels: finite
    metrics, the student's FLOPs those of the shape, model.pt written."""
    from tasprune.distill import distill

    torch.manual_seed(0)
    data = _noise(128)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    shape = _half_shape()
    cfg = DistillConfig(kd=True, init="teacher", train=TrainConfig(epochs=1, batch_size=32))
    metrics = distill(
        MODEL, shape, teacher, data, data, cfg, tmp_path, device="cuda", progress=False
    )
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["loss"])
    assert metrics["flops"] == model_cost(MODEL, shape, (1, 16, 16), 10)[0]
    assert next(teacher.parameters()).is_cuda
    assert (tmp_path / "model.pt").is_file()


def test_the_latency_table_on_cuda_times_layers_and_calibration_on_the_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table keyed to the GPU: every layer point and every calibration network is timed on
    CUDA (a table whose calibration ran on the CPU would mix two devices in one model), and the
    saved table is found again for the same key."""
    import tasprune.search.latency as lat
    from tasprune.latency_table import LatencyTable, TableKey
    from tasprune.search import SuperNet

    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))
    layer_devices: set[str] = set()
    network_devices: set[str] = set()
    time_eager, measure = lat.time_eager, lat.measure

    def spy_layer(model: nn.Module, x: torch.Tensor, *args: Any, **kw: Any) -> list[float]:
        layer_devices.add(x.device.type)
        return time_eager(model, x, *args, **kw)

    def spy_network(model: nn.Module, *args: Any, **kw: Any) -> dict[str, Any]:
        network_devices.add(next(model.parameters()).device.type)
        return measure(model, *args, **kw)

    monkeypatch.setattr(lat, "time_eager", spy_layer)
    monkeypatch.setattr(lat, "measure", spy_network)
    net = SuperNet(MODEL, num_classes=10, in_channels=1, input_size=(8, 8))
    cfg = SearchConfig(latency_ratio=0.5, latency_runtime="eager", latency_batch=4)
    table, (scale, rest), path = lat.build_table(net, cfg, progress=False, device="cuda")
    assert table.key.device == f"cuda {torch.cuda.get_device_name()}"
    assert table.entries and all(v > 0 for v in table.entries.values())
    assert math.isfinite(scale) and math.isfinite(rest)
    assert layer_devices == {"cuda"}
    assert network_devices == {"cuda"}, (
        f"calibration networks timed on {sorted(network_devices)} for a CUDA table "
        "(tasprune.search.latency._calibrate builds them on the CPU)"
    )
    again = LatencyTable.load(path, TableKey.here("eager", 1, 4, "cuda"))
    assert again is not None and again.entries == table.entries


def test_compiled_training_on_cuda_matches_eager(tmp_path: Path) -> None:
    """compile: true on CUDA (Inductor, Triton) trains as eager does in fp32, and model.pt holds
    the plain module's weights (no ``_orig_mod.`` prefix)."""
    from test_compile import _net

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=16)
    compiled, eager = _net(), _net()
    cfg = TrainConfig(epochs=2, lr=0.05, amp=False, deterministic=True)
    dev = torch.device("cuda")
    with_compile = cfg.model_copy(update={"compile": True})
    fit(compiled, loader, loader, with_compile, tmp_path, device=dev, progress=False)
    fit(eager, loader, loader, cfg, None, device=dev, progress=False)
    start = _net().to(dev)
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(compiled.parameters(), start.parameters(), strict=True)
    )
    assert moved > 1e-3  # training happened
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    saved = load_checkpoint(tmp_path / "model.pt")["model"]
    assert set(saved) == set(compiled.state_dict())


NCCL_WORKER = """
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from tasprune import distributed
from tasprune.arrays import ArrayDataset
from tasprune.config import SearchConfig, TrainConfig
from tasprune.data import DeviceLoader
from tasprune.engine import fit
from tasprune.models import create_model
from tasprune.search.loop import search

out = Path(sys.argv[1])
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
# tasprune's own set-up starts a group for 2+ processes only; one GPU allows one NCCL rank.
dist.init_process_group("nccl", device_id=dev)
info = distributed.init_from_env("cuda")
g = torch.Generator().manual_seed(0)
data = ArrayDataset(
    images=torch.randint(0, 256, (256, 1, 16, 16), dtype=torch.uint8, generator=g),
    labels=torch.randint(0, 10, (256,), generator=g),
    num_classes=10, mean=(0.5,), std=(0.25,), name="noise",
)
cfg = SearchConfig(epochs=1, batch_size=32, arch_lr=0.1, valid_batches=1)
result = search("cifar_resnet20", data, cfg, out / "search", device=dev, progress=False)
train = DeviceLoader(data, 32, train=True, device=dev, rank=info.rank, world_size=info.world_size)
test = DeviceLoader(data, 32, train=False, device=dev)
model = create_model("cifar_resnet20", num_classes=10, in_channels=1)
metrics = fit(model, train, test, TrainConfig(epochs=1, batch_size=32), out / "train",
              device=dev, progress=False)
mean = distributed.all_reduce_mean(torch.tensor([2.0], device=dev))
(out / "rank0.json").write_text(json.dumps({
    "backend": dist.get_backend(),
    "distributed": distributed.is_distributed(),
    "world_size": info.world_size,
    "device": str(info.device),
    "flops_ratio": result.flops_ratio,
    "train_loss": metrics["train_loss"],
    "mean": float(mean[0]),
}))
distributed.cleanup()
"""


def test_a_one_process_nccl_group_under_torchrun_searches_and_trains(tmp_path: Path) -> None:
    """torchrun with one process: an NCCL group, then a search and a fit through the DDP code
    paths (DDP wrapping, all-reduced metrics, rank-0 writes) on CUDA."""
    worker = tmp_path / "nccl_worker.py"
    worker.write_text(NCCL_WORKER)
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    env = {**os.environ, "TASPRUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [*cmd, str(worker), str(out)], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "rank0.json").read_text())
    assert report["backend"] == "nccl" and report["distributed"] is True
    assert report["world_size"] == 1 and report["device"] == "cuda:0"
    assert 0 < report["flops_ratio"] <= 1 and math.isfinite(report["train_loss"])
    assert report["mean"] == 2.0
    assert (out / "search" / "shape.json").is_file() and (out / "train" / "model.pt").is_file()
