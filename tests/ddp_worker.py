"""One rank of the multi-process tests; tests/test_distributed.py launches it with torchrun.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py RUN_DIR RESULT_DIR

Every rank runs, over gloo on CPU:

1. ``fit`` of a tiny BatchNorm-free conv net on 256 real Fashion-MNIST images (global batch
   32, 2 epochs), interrupted after epoch 0 on every rank and resumed by a second call;
2. a 2-epoch TAS ``search`` of cifar_resnet20 on the same images (global batch 32);
3. negative checks: ``assert_same`` catches ranks that diverge, ``sync_bn`` on CPU is refused.

Run files go to RUN_DIR (``train/``, ``search/``). Each rank writes what it saw to
``RESULT_DIR/rank{R}.json``: its metrics, its derived shape, its architecture logits after the
search, and every write (open for writing, mkdir, rename, remove) it made inside RUN_DIR, as
recorded by a ``sys.addaudithook`` hook; rank 0 is expected to be the only one that wrote.

The helpers (data, model, configs) are imported by the test to build the 1-process reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tasprune.search.loop as search_loop
from tasprune import distributed
from tasprune.config import SearchConfig, TrainConfig
from tasprune.data import ArrayDataset, Augment, DeviceLoader
from tasprune.datasets import load_dataset
from tasprune.engine import fit
from tasprune.errors import ConfigError, TrainingError
from tasprune.search.supernet import SuperNet

GLOBAL_BATCH = 32
N_TRAIN, N_TEST = 256, 64


class Interrupt(Exception):
    """Raised by every rank after epoch 0 to simulate a crash and restart."""


def tiny_data() -> tuple[ArrayDataset, ArrayDataset]:
    """256 training and 64 test images: the first 320 of the Fashion-MNIST test split."""
    data = load_dataset("fashion-mnist", "test")
    return data.subset(torch.arange(N_TRAIN)), data.subset(torch.arange(N_TRAIN, N_TRAIN + N_TEST))


def tiny_net() -> nn.Module:
    """A conv net without BatchNorm, so 1 and 2 processes compute the same function."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def train_config() -> TrainConfig:
    return TrainConfig(
        epochs=2,
        batch_size=GLOBAL_BATCH,
        lr=0.2,
        channels_last="off",
        deterministic=True,
        amp=False,
    )


def search_config() -> SearchConfig:
    return SearchConfig(
        flops_ratio=0.5,
        epochs=2,
        batch_size=GLOBAL_BATCH,
        arch_lr=0.1,
        valid_batches=1,
        seed=0,
        channels_last="off",
    )


def train_loaders(
    train: ArrayDataset, test: ArrayDataset, rank: int, world: int
) -> tuple[DeviceLoader, DeviceLoader]:
    """Loaders sharded by rank; the per-rank batch is the global batch / world size."""
    batch = distributed.per_rank_batch(GLOBAL_BATCH, world)
    return (
        DeviceLoader(
            train,
            batch,
            train=True,
            augment=Augment(crop_padding=2, flip=True),
            seed=0,
            rank=rank,
            world_size=world,
        ),
        DeviceLoader(test, batch, train=False, rank=rank, world_size=world),
    )


def _record_writes(root: Path, log: list[str]) -> None:
    """Append to ``log`` every write-like file-system event under ``root`` (audit hook)."""
    prefix = str(root.resolve())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path: object) -> bool:
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        return isinstance(path, str) and os.path.abspath(path).startswith(prefix)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            writes = isinstance(mode, str) and any(c in mode for c in "wax+")
            if writes or (isinstance(flags, int) and flags & write_flags):
                log.append(f"open {args[0]}")
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate") and inside(args[0]):
            log.append(f"{event} {args[0]}")
        elif event == "os.rename" and (inside(args[0]) or inside(args[1])):
            log.append(f"{event} {args[0]} -> {args[1]}")

    sys.addaudithook(hook)


def main(run_dir: Path, result_dir: Path) -> None:
    info = distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    writes: list[str] = []
    _record_writes(run_dir, writes)
    report: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size}
    train_data, test_data = tiny_data()

    # 1. Training, interrupted after epoch 0 and resumed.
    def crash(epoch: int, row: dict[str, Any]) -> None:
        if epoch == 0:
            raise Interrupt

    cfg = train_config()
    try:
        loaders = train_loaders(train_data, test_data, info.rank, info.world_size)
        fit(tiny_net(), *loaders, cfg, run_dir / "train", device=info.device, on_epoch_end=crash)
    except Interrupt:
        report["interrupted"] = True
    distributed.barrier()  # a real restart begins after rank 0 finished its checkpoint
    loaders = train_loaders(train_data, test_data, info.rank, info.world_size)
    model = tiny_net()
    report["train_metrics"] = fit(model, *loaders, cfg, run_dir / "train", device=info.device)

    # 2. Search; keep a handle on the SuperNet to report this rank's logits.
    nets: list[SuperNet] = []
    build = search_loop.build_supernet

    def capturing_build(*args: Any, **kwargs: Any) -> SuperNet:
        net = build(*args, **kwargs)
        nets.append(net)
        return net

    search_loop.build_supernet = capturing_build
    result = search_loop.search(
        "cifar_resnet20", train_data, search_config(), run_dir / "search", device=info.device
    )
    report["shape"] = result.shape.to_dict()
    report["flops"] = result.flops
    report["history_len"] = len(result.history)
    report["logits"] = [p.detach().tolist() for p in nets[0].arch_parameters()]

    # 3. Negative checks.
    try:
        distributed.assert_same([torch.tensor([float(info.rank)])], "test values")
    except TrainingError as err:
        report["diverged_error"] = str(err)
    try:
        distributed.wrap_ddp(tiny_net(), info.device, sync_bn=True)
    except ConfigError as err:
        report["sync_bn_error"] = str(err)

    report["writes"] = list(writes)
    (result_dir / f"rank{info.rank}.json").write_text(json.dumps(report))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
