"""A per-layer latency model of the runtime a pruned network deploys to.

The table holds the measured time of single layers (conv + BatchNorm + ReLU, or a linear) at
the input/output widths the search space can produce, for one runtime (eager PyTorch or ONNX
Runtime), device, intra-op thread count and batch size (the table's `TableKey`). A network's
predicted latency is ``scale * (the sum over its layers) + rest_ms``, a per-model fit on a few
whole networks of the search space measured in the same runtime (what single layers miss:
adds, pooling, the call itself, caches); `tasprune.search.latency` measures and fits.

The search needs the latency of every candidate; the cost function of the model (written once
against `tasprune.models.algebra`) asks for it layer by layer (`Counter` with a table), so
the points to measure follow from the network, as its FLOPs do. Widths are measured where
they occur, never interpolated across a runtime's channel block: ONNX exports are zero-padded
to multiples of 8 (`tasprune.padding`), so the ONNX table looks every width up at its padded
value (the network's input channels and the classifier's outputs are never padded).

Tables are cached on disk (``$TASPRUNE_CACHE`` or ``~/.cache/tasprune``) under a file named by
the key; a table file whose key differs from the search's (another device, runtime, thread
count or batch) is not used, and the log says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.errors import ConfigError, TaspruneError
from tasprune.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "LatencyTable", "Op", "TableKey", "cache_dir", "default_table_path"]

RUNTIMES = ("eager", "onnxruntime", "onnxruntime-int8")
ONNX_RUNTIMES = ("onnxruntime", "onnxruntime-int8")
FORMAT = 1
ORT_BLOCK = 8  # ONNX exports are padded to this many channels (tasprune.padding)


@dataclass(frozen=True)
class Op:
    """One layer's geometry, everything but its widths.

    ``kind``: "conv2d", "conv1d", "linear" or "attention". ``size``: the input's spatial size
    (a conv), the token count (a linear over tokens), () (a linear over features), or the
    (query, key) token counts of an attention's products. ``per_group``: a grouped conv's
    (in, out) channels per group; its width then sets the number of groups (in and out tied: a
    depthwise conv is (1, 1)). ``image``: the input is the network's own (never padded);
    ``head``: the output is the classifier's (never padded). An attention's width is its
    heads x ``head_dim``, computed on ``instances`` rows per image (windows); with
    ``value_dim`` (an interleaved attention, whose width counts q/k and v per head) it is
    heads x (``head_dim`` + ``value_dim``); ``across``: its products are per channel pair within
    a head, over the tokens (XCiT's cross-covariance attention)."""

    kind: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    size: tuple[int, ...] = ()
    per_group: tuple[int, int] | None = None
    image: bool = False
    head: bool = False
    head_dim: int = 0
    instances: int = 1
    value_dim: int = 0
    across: bool = False

    def label(self) -> str:
        parts = [self.kind]
        if self.kind == "attention":
            parts += [f"hd{self.head_dim}", f"x{self.instances}"]
            if self.value_dim:
                parts.insert(2, f"vd{self.value_dim}")
            if self.across:
                parts.insert(1, "channels")
        elif self.kind != "linear":
            parts += [
                "k" + "x".join(map(str, self.kernel)),
                "s" + "x".join(map(str, self.stride)),
                "p" + "x".join(map(str, self.padding)),
                "d" + "x".join(map(str, self.dilation)),
            ]
        parts.append("in" + ("x".join(map(str, self.size)) or "-"))
        if self.per_group is not None:
            parts.append(f"g{self.per_group[0]}:{self.per_group[1]}")
        if self.image:
            parts.append("image")
        if self.head:
            parts.append("head")
        return " ".join(parts)

    def channels(self, cin: int, cout: int) -> tuple[int, int, int]:
        """(in, out, groups) of the layer at widths (``cin``, ``cout``); a grouped conv's
        width is its ``cout``."""
        if self.per_group is None:
            return cin, cout, 1
        pin, pout = self.per_group
        groups = max(1, cout // pout)
        return groups * pin, groups * pout, groups

    def build(self, cin: int, cout: int) -> nn.Module:
        """The layer (+ BatchNorm + ReLU for a conv) at widths ``cin`` -> ``cout``."""
        if self.kind == "linear":
            return nn.Linear(cin, cout)
        if self.kind == "attention":
            return _Attend(self.head_dim, self.size[0], self.size[1], self.value_dim, self.across)
        cin, cout, groups = self.channels(cin, cout)
        conv_cls, bn_cls = (
            (nn.Conv2d, nn.BatchNorm2d) if self.kind == "conv2d" else (nn.Conv1d, nn.BatchNorm1d)
        )
        conv = conv_cls(
            cin,
            cout,
            self.kernel,  # type: ignore[arg-type]
            self.stride,  # type: ignore[arg-type]
            self.padding,  # type: ignore[arg-type]
            self.dilation,  # type: ignore[arg-type]
            groups=groups,
            bias=False,
        )
        return nn.Sequential(conv, bn_cls(cout), nn.ReLU())

    def example(self, batch: int, cin: int, cout: int) -> Tensor:
        """A random input batch of the layer at widths (``cin``, ``cout``)."""
        if self.kind == "linear":
            return torch.rand(batch, *self.size, cin)
        if self.kind == "attention":
            return torch.rand(batch * self.instances, self.size[0], cout)
        return torch.rand(batch, self.channels(cin, cout)[0], *self.size)


class _Attend(nn.Module):
    """An attention's token products alone: softmax(q k^T / sqrt(d)) v over heads of ``d``
    channels (q, k and v are the input, or a fixed key/value when the token counts differ);
    with ``value_dim`` each head's input is q/k (``d``) then v (``value_dim``); ``across``: the
    products are between a head's channels, over the tokens."""

    def __init__(
        self, head_dim: int, n_q: int, n_k: int, value_dim: int = 0, across: bool = False
    ) -> None:
        super().__init__()
        self.d, self.n_q, self.n_k, self.dv = head_dim, n_q, n_k, value_dim
        self.across = across

    def forward(self, x: Tensor) -> Tensor:
        per_head = self.d + self.dv
        b, h = x.shape[0], x.shape[-1] // per_head
        heads = x.view(b, self.n_q, h, per_head).transpose(1, 2)
        if self.across:  # (b, heads, channels, tokens): a channel attends to the head's others
            t = heads.transpose(-2, -1)
            out = torch.nn.functional.scaled_dot_product_attention(t, t, t)
            return out.permute(0, 3, 1, 2).reshape(b, self.n_q, -1)
        q, v = (heads[..., : self.d], heads[..., self.d :]) if self.dv else (heads, heads)
        if self.n_k != self.n_q:
            q_k = q.mean(2, keepdim=True).expand(-1, -1, self.n_k, -1)
            v = v.mean(2, keepdim=True).expand(-1, -1, self.n_k, -1)
        else:
            q_k = q
        out = torch.nn.functional.scaled_dot_product_attention(q, q_k, v)
        return out.transpose(1, 2).reshape(b, self.n_q, -1)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"cuda {torch.cuda.get_device_name(torch.device(device))}"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu {name} ({os.cpu_count()} cores)"


def _runtime_version(runtime: str) -> str:
    if runtime == "eager":
        return f"torch {torch.__version__}"
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(
            "onnxruntime is not installed, so no ONNX Runtime latency table can be measured. "
            "Fix: pip install 'tasprune[export]' or use latency_runtime: eager"
        ) from err
    if runtime == "onnxruntime-int8":
        try:
            import onnxruntime.quantization  # noqa: F401  (an optional part of onnxruntime)
        except ImportError as err:
            raise ConfigError(
                f"onnxruntime.quantization is unavailable ({err}), so no int8 latency table "
                "can be measured. Fix: pip install 'tasprune[export]' or use "
                "latency_runtime: onnxruntime"
            ) from err
        return f"onnxruntime {ort.__version__} int8 QDQ"
    return f"onnxruntime {ort.__version__}"


@dataclass(frozen=True)
class TableKey:
    """What a latency table is valid for."""

    device: str
    runtime: str
    version: str
    threads: int
    batch: int

    @staticmethod
    def here(runtime: str, threads: int, batch: int, device: str = "cpu") -> TableKey:
        if runtime not in RUNTIMES:
            raise ConfigError(
                f"unknown latency runtime {runtime!r}. Fix: use one of {', '.join(RUNTIMES)}"
            )
        if runtime in ONNX_RUNTIMES and device != "cpu":
            raise ConfigError(
                "the ONNX Runtime latency table is measured on the CPU. Fix: use "
                "latency_runtime: eager for a GPU"
            )
        if threads < 1 or batch < 1:
            raise ConfigError(
                f"latency threads {threads} / batch {batch} must be positive. Fix: use >= 1"
            )
        return TableKey(_device_name(device), runtime, _runtime_version(runtime), threads, batch)

    def slug(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"{self.runtime}-t{self.threads}-b{self.batch}-{digest[:10]}"

    def differences(self, other: TableKey) -> list[str]:
        return [
            f"{k} {getattr(other, k)!r} (here {getattr(self, k)!r})"
            for k in ("device", "runtime", "version", "threads", "batch")
            if getattr(self, k) != getattr(other, k)
        ]


def cache_dir() -> Path:
    root = os.environ.get("TASPRUNE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tasprune"


def default_table_path(key: TableKey) -> Path:
    return cache_dir() / "latency" / f"{key.slug()}.json"


@dataclass
class LatencyTable:
    """Measured per-layer latencies (ms per batch) for one `TableKey`, plus each model's
    calibration (``scale``, ``rest_ms``; see the module docstring)."""

    key: TableKey
    entries: dict[str, float] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeats: int = 15
    _wanted: set[tuple[Op, int, int]] | None = field(default=None, repr=False)
    _matrices: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ lookups
    def padded(self, op: Op, cin: int, cout: int) -> tuple[int, int]:
        """The widths the runtime actually runs (ONNX exports are padded to 8 channels)."""
        if self.key.runtime not in ONNX_RUNTIMES or op.kind == "attention":
            return cin, cout  # heads are never padded
        up = lambda c: math.ceil(c / ORT_BLOCK) * ORT_BLOCK  # noqa: E731
        return (cin if op.image else up(cin)), (cout if op.head else up(cout))

    @staticmethod
    def _entry(op: Op, cin: int, cout: int) -> str:
        return f"{op.label()} | {cin} -> {cout}"

    def value(self, op: Op, cin: int, cout: int) -> float:
        """The measured ms of ``op`` at widths (cin, cout) (0 while collecting points)."""
        cin, cout = self.padded(op, int(cin), int(cout))
        if cin <= 0 or cout <= 0:
            return 0.0
        if self._wanted is not None:
            self._wanted.add((op, cin, cout))
            return 0.0
        key = self._entry(op, cin, cout)
        if key not in self.entries:
            raise TaspruneError(
                f"the latency table has no entry for {key}. Fix: build the table for this "
                "search space (tasprune latency-table) or let the search build it"
            )
        return self.entries[key]

    def matrix(
        self, op: Op, cin: Sequence[float], cout: Sequence[float], device: torch.device
    ) -> Tensor:
        """ms of ``op`` for every pair of ``cin`` x ``cout`` (float64 on ``device``)."""
        key = (op, tuple(cin), tuple(cout), device)
        if self._wanted is None and key in self._matrices:
            return self._matrices[key]
        m = torch.tensor(
            [[self.value(op, round(a), round(b)) for b in cout] for a in cin],
            dtype=torch.float64,
            device=device,
        )
        if self._wanted is None:
            self._matrices[key] = m
        return m

    @contextlib.contextmanager
    def collecting(self) -> Iterator[set[tuple[Op, int, int]]]:
        """Record the (op, in, out) points asked for instead of looking them up."""
        self._wanted = set()
        try:
            yield self._wanted
        finally:
            self._wanted = None

    def record(self, op: Op, cin: int, cout: int, ms: float) -> None:
        self.entries[self._entry(op, cin, cout)] = ms
        self._matrices.clear()

    def missing(self, points: Iterable[tuple[Op, int, int]]) -> list[tuple[Op, int, int]]:
        return sorted(
            {p for p in points if self._entry(*p) not in self.entries},
            key=lambda p: (p[0].label(), p[1], p[2]),
        )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "key": asdict(self.key),
            "repeats": self.repeats,
            "models": self.models,
            "entries": dict(sorted(self.entries.items())),
        }

    @staticmethod
    def from_dict(raw: dict[str, Any], key: TableKey) -> LatencyTable:
        """The table of a `to_dict` object (measured for ``key``)."""
        return LatencyTable(
            key,
            {str(k): float(v) for k, v in raw["entries"].items()},
            {str(k): dict(v) for k, v in raw.get("models", {}).items()},
            int(raw.get("repeats", 15)),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def load(path: Path, key: TableKey) -> LatencyTable | None:
        """The table in ``path`` if it was measured for ``key``; None (and a log line saying
        why) when it was measured elsewhere or is not a table."""
        try:
            raw = json.loads(path.read_text())
            stored = TableKey(**raw["key"])
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("latency table %s is not used: unreadable (%s)", path, err)
            return None
        diff = key.differences(stored)
        if diff:
            logger.warning(
                "latency table %s is not used: it was measured for %s", path, "; ".join(diff)
            )
            return None
        return LatencyTable.from_dict(raw, key)
