"""Multi-process training and search (DDP over gloo on CPU) against single-process runs.

One ``torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py`` launch (a module fixture,
bounded by ``TIMEOUT_S``) trains and searches on 256 real Fashion-MNIST images; see the worker's
docstring for what each rank does and reports.

What is compared, honestly:

- training: PyTorch's SyncBatchNorm refuses CPU modules under DDP, so the trained net has no
  BatchNorm; then 2 ranks x 16 images compute the same averaged gradient as 1 process x 32
  images up to float summation order, and the final weights, every epoch's train loss and the
  test metrics of the 2-rank run (interrupted after epoch 0 and resumed) match an
  uninterrupted 1-process run within float tolerance.
- search: the SuperNet normalises with per-rank batch statistics, so a 2-rank search is NOT
  numerically a 1-process search; what is checked is that both ranks end with bit-identical
  architecture logits and the same derived shape, and that rank 0 alone wrote the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tasprune
from ddp_worker import (
    GLOBAL_BATCH,
    tiny_data,
    tiny_net,
    train_config,
    train_loaders,
)
from tasprune import distributed
from tasprune.checkpoint import load_checkpoint
from tasprune.data import DeviceLoader
from tasprune.engine import fit
from tasprune.errors import ConfigError
from tasprune.shape import Shape

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # the whole 2-process launch; ~30 s on a busy 2-core machine
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
SRC = str(Path(tasprune.__file__).resolve().parents[1])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Run the worker on 2 gloo ranks; return the run folder and each rank's report."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir, results = root / "run", root / "results"
    results.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TASPRUNE_NO_PROGRESS": "1",
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(WORKER), str(run_dir), str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    reports = {r: json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)}
    return run_dir, reports


def _one_process_fit(out: Path) -> dict[str, Any]:
    train, test = tiny_data()
    return fit(tiny_net(), *train_loaders(train, test, 0, 1), train_config(), out, device=CPU)


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- 2 processes


def test_two_process_training_matches_one_process(
    ddp_run: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path
) -> None:
    run_dir, reports = ddp_run
    assert all(reports[r]["interrupted"] for r in (0, 1))  # the resume path was exercised
    assert reports[0]["train_metrics"] == reports[1]["train_metrics"]  # all-reduced metrics
    ref = _one_process_fit(tmp_path / "ref")
    two = reports[0]["train_metrics"]
    assert two["epochs"] == ref["epochs"]
    for key in ("train_loss", "loss", "top1", "top5", "train_top1"):
        assert two[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-4), key

    a = load_checkpoint(run_dir / "train" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "ref" / "model.pt")["model"]
    assert list(a) == list(b) and not any(k.startswith("module.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    init = tiny_net().state_dict()  # the runs trained: agreement is not "both stayed put"
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-2

    rows2, rows1 = _rows(run_dir / "train" / "history.jsonl"), _rows(tmp_path / "ref/history.jsonl")
    assert [r["epoch"] for r in rows2] == [0, 1]  # written once, not once per rank
    for r2, r1 in zip(rows2, rows1, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r2["test_loss"] == pytest.approx(r1["test_loss"], rel=1e-4)


def test_two_process_search_ranks_agree(ddp_run: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    run_dir, reports = ddp_run
    r0, r1 = reports[0], reports[1]
    assert r0["logits"] == r1["logits"]  # bit-identical architecture parameters
    assert r0["shape"] == r1["shape"] and r0["flops"] == r1["flops"]
    saved, meta = Shape.load(run_dir / "search" / "shape.json")
    assert saved.to_dict() == r0["shape"] and meta["flops"] == r0["flops"]
    assert r0["history_len"] == r1["history_len"] == 2
    assert [r["epoch"] for r in _rows(run_dir / "search" / "history.jsonl")] == [0, 1]
    state = load_checkpoint(run_dir / "search" / "checkpoint.pt")["model"]
    assert not any(k.startswith("module.") for k in state)


def test_only_rank_zero_writes(ddp_run: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    run_dir, reports = ddp_run
    assert reports[1]["writes"] == []
    assert any("final.json" in w for w in reports[0]["writes"])
    assert any("search_done.json" in w for w in reports[0]["writes"])
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_divergence_and_cpu_sync_bn_are_refused(
    ddp_run: tuple[Path, dict[int, dict[str, Any]]],
) -> None:
    _, reports = ddp_run
    for r in (0, 1):  # every rank raises, none is left waiting in a collective
        assert "differ between the 2 ranks" in reports[r]["diverged_error"]
        assert "Fix:" in reports[r]["sync_bn_error"]


# --------------------------------------------------------------------------- 1 process


def test_single_process_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = distributed.init_from_env("cpu")
    assert info == distributed.DistInfo(0, 0, 1, CPU) and info.is_main and not info.distributed
    assert not distributed.is_distributed() and distributed.is_main()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_mean(t).tolist() == [1, 2]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    model = tiny_net()
    assert distributed.wrap_ddp(model, CPU, sync_bn=True) is model  # nothing to sync
    assert distributed.unwrap(model) is model
    distributed.barrier()
    distributed.assert_same([t], "x")
    distributed.cleanup()


def test_per_rank_batch() -> None:
    assert distributed.per_rank_batch(256, 8) == 32
    assert distributed.per_rank_batch(GLOBAL_BATCH, 1) == GLOBAL_BATCH
    with pytest.raises(ConfigError, match=r"does not split over 3 processes.*Fix: use a multiple"):
        distributed.per_rank_batch(32, 3)


def test_partial_torchrun_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="Fix: launch with 'torchrun"):
        distributed.init_from_env("cpu")


def test_distributed_fit_without_process_group_is_refused() -> None:
    train, test = tiny_data()
    with pytest.raises(ConfigError, match="no process group"):
        fit(tiny_net(), *train_loaders(train, test, 0, 1), train_config(), None, distributed=True)


def test_sync_batchnorm_conversion_round_trips() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(36))
    params = list(model.parameters())
    keys = list(model.state_dict())
    distributed.convert_sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and isinstance(model[3], nn.SyncBatchNorm)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    distributed.revert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[3]) is nn.BatchNorm1d
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys


def test_one_rank_group_runs_the_ddp_code_path(tmp_path: Path) -> None:
    """In-process gloo group of size 1: DDP wrapping, all-reduces and barriers change nothing."""
    plain = _one_process_fit(tmp_path / "plain")
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert distributed.is_distributed() and distributed.get_world_size() == 1
        train, test = tiny_data()
        two_shards = DeviceLoader(train, 16, train=True, rank=0, world_size=2)
        with pytest.raises(ConfigError, match="sharded for 2 process"):
            fit(tiny_net(), two_shards, two_shards, train_config(), None)
        wrapped = _one_process_fit(tmp_path / "ddp")
    finally:
        distributed.cleanup()
    assert wrapped == pytest.approx(plain, rel=1e-5)
    a = load_checkpoint(tmp_path / "ddp" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "plain" / "model.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
