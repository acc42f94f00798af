"""Model sources: a name resolved to the unpruned module it builds and the inputs it is
called with. The analysis (`tasprune.models.analysis`) only ever sees a module and example
inputs; this file is the one place that knows names.

- ``torchvision:NAME``, ``timm:NAME``: the library's network with random weights, its first
  conv adapted to the data's channels and its classifier to the data's classes;
- ``py:MODULE:FUNCTION``: a user's factory, called as FUNCTION(num_classes=, in_channels=);
- ``NAME`` or ``tasprune:NAME``: a shipped network (`tasprune.models.zoo`);
- ``module:CLASS-HASH``: a module instance the user handed in (`register_module`): it is its
  own source (copies of it, with its weights), its classes and channels are its own.

``from_weights`` adapts a published state dict (3 channels, the original classes) to the data.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.errors import ConfigError
from tasprune.models.attention import split_attention

# torchvision:NAME, timm:NAME; tasprune:NAME (or NAME alone) a shipped network;
# py:MODULE:FUNCTION is a user's factory, called as FUNCTION(num_classes=..., in_channels=...)
# -> nn.Module; module:NAME a registered instance.
PREFIXES = ("torchvision:", "timm:", "tasprune:", "py:", "module:")
# Side of the example input the graph is traced on (any valid size gives the same groups).
TRACE_SIZE = 64
_MIN_SIDE = {"inception_v3": 96, "googlenet": 64}  # networks that need a larger input to run

# The positional arguments a network is called with.
Example = tuple[Any, ...]


def canonical(name: str) -> str:
    """``name`` with its prefix: a shipped network's bare name becomes ``tasprune:NAME``."""
    if name.startswith(PREFIXES):
        return name
    from tasprune.models.zoo import list_models, shipped

    if shipped(name) is not None:
        return f"tasprune:{name}"
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"unknown model {name!r}{hint}. Fix: use a shipped network ({', '.join(list_models())}), "
        "torchvision:NAME, timm:NAME or py:MODULE:FUNCTION"
    )


def min_side(name: str) -> int:
    """The smallest input side a source runs at (its trace and tests use at least this); a
    network with a fixed input size (position embeddings, attention windows) runs at that."""
    kind, base = canonical(name).split(":", 1)
    if kind == "timm":
        cfg = _timm().models.get_pretrained_cfg(base)
        if cfg is not None and cfg.fixed_input_size:
            return int(cfg.input_size[-1])
    if kind == "torchvision" and base.startswith(("vit_", "maxvit_")):
        return 224
    return _MIN_SIDE.get(base, 32)


def as_example(inputs: Any) -> Example:
    """Example inputs as the positional arguments of a call: a tensor is one argument, a
    tuple or list are the arguments."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise ConfigError(
        f"example inputs of type {type(inputs).__name__}. Fix: pass a tensor, or a tuple of the "
        "positional arguments the model's forward takes"
    )


def images_in(example: Example) -> int | None:
    """The images ``example`` holds: its first argument's batch (a batched tensor, or a list of
    images as torchvision's detectors take them); None when that cannot be told."""
    first = example[0] if example else None
    if isinstance(first, Tensor) and first.dim() >= 2:
        return int(first.shape[0])
    if isinstance(first, (list, tuple)) and first and all(isinstance(t, Tensor) for t in first):
        return len(first)
    return None


def call(net: nn.Module, example: Example) -> Any:
    """``net`` called on ``example`` (the positional arguments of its forward)."""
    return net(*example)


@dataclass(eq=False)
class Source:
    """Where a network comes from: ``build(num_classes, in_channels)`` makes a fresh unpruned
    copy; ``example(in_channels, (H, W))`` the arguments one image is passed as."""

    name: str
    build: Callable[[int, int], nn.Module]
    example: Callable[[int, tuple[int, int]], Example]
    trace_input: tuple[int, int, int] | None  # (C, H, W) the analysis runs at; None: not an image
    trace_classes: int = 10  # the classes the analysis builds the network with
    ignore: tuple[str, ...] = ()  # modules whose output widths are kept
    own_io: bool = False  # an instance: classes and channels are its own, not the data's
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[Any, ...]:
        """What the analysis of this source depends on besides its name."""
        return (self.name, self.ignore, repr(sorted(self.meta.items())))

    def trace_example(self) -> Example:
        if self.trace_input is None:
            return self.example(0, (0, 0))
        return self.example(self.trace_input[0], self.trace_input[1:])  # type: ignore[arg-type]


def _image_example(in_channels: int, hw: tuple[int, int]) -> Example:
    return (torch.zeros(1, in_channels, *hw),)


def resolve(name: str) -> Source:
    """The source of a model name (``torchvision:``, ``timm:``, ``py:``, ``tasprune:``,
    ``module:``)."""
    if name.startswith("module:"):
        src = _INSTANCES.get(name)
        if src is None:
            raise ConfigError(
                f"{name} is a module instance that is not registered in this process. Fix: "
                "pass a freshly built original (e.g. tasprune.load(path, model=MyNet())), which "
                "registers it"
            )
        return src
    name = canonical(name)
    side = max(TRACE_SIZE, min_side(name))
    trace: tuple[int, int, int] = (3, side, side)
    if name.startswith("tasprune:"):  # the shipped network's own input size
        from tasprune.models.zoo import shipped

        found = shipped(name)
        if found is not None:
            trace = found.default_input

    def build(num_classes: int, in_channels: int) -> nn.Module:
        net = build_source(name, num_classes, in_channels)
        insert_projections(net)
        return split_attention(net)

    return Source(name, build, _image_example, trace)


def insert_projections(net: nn.Module) -> list[str]:
    """Replace the identity shortcut every block declares replaceable (a class attribute
    ``tasprune_shortcut`` naming an ``nn.Identity`` child) by a 1x1 conv that is the identity,
    in place; returns the convs' names. The network computes the same function; its residual
    streams are no longer one channel group, so each block's output width can be its own
    (`optional_projections` finds them again; pruning drops those whose widths stay equal)."""
    added = []
    for name, mod in list(net.named_modules()):
        attr = getattr(type(mod), "tasprune_shortcut", None)
        if not isinstance(attr, str) or not isinstance(getattr(mod, attr, None), nn.Identity):
            continue
        first = next((m for m in mod.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            continue
        c = first.in_channels
        conv = nn.Conv2d(c, c, 1, bias=False)
        conv.tasprune_optional = True  # type: ignore[assignment]
        with torch.no_grad():
            conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        setattr(mod, attr, conv)
        added.append(f"{name}.{attr}" if name else attr)
    return added


def optional_projections(net: nn.Module) -> list[str]:
    """The names of the projections `insert_projections` put into ``net`` (and kept)."""
    return [n for n, m in net.named_modules() if getattr(m, "tasprune_optional", False)]


# ---------------------------------------------------------------------------- instances
_INSTANCES: dict[str, Source] = {}


def _fingerprint(module: nn.Module) -> str:
    """A short hash of the architecture (parameter and buffer names and shapes): equal for two
    builds of the same network, in any process."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(f"{key}:{tuple(value.shape)};".encode())
    return h.hexdigest()[:10]


def _shapes(example: Example) -> tuple[Any, ...]:
    return tuple(tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in example)


def register_module(
    module: nn.Module,
    example_inputs: Any,
    *,
    ignore: tuple[str, ...] | list[str] = (),
    only: tuple[str, ...] | list[str] = (),
) -> str:
    """Make a module instance a model source; returns its name ``module:CLASS-HASH``.

    The source builds copies of ``module`` (with its weights); it is analysed on
    ``example_inputs`` (a tensor, or a tuple of its forward's positional arguments). A single
    image-like tensor (N, C, H, W) may be resized for costing at another input size; any
    other example is costed as given. ``ignore`` names modules whose output widths (and
    depths) are kept; ``only`` names the sub-modules searched, everything else is ignored.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"expected an nn.Module, got {type(module).__name__}. Fix: pass the model"
        )
    example = tuple(
        x.detach()[:1] if isinstance(x, Tensor) else x for x in as_example(example_inputs)
    )
    names = dict(module.named_modules())
    for arg, given in (("ignore", ignore), ("only", only)):
        for n in given:
            if n not in names or n == "":
                close = difflib.get_close_matches(n, list(names), n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"{arg}= names {n!r}, which is not a sub-module of "
                    f"{type(module).__name__}{hint}. Fix: name modules as "
                    "model.named_modules() does"
                )
    ignore = tuple(ignore) + outside(module, only)
    name = f"module:{type(module).__name__}-{_fingerprint(module)}"
    template = split_attention(copy.deepcopy(module).cpu())
    image = len(example) == 1 and isinstance(example[0], Tensor) and example[0].dim() == 4
    trace = tuple(example[0].shape[1:]) if image else None

    def build(num_classes: int, in_channels: int) -> nn.Module:
        return copy.deepcopy(template)

    def make_example(in_channels: int, hw: tuple[int, int]) -> Example:
        if image and hw != (0, 0):
            return (torch.zeros(1, example[0].shape[1], *hw, dtype=example[0].dtype),)
        return tuple(x.clone() if isinstance(x, Tensor) else x for x in example)

    meta = {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "example": _shapes(example),
    }
    _INSTANCES[name] = Source(
        name,
        build,
        make_example,
        trace,  # type: ignore[arg-type]
        ignore=tuple(ignore),
        own_io=True,
        meta=meta,
    )
    return name


def outside(module: nn.Module, only: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The largest sub-modules of ``module`` that hold none of ``only`` and lie in none of
    them (what ``only=`` leaves unsearched); () when ``only`` is empty."""
    if not only:
        return ()
    found: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for child, sub in mod.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if any(name == o or name.startswith(o + ".") for o in only):
                continue  # searched
            if any(o.startswith(name + ".") for o in only):
                visit(name, sub)  # holds a searched module deeper down
            else:
                found.append(name)

    visit("", module)
    return tuple(found)


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "timm: models need the timm package. Fix: pip install 'tasprune[timm]'"
        ) from None
    return timm


def _unknown(name: str, known: list[str], kind: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(f'{kind}:{c}' for c in close)}?" if close else ""
    return ConfigError(
        f"unknown {kind} model {name!r}. Fix: {hint or f'pick a name from {kind}'}"
        + ("" if close else "'s model list")
    )


def build_source(model: str, num_classes: int, in_channels: int) -> nn.Module:
    """The unpruned network of ``model`` with random weights, adapted to the data: its first
    conv takes ``in_channels`` and its classifier gives ``num_classes`` outputs."""
    kind, name = canonical(model).split(":", 1)
    if kind == "module":
        return resolve(model).build(num_classes, in_channels)
    if kind == "py":
        return _from_factory(name, num_classes, in_channels)
    if kind == "tasprune":
        from tasprune.models.zoo import list_models, shipped

        found = shipped(name)
        if found is None:
            raise _unknown(name, list_models(), "tasprune")
        return found.build(num_classes, in_channels)
    if kind == "timm":
        timm = _timm()
        if not timm.is_model(name):
            raise _unknown(name, timm.list_models(), "timm")
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    net = _torchvision(name, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(net, in_channels)
    return net


def _torchvision(name: str, **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` with random weights (single-output heads for the Inceptions)."""
    import torchvision

    known = _torchvision_names()
    if name not in known:
        raise _unknown(name, known, "torchvision")
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def source_name(model: Any) -> str:
    """The model name of ``model``: a name as given, or for a factory (a module-level
    function or class returning the network, called with num_classes= and in_channels=) its
    import path ``py:module:name``, which `tasprune.load` uses to rebuild it (no pickling)."""
    if isinstance(model, str):
        return model
    mod, qual = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if not callable(model) or not mod or "<" in qual or mod == "__main__":
        raise ConfigError(
            f"{model!r} is not an importable factory. Fix: pass a model name, or a function "
            "defined at module level in an importable module (not __main__, not a lambda)"
        )
    return f"py:{mod}:{qual}"


def _from_factory(path: str, num_classes: int, in_channels: int) -> nn.Module:
    """``py:package.module:function`` -> function(num_classes=..., in_channels=...)."""
    import importlib

    module, _, attr = path.partition(":")
    fix = "Fix: name an importable factory as py:package.module:function"
    try:
        fn: Any = importlib.import_module(module)
        for part in attr.split(".") if attr else [None]:
            fn = getattr(fn, part) if part else None
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import the factory {path!r} ({err}). {fix}") from None
    if not callable(fn):
        raise ConfigError(f"py:{path} is not a callable factory. {fix}")
    net = fn(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"py:{path} returned a {type(net).__name__}, not an nn.Module. {fix}")
    return net


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    """Swap the first conv that reads the 3 image channels for one reading ``in_channels``
    (its RGB filters averaged into each new channel, so loaded weights stay meaningful)."""
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,  # type: ignore[arg-type]
                conv.stride,  # type: ignore[arg-type]
                conv.padding,  # type: ignore[arg-type]
                conv.dilation,  # type: ignore[arg-type]
                conv.groups,
                conv.bias is not None,
            )
            with torch.no_grad():
                new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)  # type: ignore[union-attr]
            net.set_submodule(name, new)
            return
    raise ConfigError("found no conv reading 3 image channels to adapt. Fix: use 3-channel data")


def from_weights(model: str, path: str, num_classes: int, in_channels: int) -> nn.Module:
    """``model`` with the weights of ``path`` (a state dict of its original architecture:
    3 input channels, the original classes), then adapted to the data: the first conv's RGB
    filters averaged into ``in_channels``, a new classifier for ``num_classes``."""
    from pathlib import Path

    file = Path(path)
    if not model.startswith(("torchvision:", "timm:")):
        raise ConfigError(
            f"teacher.weights is for torchvision:/timm: models, not {model}. Fix: use "
            "teacher.checkpoint for a tasprune model.pt (or load them in your factory)"
        )
    if not file.is_file():
        raise ConfigError(f"weights file {file} does not exist. Fix: pass an existing file")
    try:
        state: Any
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"weights file {file} cannot be read as a state dict ({type(err).__name__}). "
            "Fix: save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    original = _original(model)
    try:
        original.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0]) if lines else type(err).__name__
        raise ConfigError(
            f"weights file {file} does not fit {model} ({first[:200]}). Fix: pass weights "
            f"saved from {model} itself"
        ) from None
    if in_channels != 3:
        _replace_first_conv(original, in_channels)
    _replace_classifier(original, num_classes)
    return original


def _original(model: str) -> nn.Module:
    """``model`` with its original head (as its published weights have it)."""
    kind, name = model.split(":", 1)
    if kind == "timm":
        return _timm().create_model(name, pretrained=False)
    return _torchvision(name)


def _replace_classifier(net: nn.Module, num_classes: int) -> None:
    """A fresh classifier layer with ``num_classes`` outputs in place of the last one."""
    reset = getattr(net, "reset_classifier", None)
    if callable(reset):  # timm
        reset(num_classes)
        return
    name = _last_layer(net)
    last = net.get_submodule(name)
    if isinstance(last, nn.Linear):
        new: nn.Module = nn.Linear(last.in_features, num_classes, last.bias is not None)
    else:
        assert isinstance(last, nn.Conv2d)
        new = nn.Conv2d(last.in_channels, num_classes, last.kernel_size, last.stride)  # type: ignore[arg-type]
    net.set_submodule(name, new)


def _last_layer(net: nn.Module) -> str:
    """The name of the last Linear (the last conv for conv heads): a published classifier."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][-1]
