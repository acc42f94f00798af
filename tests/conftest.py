"""Helpers shared by the test modules: CPU settings for tiny nets, random shapes, real data.

Fixtures are used per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``;
functions are imported (``from conftest import random_shape``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tasprune.datasets import SYSTEM_FASHION_MNIST
from tasprune.models import get_model_spec
from tasprune.shape import Shape

#: Skip marker for tests that read the real Fashion-MNIST files (Debian package).
needs_fashion_mnist = pytest.mark.skipif(
    not (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"{SYSTEM_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)",
)

# A recipe's overrides that shrink any run to a smoke run (a few batches of real data, one
# epoch a stage, a one-batch latency, no int8).
TINY_RUN: dict[str, Any] = {
    "device": "cpu",
    "data": {"train_subset": 160, "test_subset": 64},
    "teacher": {"train": {"epochs": 1, "batch_size": 64}},
    "search": {"epochs": 1, "batch_size": 64, "valid_batches": 1},
    "distill": {"train": {"epochs": 1, "batch_size": 64}},
    "report": {"latency_batches": [1], "latency_repeats": 1, "int8": False},
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers on two cores) every worker, and the
    subprocesses its tests start, uses one intra-op thread: two workers of two threads each
    would oversubscribe the cores several times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared machine two OpenMP threads oversubscribe the
    cores (a MobileNetV2 step ran ~50x slower than on one thread beside other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast_cpu(one_thread: None) -> Iterator[None]:
    """One thread, and denormal floats flushed: random narrow shapes hit the ~10x slower
    denormal path otherwise."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def random_shape(name: str, seed: int) -> Shape:
    """A random valid shape of ``name`` (seeded): every searchable width anywhere in
    1..full (in its steps), every depth in 1..full; widths the space fixes stay full."""
    rng = random.Random(f"{name}-{seed}")
    spec = get_model_spec(name)
    full = spec.full_shape()
    widths = {}
    for k, v in full.widths.items():
        step = spec.width_step(k)
        widths[k] = v if step == 0 else step * rng.randint(1, v // step)
    return Shape(widths=widths, depths={k: rng.randint(1, v) for k, v in full.depths.items()})


def one_hot(net: Any, rng: random.Random) -> None:
    """Every searchable choice of the supernet ``net`` made certain of one random candidate."""
    with torch.no_grad():
        for c in net.all_choices():
            logits = net.logits_of(c)
            if logits is not None:
                logits.fill_(-1e4)
                logits[rng.randrange(len(c.candidates))] = 1e4


def assert_supernet_is_pruned(net: Any, shape: Shape, pruned: torch.nn.Module, side: int) -> None:
    """The supernet at ``shape`` computes what the physically pruned network does, once that
    network holds the weights the supernet hands on (``plain_state_dict``)."""
    pruned.load_state_dict(net.plain_state_dict(shape))
    x = torch.randn(2, 3, side, side)
    with torch.no_grad(), net.fixed(shape):
        ref = net(x)
    with torch.no_grad():
        got = pruned(x)
    assert torch.allclose(ref, got, atol=1e-5 * max(1.0, float(ref.abs().max())))
