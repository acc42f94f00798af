"""Export a trained (usually pruned) network to ONNX, TorchScript or safetensors.

The source is a run folder (its ``student/model.pt``), a fit folder or any ``model.pt``
written by tasprune; the network is rebuilt from the checkpoint's meta (model name + Shape),
so nothing is unpickled. Every export carries the input contract: the graph takes raw images
(float in [0, 1], what ``ToTensor`` gives) and normalises them inside, and its metadata
(ONNX ``metadata_props``, TorchScript extra file, safetensors header + sidecar) states the
contract under ``tasprune_meta``. Every export is checked before it is kept: ONNX and
TorchScript outputs must match PyTorch's on a fresh random batch (of another size than the one
traced, which also proves the batch axis is dynamic). safetensors stores only tensors, plus a
sidecar JSON with the meta that rebuilds the module without pickle (:func:`load_safetensors`).
An ONNX export can also be quantised to int8 (`tasprune.int8`), judged by its predictions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from tasprune.arrays import ArrayDataset
from tasprune.checkpoint import load_model_checkpoint, resolve_model_file
from tasprune.contract import FORMAT_VERSION, WithPreprocess, contract_from_meta
from tasprune.errors import CheckpointError, ConfigError, ExportError
from tasprune.int8 import CALIBRATION_IMAGES, Int8Images, int8_images, int8_path, quantize_int8
from tasprune.models import create_model, get_model_spec
from tasprune.ort import ort_session
from tasprune.shape import Shape
from tasprune.utils import atomic_write_bytes, atomic_write_text
from tasprune.weights import load_weights, portable_state

logger = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "ExportFormat",
    "default_export_path",
    "export_model",
    "load_exportable",
    "load_safetensors",
]

ExportFormat = Literal["onnx", "torchscript", "safetensors"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
SUFFIXES: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "safetensors": ".safetensors",
}
OPSET = 17
META = "tasprune_meta"  # the metadata key of every export's meta JSON
VERIFY_BATCH = 8  # images in the random batch every export is checked on
TRACE_BATCH = 2  # batch traced/exported; differs from VERIFY_BATCH to exercise the dynamic axis
# Meta keys needed to rebuild a network (the sidecar of a safetensors export holds these).
META_KEYS: tuple[str, ...] = (
    "format_version",
    "input",
    "augment",
    "model",
    "shape",
    "num_classes",
    "in_channels",
    "input_size",
    "dataset",
    "role",
)


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Hide the exporters' deprecation chatter (legacy ONNX exporter, torch.jit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _input_size(meta: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) the network was trained on; the model's default size when not recorded."""
    size = meta.get("input_size")
    if isinstance(size, list | tuple) and len(size) == 3:
        return int(size[0]), int(size[1]), int(size[2])
    _, h, w = get_model_spec(str(meta["model"])).default_input
    return int(meta.get("in_channels", 3)), h, w


def load_exportable(
    source: str | os.PathLike[str], prefer: tuple[str, ...] = ("student",)
) -> tuple[nn.Module, dict[str, Any], Path]:
    """(eval-mode model, meta with ``input_size`` filled in, the model.pt used) of ``source``.

    ``source`` is a model.pt file, a fit folder holding one, or a run folder whose ``prefer``
    sub-folders are searched (the pruned ``student`` by default).
    """
    path = resolve_model_file(Path(source), prefer=prefer)
    model, meta = load_model_checkpoint(path)
    meta = {**meta, "input_size": list(_input_size(meta))}
    return model.eval(), meta, path


def default_export_path(model_file: Path, fmt: str, role: str | None = None) -> Path:
    """``DIR/export/pruned.<ext>`` for a run's student (``teacher.<ext>`` for its teacher)."""
    folder = model_file.parent
    if folder.name in ("student", "teacher"):
        folder = folder.parent  # the run folder
    name = "teacher" if role == "teacher" else "pruned"
    return folder / "export" / f"{name}{SUFFIXES[fmt]}"


def _random_batch(meta: dict[str, Any], batch: int, seed: int) -> Tensor:
    """Random raw images (float in [0, 1], the exported graph's input), N x C x H x W."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *_input_size(meta), generator=gen)


def _export_meta(meta: dict[str, Any], contract: dict[str, Any]) -> str:
    """The JSON every export carries: what rebuilds the network and what it takes as input."""
    out = {k: meta[k] for k in META_KEYS if k in meta}
    out.update({"format_version": FORMAT_VERSION, "input": contract})
    return json.dumps(out)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _export_onnx(model: nn.Module, meta: dict[str, Any], atol: float, pad: int = 0) -> bytes:
    """ONNX (opset 17, dynamic batch axis) via the TorchScript-based exporter, verified
    against ``model``, with the contract in its metadata (the file's bytes). ``pad`` > 1: the
    exported copy's channel groups are zero-padded to multiples of it first
    (`tasprune.padding`: same outputs, faster in ONNX Runtime).

    The torch.export-based exporter (``dynamo=True``) needs onnxscript, which is not a
    dependency; the legacy exporter covers every op these CNNs use.
    """
    import onnx

    example = _random_batch(meta, TRACE_BATCH, seed=0)
    reference = model
    if pad > 1:
        model = padded_copy(model, example, pad)
    with tempfile.TemporaryDirectory(prefix="tasprune-onnx-") as tmp:
        tmp_file = Path(tmp) / "model.onnx"
        try:
            with quiet_exporters():
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp_file),
                    dynamo=False,
                    opset_version=OPSET,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
        except Exception as err:  # the exporter raises many unrelated exception types
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(
                f"ONNX export of {meta['model']} failed ({first[:200]}). "
                "Fix: export to torchscript or safetensors instead"
            ) from err
        _verify_onnx(reference, meta, tmp_file, atol)
        proto = onnx.load(str(tmp_file))
    return _with_onnx_meta(proto, _export_meta(meta, _contract_dict(model)))


def padded_copy(model: nn.Module, example: Tensor, multiple: int) -> nn.Module:
    """A copy of ``model`` with its channel groups zero-padded to ``multiple`` (the original
    when the graph cannot be padded: the export stays correct, only not padded)."""
    import copy

    from tasprune.padding import pad_channels

    twin = copy.deepcopy(model)
    net = twin.net if isinstance(twin, WithPreprocess) else twin
    try:
        pad_channels(net, multiple, example[:1])
    except Exception as err:  # a graph the tracer cannot follow: export unpadded
        logger.info("channel padding skipped (%s: %s)", type(err).__name__, str(err)[:120])
        return model
    return twin


def _with_onnx_meta(proto: Any, text: str) -> bytes:
    """An ONNX model's bytes with ``text`` (the meta JSON) as its only ``tasprune_meta``."""
    kept = [p for p in proto.metadata_props if p.key != META]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = META
    entry.value = text
    return bytes(proto.SerializeToString())


def _contract_dict(model: nn.Module) -> dict[str, Any]:
    return model.contract.to_dict() if isinstance(model, WithPreprocess) else {}


def _tolerance(ref: Tensor, atol: float) -> float:
    """``atol`` for outputs of magnitude up to 1, relative beyond (float32 rounding in a deep
    network grows with the size of its logits)."""
    return atol * max(1.0, float(ref.abs().max()))


def _verify_onnx(model: nn.Module, meta: dict[str, Any], path: Path, atol: float) -> None:
    session = ort_session(
        path,
        None,
        "the ONNX export cannot be verified",
        "export to torchscript or safetensors instead",
        ExportError,
    )
    x = _random_batch(meta, VERIFY_BATCH, seed=1)
    with torch.inference_mode():
        ref = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    diff = _max_diff(got, ref) if got.shape == ref.shape else float("inf")
    atol = _tolerance(ref, atol)
    if diff > atol:
        raise ExportError(
            f"ONNX Runtime output differs from PyTorch by {diff:.3g} (> {atol:.3g}) on a batch "
            f"of {VERIFY_BATCH}. Fix: export to torchscript or safetensors instead, and "
            "report the model and shape"
        )
    logger.info("ONNX export verified: max |onnxruntime - torch| = %.2e", diff)


def _export_torchscript(model: nn.Module, meta: dict[str, Any], out: Path, atol: float) -> None:
    example = _random_batch(meta, TRACE_BATCH, seed=0)
    x = _random_batch(meta, VERIFY_BATCH, seed=1)
    try:
        with quiet_exporters(), torch.no_grad():
            traced = torch.jit.trace(model, (example,), check_trace=False)
            ref = model(x)
            got = traced(x)
            buf = io.BytesIO()
            extra = {"tasprune_meta.json": _export_meta(meta, _contract_dict(model))}
            torch.jit.save(traced, buf, _extra_files=extra)
    except Exception as err:  # tracing raises RuntimeError/TypeError/... depending on the op
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(
            f"TorchScript trace of {meta['model']} failed ({first[:200]}). "
            "Fix: export to onnx or safetensors instead"
        ) from err
    diff = _max_diff(got, ref)
    atol = _tolerance(ref, atol)
    if diff > atol:
        raise ExportError(
            f"traced TorchScript output differs from PyTorch by {diff:.3g} (> {atol:.3g}). "
            "Fix: export to onnx or safetensors instead"
        )
    atomic_write_bytes(out, buf.getvalue(), error_cls=ExportError)


def _sidecar(path: Path) -> Path:
    """``pruned.safetensors`` -> ``pruned.json``."""
    return path.with_suffix(".json")


def _export_safetensors(model: nn.Module, meta: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save

    net = model.net if isinstance(model, WithPreprocess) else model
    state = dict(portable_state(net))
    sidecar = json.loads(_export_meta(meta, _contract_dict(model)))
    # The meta also goes into the file header, so the file alone still rebuilds the network.
    data = save(state, metadata={"format": "pt", "tasprune_meta": json.dumps(sidecar)})
    atomic_write_bytes(out, data, error_cls=ExportError)
    atomic_write_text(_sidecar(out), json.dumps(sidecar, indent=2) + "\n", error_cls=ExportError)


def export_model(
    source: str | os.PathLike[str],
    fmt: ExportFormat = "onnx",
    out: str | os.PathLike[str] | None = None,
    *,
    atol: float = 1e-4,
    pad_channels: int = 8,
    int8: bool = False,
    calibration_images: int = CALIBRATION_IMAGES,
    data: str | ArrayDataset | None = None,
    data_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Export the network in ``source`` as ``fmt`` and return the written file.

    ``pad_channels`` (ONNX only): zero-pad every channel group to a multiple of it (outputs
    unchanged; ONNX Runtime on CPU runs 8-channel blocks faster); 0 or 1 exports as is.

    ``source``: a run folder (its pruned ``student/model.pt``), a fit folder, or a model.pt
    file (e.g. ``DIR/teacher/model.pt``). ``out`` defaults to ``DIR/export/pruned.<ext>``
    (``teacher.<ext>`` for a teacher); an existing folder receives that default name. ONNX
    and TorchScript exports whose outputs differ from PyTorch by more than ``atol`` on a
    random batch raise :class:`ExportError` and leave no file behind.

    ``int8`` (ONNX only): also write the int8 model beside the fp32 one (``pruned.int8.onnx``)
    and return its path (`tasprune.int8`: ONNX Runtime's static QDQ quantisation, calibrated
    on ``calibration_images`` seeded training images of the dataset the checkpoint records,
    read from ``data_root`` or the recipe's root; ``data`` names another dataset or gives the
    images). Its top-1 is compared with the fp32 model's on held-out images and logged; a
    gross disagreement raises :class:`ExportError` and neither file is written.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}. Fix: use one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise ConfigError(f"int8 is an ONNX export, not {fmt}. Fix: use --format onnx --int8")
    net, meta, model_file = load_exportable(source)
    images = int8_images(meta, calibration_images, data, data_root) if int8 else None
    # The exported graph takes raw images: the normalisation of training goes inside.
    model = WithPreprocess(net, contract_from_meta(meta, str(model_file))).eval()
    target = default_export_path(model_file, fmt, meta.get("role"))
    if out is not None:
        given = Path(out).expanduser()
        target = given / target.name if given.is_dir() else given
    if fmt == "onnx":
        fp32 = _export_onnx(model, meta, atol, pad_channels)
        quantized = _int8_onnx(fp32, images) if images is not None else None
        atomic_write_bytes(target, fp32, error_cls=ExportError)
        if quantized is not None:
            logger.info("exported %s (onnx fp32) to %s", model_file, target)
            target = int8_path(target)
            atomic_write_bytes(target, quantized, error_cls=ExportError)
    elif fmt == "torchscript":
        _export_torchscript(model, meta, target, atol)
    else:
        _export_safetensors(model, meta, target)
    logger.info("exported %s (%s) to %s", model_file, "onnx int8" if int8 else fmt, target)
    return target


def _int8_onnx(fp32: bytes, images: Int8Images) -> bytes:
    """The int8 model of the fp32 export ``fp32``, its meta the fp32 one's plus how it was
    quantised and how it predicts."""
    import onnx

    proto, info = quantize_int8(fp32, images)
    text = next(p.value for p in onnx.load_from_string(fp32).metadata_props if p.key == META)
    return _with_onnx_meta(proto, json.dumps({**json.loads(text), "quantization": info}))


def _safetensors_meta(path: Path) -> dict[str, Any]:
    """The rebuild meta: the sidecar JSON, or the copy in the file header if it is gone."""
    side = _sidecar(path)
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(
                f"{side} is not valid JSON ({err}). Fix: re-export with "
                "`tasprune export --format safetensors`"
            ) from None
        if isinstance(data, dict):
            return data
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
    if "tasprune_meta" in header:
        data = json.loads(header["tasprune_meta"])
        if isinstance(data, dict):
            return data
    raise ExportError(
        f"{path} has no model meta (no {side.name} next to it and none in its header). "
        "Fix: keep the JSON written beside the .safetensors file, or re-export"
    )


def load_safetensors(path: str | os.PathLike[str]) -> WithPreprocess:
    """Rebuild a network exported by ``export_model(..., "safetensors")``, in eval mode, with
    its input contract (raw images in, as :func:`tasprune.load`).

    No pickle is involved: the architecture comes from the JSON meta (model name + Shape), the
    weights from the safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(
            f"{p} does not exist. Fix: export one with `tasprune export --format safetensors`"
        )
    try:
        meta = _safetensors_meta(p)
        state = load_file(str(p), device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{p} is not a readable safetensors file ({err}). Fix: re-export it"
        ) from err
    for key in ("model", "shape"):
        if key not in meta:
            raise ExportError(f"the meta of {p} lacks '{key}'. Fix: re-export the model")
    model = create_model(
        str(meta["model"]),
        Shape.from_dict(meta["shape"]),
        num_classes=int(meta.get("num_classes", 10)),
        in_channels=int(meta.get("in_channels", 3)),
    )
    try:
        load_weights(model, state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"weights in {p} do not fit {meta['model']} at its stored shape ({first}). "
            "Fix: keep the .safetensors and .json of one export together"
        ) from None
    return WithPreprocess(model, contract_from_meta(meta, str(p))).eval()
