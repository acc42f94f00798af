"""Multi-process (DistributedDataParallel) support: set-up from ``torchrun``, collectives, rank 0.

Every stage runs unchanged in one process. Under ``torchrun --nproc-per-node N`` each process
calls :func:`init_from_env` once; from then on :func:`tasprune.engine.fit` and
:func:`tasprune.search.loop.search` see an initialised process group and

- wrap the model in DDP (gradients are averaged over ranks after every backward),
- expect their loaders sharded by rank (``DeviceLoader(..., rank=, world_size=)``),
- all-reduce their metrics, so every rank returns the same numbers,
- write files, history rows, INFO logs and progress bars on rank 0 only; the other ranks wait
  at a barrier before returning, so whatever runs next can read what rank 0 wrote.

Batch sizes in configs are GLOBAL (images per optimiser step over all ranks), so a recipe gives
the same optimisation on 1 or 8 GPUs; whoever builds a loader passes
``per_rank_batch(cfg.batch_size, world_size)`` to it. Equal results hold up to float summation
order, and up to BatchNorm: without SyncBatchNorm each rank normalises with the statistics of
its own per-rank batch (the usual DDP behaviour).

Outside ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper here is a cheap no-op.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from tasprune.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "assert_same",
    "barrier",
    "broadcast_object",
    "check_sharded",
    "cleanup",
    "configure_rank_logging",
    "convert_sync_batchnorm",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main",
    "per_rank_batch",
    "revert_sync_batchnorm",
    "sync_buffers",
    "unwrap",
    "wrap_ddp",
]

_LAUNCH_FIX = (
    "Fix: launch with 'torchrun --nproc-per-node N -m tasprune.cli ...', which sets RANK, "
    "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, process count, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


# --------------------------------------------------------------------------- set-up


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as err:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer. {_LAUNCH_FIX}"
        ) from err


def _device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA exists, else CPU."""
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise ConfigError(
            f"device {name!r} cannot be used with {world_size} processes: each rank takes "
            "cuda:LOCAL_RANK. Fix: use --device auto, cuda or cpu"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' requested but CUDA is not available on this machine. "
            "Fix: use --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"local rank {local_rank} has no GPU: this node has {count}. "
            f"Fix: use --nproc-per-node {count} or fewer"
        )
    return torch.device("cuda", local_rank)


def init_from_env(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment; return where we are.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised and the device is ``device`` as
    :func:`tasprune.utils.pick_device` resolves it. Otherwise the backend is NCCL on CUDA
    (after ``torch.cuda.set_device(LOCAL_RANK)``) and gloo on CPU; ``device`` may then only be
    ``auto``, ``cuda`` or ``cpu``. Calling it again returns the same answer.
    ``timeout_s`` bounds how long a collective waits for a dead or stuck peer.
    """
    from tasprune.utils import pick_device

    world_size = _env_int("WORLD_SIZE")
    if world_size is None or world_size <= 1:
        if dist.is_available() and dist.is_initialized():
            return _current_info(device)
        local = _env_int("LOCAL_RANK") or 0
        dev = pick_device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > local:
            dev = torch.device("cuda", local)
        return DistInfo(0, local, 1, dev)
    if not dist.is_available():
        raise ConfigError(
            "this PyTorch build has no torch.distributed. Fix: install a build with it, or run "
            "a single process"
        )
    if dist.is_initialized():
        return _current_info(device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if rank is None or local_rank is None or missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} is set but RANK/LOCAL_RANK/MASTER_* are not. {_LAUNCH_FIX}"
        )
    dev = _device_for(device, local_rank, world_size)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    # Leave the group while the interpreter is still whole: a process that exits with the
    # group alive can abort (SIGABRT) in gloo's worker threads during finalisation.
    atexit.register(cleanup)
    info = DistInfo(rank, local_rank, world_size, dev)
    if info.is_main:
        logger.info(
            "distributed: %d processes, backend %s, rank 0 on %s",
            world_size,
            dist.get_backend(),
            dev,
        )
    return info


def _current_info(device: str) -> DistInfo:
    """DistInfo of an already initialised group (an idempotent second call)."""
    world = dist.get_world_size()
    local = _env_int("LOCAL_RANK") or 0
    dev = _device_for(device, local, world)
    return DistInfo(dist.get_rank(), local, world, dev)


def cleanup() -> None:
    """Leave the process group (call once at the very end, on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def configure_rank_logging(name: str = "tasprune") -> None:
    """Keep INFO logs of ``name`` on rank 0; other ranks log WARNING and above only.

    Call after the CLI has set its handlers and level (it overrides a level set earlier).
    """
    if not is_main():
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- queries


def is_distributed() -> bool:
    """True when a process group is initialised (DDP code paths are active)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return get_rank() == 0


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Per-rank batch of a global batch split over ``world_size`` ranks (must divide evenly).

    Configs hold the global batch so results do not depend on the GPU count; loaders take the
    per-rank batch.
    """
    if global_batch < 1 or world_size < 1:
        raise ConfigError(
            f"batch {global_batch} / world size {world_size} must be positive. "
            "Fix: use a positive batch_size"
        )
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        raise ConfigError(
            f"batch_size {global_batch} (global) does not split over {world_size} processes. "
            f"Fix: use a multiple of {world_size}, e.g. {lower or world_size}"
        )
    return global_batch // world_size


def check_sharded(loader: object, what: str, *, allow_unsharded: bool = False) -> None:
    """Refuse a loader whose ``world_size`` attribute does not match the process group.

    An unsharded training loader under DDP would make every rank train on the same batches.
    A loader without the attribute (any iterable) is trusted. ``allow_unsharded`` accepts
    ``world_size == 1`` too (evaluation: every rank then sees all data; counts still agree).
    """
    world = get_world_size()
    ws = getattr(loader, "world_size", None)
    if not isinstance(ws, int) or ws == world or (allow_unsharded and ws == 1):
        return
    raise ConfigError(
        f"the {what} loader is sharded for {ws} process(es) but {world} are running. "
        f"Fix: build it with DeviceLoader(..., rank=get_rank(), world_size={world})"
    )


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks, in place; returns it (unchanged in one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank.

    Under DDP each rank updates its running statistics from its own shard after the last
    forward; syncing before evaluating and saving makes every rank hold the model rank 0 saves.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def assert_same(tensors: Iterable[Tensor], what: str) -> None:
    """Raise :class:`TrainingError` on every rank if ``tensors`` differ between ranks.

    Exact comparison against rank 0's copy: one broadcast of the concatenation plus one
    all-reduce of a flag, so every rank raises (none is left waiting in a collective).
    """
    if not is_distributed():
        return
    parts = [t.detach().reshape(-1).double() for t in tensors]
    if not parts:
        return
    local = torch.cat(parts)
    ref = local.clone()
    dist.broadcast(ref, src=0)
    bad = (ref != local).any().to(torch.int64).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if int(bad.item()):
        raise TrainingError(
            f"{what} differ between the {get_world_size()} ranks, so they no longer train the "
            "same network. Fix: give every rank the same seed, config and data, and report it "
            "with the run's history.jsonl if they had"
        )


# --------------------------------------------------------------------------- DDP wrapping


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by a SyncBatchNorm sharing its parameters and buffers.

    Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm`` it remembers each layer's class, so
    :func:`revert_sync_batchnorm` can give the caller back a plain model (same state_dict keys).
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        sync = _rebuilt_bn(nn.SyncBatchNorm, module)
        setattr(sync, "_tasprune_original", type(module))  # noqa: B010 (not a declared attr)
        return sync
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            module.add_module(name, new)
    return module


def _rebuilt_bn(cls: type[_BatchNorm], module: _BatchNorm) -> Any:
    """A ``cls`` batch-norm layer sharing ``module``'s parameters, buffers and mode."""
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,  # type: ignore[arg-type]
        module.affine,
        module.track_running_stats,
    )
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` (layers it did not make are left alone)."""
    original = getattr(module, "_tasprune_original", None)
    if isinstance(module, nn.SyncBatchNorm) and original is not None:
        return _rebuilt_bn(original, module)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            module.add_module(name, new)
    return module


def wrap_ddp(
    model: nn.Module,
    device: torch.device,
    *,
    sync_bn: bool = False,
    ignore: Sequence[str] = (),
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``model`` in DistributedDataParallel, or ``model`` itself without a process group.

    ``ignore`` names parameters/buffers (as in ``model.named_parameters()``) that DDP must
    neither broadcast nor average, e.g. the TAS architecture logits, which are updated by
    their own all-reduced step. ``sync_bn`` converts BatchNorm layers to SyncBatchNorm in place
    (undo with :func:`revert_sync_batchnorm`); PyTorch supports that on CUDA only, so it is a
    :class:`ConfigError` on CPU with more than one process. The model must already be on
    ``device``.
    """
    if not is_distributed():
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError(
                f"sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on {device.type} "
                "under DDP. Fix: set sync_bn false, or train on GPUs"
            )
        model = convert_sync_batchnorm(model)
    if ignore:
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        unknown = sorted(set(ignore) - names)
        if unknown:
            raise ConfigError(
                f"cannot exclude {unknown[:3]} from DDP: no such parameter. "
                "Fix: pass names from model.named_parameters()"
            )
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
