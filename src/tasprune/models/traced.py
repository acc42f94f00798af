"""Any torchvision or timm CNN as a tasprune model: its search space read off the traced graph.

A name ``torchvision:NAME`` or ``timm:NAME`` is a model like the registered ones: it has an
unpruned `Shape`, a cost written against the same algebra as the families (so the search's
expected cost and the exact cost of a shape come from one derivation), and it builds at any
shape. Nothing is written per network:

- **Width choices** are the channel groups of Torch-Pruning's dependency graph: every set of
  layers whose channels must change together (a residual stream, a depthwise conv and its
  producer, the segments a concatenation passes on) is one choice, named after its first
  layer. A grouped conv ties its input and output groups and restricts the candidates to
  whole groups. The network's input and the classifier's outputs are never pruned.
- **Depth choices** are runs of consecutive residual blocks (output = input + f(input) at the
  same shape) in one ``nn.Sequential``; a stage is the block before such a run plus the run,
  and its depth d keeps the first d blocks (the skipped ones become ``nn.Identity``).
- **Cost**: per conv/linear the expected in and out widths of its groups, its kernel, groups
  and the output size seen in one shape pass; other parameters scale with their group's width;
  each block weighted by its keep probability.
- **The pruned network**: TAS keeps the first k channels of every group, so the physically
  smaller network is the unpruned one with channels k.. of each group removed by the
  dependency graph (in every producer and consumer, through concatenations), plus skipped
  blocks replaced by identities. Weights are carried over by the same operation.

The source (name + build arguments) and the shape rebuild the network; no module is pickled.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.errors import ConfigError
from tasprune.latency_table import Op
from tasprune.models.algebra import Counter
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

# torchvision:NAME, timm:NAME; tasprune:NAME traces a registered family's plain network (the
# same mechanism as for any other CNN); py:MODULE:FUNCTION is a user's factory, called as
# FUNCTION(num_classes=..., in_channels=...) -> nn.Module.
PREFIXES = ("torchvision:", "timm:", "tasprune:", "py:")
# Side of the example input the graph is traced on (any valid size gives the same groups).
TRACE_SIZE = 64
_MIN_SIDE = {"inception_v3": 96, "googlenet": 64}  # networks that need a larger input to run


def is_traced(name: str) -> bool:
    return name.startswith(PREFIXES)


def min_side(name: str) -> int:
    """The smallest input side a source runs at (its trace and tests use at least this)."""
    return _MIN_SIDE.get(name.split(":", 1)[1], 32)


# ---------------------------------------------------------------------------- sources
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
    kind, name = model.split(":", 1)
    if kind == "py":
        return _from_factory(name, num_classes, in_channels)
    if kind == "tasprune":
        from tasprune.models.ops import PlainOps
        from tasprune.models.spec import list_models, registered_spec

        spec = registered_spec(name)
        if spec is None:
            raise _unknown(name, list_models(), "tasprune")
        return spec.build(spec.full_shape(), num_classes, in_channels, PlainOps())
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
    _replaceclassifier_of(original, num_classes)
    return original


def _original(model: str) -> nn.Module:
    """``model`` with its original head (as its published weights have it)."""
    kind, name = model.split(":", 1)
    if kind == "timm":
        return _timm().create_model(name, pretrained=False)
    return _torchvision(name)


def _replaceclassifier_of(net: nn.Module, num_classes: int) -> None:
    """A fresh classifier layer with ``num_classes`` outputs in place of the last one."""
    reset = getattr(net, "reset_classifier", None)
    if callable(reset):  # timm
        reset(num_classes)
        return
    last = classifier_of(net)
    name = next(n for n, m in net.named_modules() if m is last)
    if isinstance(last, nn.Linear):
        new: nn.Module = nn.Linear(last.in_features, num_classes, last.bias is not None)
    else:
        assert isinstance(last, nn.Conv2d)
        new = nn.Conv2d(last.in_channels, num_classes, last.kernel_size, last.stride)  # type: ignore[arg-type]
    net.set_submodule(name, new)


# ---------------------------------------------------------------------------- analysis
@dataclass
class Group:
    """One width choice: the layers whose channels change together."""

    name: str
    full: int
    roots: list[tuple[str, bool]]  # (layer, out?) roots of Torch-Pruning groups merged here
    multiple: int = 1  # candidates must be multiples (grouped convs keep whole groups)
    fixed: str | None = None  # why the width cannot be searched
    scope: str = ""  # the sub-module traced for it ("" = the whole network)


@dataclass
class Stage:
    """One depth choice: consecutive children of one container; depth d keeps the first d."""

    name: str
    container: str
    children: list[str]  # their names in the container
    blocks: list[str]  # their full module names


@dataclass
class Layer:
    """What the cost of one conv/linear depends on."""

    name: str
    cin: int
    cout: int
    in_groups: tuple[str, ...]  # the groups of its input channels (the rest is fixed)
    out_groups: tuple[str, ...]
    kernel: int  # kh * kw
    groups: int
    hw: int  # output positions (H*W for a conv, tokens for a linear)
    bias: bool
    stage: str | None
    index: int
    extra: int = 0  # per-filter parameters of its own besides weight and bias (a conv's gain)
    op: Op | None = None  # its geometry, for the latency table


class Traced:
    """The search space of one source, read off its traced graph (cached per name)."""

    def __init__(self, model: str) -> None:
        self.model = model
        side = max(TRACE_SIZE, min_side(model))
        self.trace_input = (3, side, side)
        if model.startswith("tasprune:"):  # the family's own input size
            from tasprune.models.spec import registered_spec

            family = registered_spec(model.split(":", 1)[1])
            if family is not None:
                self.trace_input = family.default_input
        net = build_source(model, 10, 3).eval()
        self.groups, self.group_of, self.masks, self.per_channel = _channel_groups(
            net, model, self.trace_input
        )
        self.stages = _depth_stages(net, model, self.trace_input)
        self.stage_of: dict[str, tuple[str, int]] = {}
        for st in self.stages.values():
            for i, b in enumerate(st.blocks):
                self.stage_of[b] = (st.name, i)
        self._drop_overlaps(net)
        self._verify()
        fixed = [g for g in self.groups.values() if g.fixed]
        logger.info(
            "%s: %d width choices (%d kept at full width; `tasprune space --model %s` says why), "
            "%d depth choices",
            model,
            len(self.groups),
            len(fixed),
            model,
            len(self.stages),
        )

    def _drop_overlaps(self, net: nn.Module) -> None:
        """Groups that the graph maps onto more channels of a layer than it has (an op it
        cannot follow, such as a channel slice) keep their width, and that layer's channels
        count as fixed."""
        modules = dict(net.named_modules())
        for (layer, out), groups in list(self.group_of.items()):
            mod = modules.get(layer)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                channels = mod.out_channels if out else mod.in_channels
            elif isinstance(mod, nn.Linear):
                channels = mod.out_features if out else mod.in_features
            elif mod is not None and out and out_channels_of(mod) > 0:
                channels = out_channels_of(mod)
            else:
                continue
            spans = sum(
                self.groups[g].full * self.per_channel.get((layer, out, g), 1) for g in groups
            )
            if spans > channels:
                for g in groups:
                    self.groups[g].fixed = (
                        f"its channels do not map onto {layer} (an op the graph cannot "
                        "follow, such as a channel slice or a conv along the channels)"
                    )
                self.group_of[(layer, out)] = []

    def _verify(self) -> None:
        """Prune every searchable group to about half on a copy and check that the network
        runs and its counted FLOPs equal the prediction; when not, find the groups that
        break it (the graph missed an op, e.g. a channel slice) and leave them unsearched."""
        if (why := self._trial([])) is not None:
            raise ConfigError(
                f"{self.model}: the traced graph does not describe the network ({why}). Fix: "
                "use another model, or report it with the model name"
            )
        names = [n for n, g in self.groups.items() if g.fixed is None and g.full > g.multiple]
        if names and (why := self._trial(names)) is not None:
            logger.info("%s: pruning all groups fails (%s); finding which", self.model, why)
            self._bisect(names)
            left = [n for n in names if self.groups[n].fixed is None]
            if left and (why := self._trial(left)) is not None:  # only in combination
                for n in left:
                    self.groups[n].fixed = f"pruning it with the others breaks the network ({why})"

    def _bisect(self, names: list[str]) -> None:
        """Fix the groups of ``names`` whose pruning breaks the network (``names`` as a whole
        is known to): halves that prune cleanly are cleared in one trial."""
        if len(names) == 1:
            why = self._trial(names)
            self.groups[names[0]].fixed = f"pruning it breaks the network ({why})"
            return
        for half in (names[: len(names) // 2], names[len(names) // 2 :]):
            if self._trial(half) is not None:
                self._bisect(half)

    def _trial(self, names: list[str]) -> str | None:
        from torch.utils.flop_counter import FlopCounterMode

        from tasprune.models.algebra import ExactAlgebra

        half = {}
        for n in names:
            g = self.groups[n]
            half[n] = max(g.multiple, g.full // 2 // g.multiple * g.multiple)
        shape = self.full_shape().replace(widths=half)
        side = self.trace_input[1]
        try:
            net = _prune_with(self, build_source(self.model, 10, 3), shape, 3).eval()
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                y = net(torch.zeros(1, 3, side, side))
            c = Counter(ExactAlgebra(shape))
            traced_cost(self, c, 3, (side, side), 10)
        except Exception as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        if tuple(y.shape) != (1, 10):
            return f"output {tuple(y.shape)}"
        if fc.get_total_flops() // 2 != int(c.flops):
            return f"counted {fc.get_total_flops() // 2} MACs, predicted {int(c.flops)}"
        return None

    def full_shape(self) -> Shape:
        return Shape(
            widths={g.name: g.full for g in self.groups.values()},
            depths={s.name: len(s.blocks) for s in self.stages.values()},
        )

    def searchable_groups(self) -> dict[str, Group]:
        return {n: g for n, g in self.groups.items() if g.fixed is None}

    def where(self, module_name: str) -> tuple[str | None, int]:
        """(stage, block index) of a layer inside a skippable block, else (None, 0)."""
        for block, (stage, i) in self.stage_of.items():
            if module_name == block or module_name.startswith(block + "."):
                return stage, i
        return None, 0

    @functools.lru_cache(maxsize=8)  # noqa: B019  (one Traced per model, cached itself)
    def layers(self, in_channels: int, hw: tuple[int, int], num_classes: int) -> tuple[Any, ...]:
        """The conv/linear layers and the other parameters, with output sizes at ``hw``."""
        net = build_source(self.model, num_classes, in_channels).eval()
        sizes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        hooks = []
        for name, mod in net.named_modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                hooks.append(
                    mod.register_forward_hook(
                        lambda m, i, o, n=name: sizes.__setitem__(
                            n, (tuple(i[0].shape), tuple(o.shape))
                        )
                    )
                )
        try:
            with torch.no_grad():
                net(torch.zeros(1, in_channels, *hw))
        except Exception as err:  # the model's own message, in one line
            raise ConfigError(
                f"{self.model} does not run on a {in_channels}x{hw[0]}x{hw[1]} input: "
                f"{str(err).splitlines()[0][:200]}. Fix: use larger images (at least "
                f"{min_side(self.model)}px) or another model"
            ) from None
        finally:
            for h in hooks:
                h.remove()
        layers: list[Layer] = []
        others: list[tuple[str, int, tuple[str, ...], int, str | None, int]] = []
        head = classifier_of(net)
        for name, mod in net.named_modules():
            stage, index = self.where(name)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                if name not in sizes:
                    continue  # never called (an unused head)
                inp, out = sizes[name]
                conv = isinstance(mod, (nn.Conv1d, nn.Conv2d))
                pos = math.prod(out[2:]) if conv else math.prod(out[1:-1])
                layers.append(
                    Layer(
                        name,
                        mod.in_channels if conv else mod.in_features,  # type: ignore[arg-type]
                        mod.out_channels if conv else mod.out_features,  # type: ignore[arg-type]
                        tuple(self.group_of.get((name, False), ())),
                        tuple(self.group_of.get((name, True), ())),
                        math.prod(mod.kernel_size) if conv else 1,  # type: ignore[arg-type]
                        mod.groups if conv else 1,  # type: ignore[arg-type]
                        pos,
                        mod.bias is not None,
                        stage,
                        index,
                        sum(
                            p.numel()
                            for n, p in mod.named_parameters(recurse=False)
                            if n not in ("weight", "bias")
                        ),
                        _op_of(mod, inp, in_channels, mod is head),
                    )
                )
                continue
            own = list(mod.named_parameters(recurse=False))
            if not own:
                continue
            groups = tuple(self.group_of.get((name, True), ()))
            if groups:  # a normalisation layer of a group: all its parameters scale
                channels = out_channels_of(mod) or sum(self.groups[g].full for g in groups)
                numel = sum(p.numel() for _, p in own)
                others.append((name, numel, groups, channels, stage, index))
                continue
            for pname, p in own:  # a parameter the graph prunes itself (a layer scale)
                full = f"{name}.{pname}" if name else pname
                groups = tuple(self.group_of.get((f"param:{full}", True), ()))
                channels = sum(self.groups[g].full for g in groups) or 1
                others.append((full, p.numel(), groups, channels, stage, index))
        return tuple(layers), tuple(others)


def _resolve(parent: dict[str, str], g: str) -> str:
    while parent[g] != g:
        g = parent[g]
    return g


def _channel_groups(
    net: nn.Module, model: str, size: tuple[int, int, int]
) -> tuple[
    dict[str, Group],
    dict[tuple[str, bool], list[str]],
    dict[str, list[tuple[str, int, bool]]],
    dict[tuple[str, bool, str], int],
]:
    """Torch-Pruning's coupled channel groups of ``net`` as width choices.

    Returns the groups and, for every (layer, out?) pair, the groups its channels belong to
    (several for the input of a layer after a concatenation), in channel order.
    """

    names: dict[Any, str] = {m: n for n, m in net.named_modules()}
    names.update({p: f"param:{n}" for n, p in net.named_parameters()})  # unwrapped parameters
    classifier = classifier_of(net)
    groups: dict[str, Group] = {}
    group_of: dict[tuple[str, bool], list[str]] = {}  # the groups of a layer's in/out channels
    offsets: dict[tuple[str, bool, str], int] = {}  # where a group's channels start in a layer
    spans: dict[tuple[str, bool, str], int] = {}  # how many of the layer's channels it spans
    parent: dict[str, str] = {}
    nodes: dict[Any, Any] = {}
    convs = (nn.Conv2d, nn.Linear)
    for scope, mod_scope, example, dg in _scopes(net, model, size):
        nodes.update(dg.module2node)
        for tp_group in dg.get_all_groups(ignored_layers=[classifier], root_module_types=convs):
            root_dep = tp_group[0].dep
            root = names.get(root_dep.target.module)
            if root is None:
                continue
            full = len(tp_group[0].idxs)
            if scope and not _internal(mod_scope, example, root_dep, full, names, scope):
                continue  # crosses the traced block's boundary: left unsearched
            root_out = root_dep.handler.__name__ == "prune_out_channels"
            gname = root
            g = Group(gname, full, [(root, root_out)], scope=scope)
            touches_classifier = False
            for dep, idxs in tp_group:
                mod = dep.target.module
                layer = names.get(mod)
                if layer is None:
                    continue
                out = dep.handler.__name__ == "prune_out_channels" or layer.startswith("param:")
                if mod is classifier and out:
                    touches_classifier = True
                seg = group_of.setdefault((layer, out), [])
                if gname not in seg:
                    seg.append(gname)
                    offsets[(layer, out, gname)] = min(int(i) for i in idxs)
                    spans[(layer, out, gname)] = len(idxs)
            if touches_classifier:
                g.fixed = "feeds the classifier's outputs"
            groups[gname] = g
            parent[gname] = gname
    # A grouped (not depthwise) conv keeps whole groups: its input and output widths are tied
    # and move in steps of the group size.
    for layer, mod in net.named_modules():
        if not isinstance(mod, nn.Conv2d) or mod.groups == 1:
            continue
        gi, go = group_of.get((layer, False)), group_of.get((layer, True))
        if gi is None or go is None or len(gi) != 1 or len(go) != 1:
            continue
        ri, ro = _resolve(parent, gi[0]), _resolve(parent, go[0])
        if mod.in_channels != mod.out_channels:
            for r in (ri, ro):
                groups[r].fixed = f"grouped conv {layer} changes the width"
            continue
        if ri != ro:
            parent[ro] = ri
            groups[ri].roots += groups[ro].roots
            groups[ri].fixed = groups[ri].fixed or groups[ro].fixed
        per = mod.out_channels // mod.groups
        g = groups[ri]
        g.multiple = g.multiple * per // math.gcd(g.multiple, per)
    merged = {n: g for n, g in groups.items() if parent[n] == n}
    group_of = {k: list(dict.fromkeys(_resolve(parent, g) for g in v)) for k, v in group_of.items()}
    for grp in merged.values():
        if grp.full % grp.multiple:
            grp.fixed = grp.fixed or f"width {grp.full} is not a multiple of its conv groups"
    resolved: dict[tuple[str, bool, str], int] = {}
    for (layer, out, gn), off in offsets.items():
        key = (layer, out, _resolve(parent, gn))
        resolved[key] = min(off, resolved.get(key, off))
    masks = _mask_sites(net, nodes, names, group_of, resolved)
    per_channel = {  # layer channels per group channel (a flatten before a Linear: H*W)
        (layer, out, _resolve(parent, gn)): n // groups[_resolve(parent, gn)].full
        for (layer, out, gn), n in spans.items()
        if n > groups[_resolve(parent, gn)].full
    }
    return merged, group_of, masks, per_channel


def _mask_sites(
    net: nn.Module,
    nodes: dict[Any, Any],
    names: dict[Any, str],
    group_of: dict[tuple[str, bool], list[str]],
    offsets: dict[tuple[str, bool, str], int],
) -> dict[str, list[tuple[str, int, bool]]]:
    """Where the search applies each group's width mixture: layer -> [(group, first channel,
    mix?)]. A group's mixture is applied once per branch, after the normalisation that
    follows its conv (mix); layers whose input already carries the mixture (a depthwise conv
    tied to its producer, a norm after a concatenation) only zero the channels beyond the
    widest sampled candidate (support). ``group_of`` and ``offsets`` name merged groups."""
    norm = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    prunable = (nn.Conv2d, nn.Linear)

    def neighbour(node: Any, forward: bool) -> Any:
        """The next (or previous) named layer through single-input element-wise ops."""
        for _ in range(8):
            nxt = node.outputs if forward else node.inputs
            if len(nxt) != 1:
                return None
            node = nxt[0]
            if names.get(node.module) is not None:
                return node
        return None

    sites: dict[str, list[tuple[str, int, bool]]] = {}
    modules = dict(net.named_modules())
    for (layer, out), groups in group_of.items():
        mod = modules.get(layer)
        if not out or mod is None or not isinstance(mod, (*prunable, *norm)):
            continue
        node = nodes.get(mod)
        if isinstance(mod, prunable):
            after = neighbour(node, True) if node is not None else None
            if (
                after is not None
                and isinstance(after.module, norm)
                and group_of.get((names[after.module], True)) == groups
            ):
                continue  # its norm carries the mixture
            tied = set(groups) if _tied(mod) else set()
            tied |= set(group_of.get((layer, False), []))
            sites[layer] = [(g, offsets[(layer, True, g)], g not in tied) for g in groups]
            continue
        before = neighbour(node, False) if node is not None else None
        conv = names.get(before.module) if before is not None else None
        entry: set[str] = set()
        if conv is not None and isinstance(modules.get(conv), prunable):
            tied = set(group_of.get((conv, False), []))
            entry = set() if _tied(modules[conv]) else {g for g in groups if g not in tied}
        sites[layer] = [(g, offsets[(layer, True, g)], g in entry) for g in groups]
    return sites


def classifier_of(net: nn.Module) -> nn.Module:
    """The layer that produces the logits: the last Linear (the last conv for conv heads)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_residual(block: nn.Module) -> bool:
    """Does ``block`` add its own input to its output (y = x + f(x))?"""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(block).graph
    except Exception:
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return False
    modules = dict(block.named_modules())
    same = {inputs[0]}  # the input, and the input through identities (a shortcut)
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], nn.Identity) and n.args:
            if n.args[0] in same:
                same.add(n)
            continue
        is_add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target in ("add", "add_")
        )
        if is_add and any(a in same for a in n.args[:2]) and _reaches_output(n, modules):
            return True
    return False


def _reaches_output(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` flow to the graph's output through parameter-free ops only?"""
    while node.op != "output":
        users = list(node.users)
        if len(users) != 1:
            return False
        node = users[0]
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
            return False
    return True


def _depth_stages(net: nn.Module, model: str, size: tuple[int, int, int]) -> dict[str, Stage]:
    """Runs of residual blocks of the same input and output shape in one ``nn.Sequential``."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    containers = [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
    ]
    for cname, cont in containers:
        for child, block in cont.named_children():
            bname = f"{cname}.{child}" if cname else child

            def hook(m: nn.Module, args: Any, out: Any, n: str = bname) -> None:
                if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    shapes[n] = (tuple(args[0].shape), tuple(out.shape))

            hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(torch.zeros(1, *size))
    finally:
        for h in hooks:
            h.remove()
    stages: dict[str, Stage] = {}
    for cname, cont in containers:
        skippable = []
        children = list(cont.named_children())
        for child, block in children:
            bname = f"{cname}.{child}" if cname else child
            io = shapes.get(bname)
            ok = (
                io is not None
                and io[0] == io[1]
                and any(p.requires_grad for p in block.parameters())
                and _is_residual(block)
            )
            skippable.append(ok)
        i = 0
        while i < len(cont):
            if not skippable[i]:
                i += 1
                continue
            j = i
            while j < len(cont) and skippable[j]:
                j += 1
            first = i - 1 if i > 0 and _is_block(children[i - 1][1]) else i
            kids = [children[k][0] for k in range(first, j)]
            blocks = [f"{cname}.{k}" if cname else k for k in kids]
            if len(blocks) > 1:
                stages[blocks[0]] = Stage(blocks[0], cname, kids, blocks)
            i = j
    return stages


def _is_block(mod: nn.Module) -> bool:
    """A module with parameters (the downsampling block before a run), not an activation."""
    return any(True for _ in mod.parameters())


# ---------------------------------------------------------------------------- cost
def traced_cost(
    tr: Traced, c: Counter, in_channels: int, hw: tuple[int, int], num_classes: int
) -> None:
    """The cost of a traced network, written once for the exact and the expected algebra."""
    a = c.alg
    layers, others = tr.layers(in_channels, tuple(hw), num_classes)

    def parts(layer: str, out: bool, groups: tuple[str, ...], total: int) -> list[Any]:
        """(count, channels per count) making up the ``total`` channels of a layer side:
        its searched groups (a group may span several channels per group channel, after a
        flatten), then the fixed rest."""
        out_parts = [(a.width(g), tr.per_channel.get((layer, out, g), 1)) for g in groups]
        rest = total - sum(
            tr.groups[g].full * m for g, (_, m) in zip(groups, out_parts, strict=False)
        )
        return [*out_parts, (a.const(rest), 1)] if rest > 0 else out_parts

    def mean(ps: list[Any]) -> Any:
        return sum(a.mean(p) * m for p, m in ps)

    for ly in layers:
        keep = a.keep(ly.stage, ly.index) if ly.stage else 1
        cin = parts(ly.name, False, ly.in_groups, ly.cin)
        cout = parts(ly.name, True, ly.out_groups, ly.cout)
        if ly.groups > 1:  # whole groups are kept: in-channels per group stay fixed
            weights = mean(cout) * (ly.cin // ly.groups)
        else:
            weights = sum(a.prod(x, y) * (mx * my) for x, mx in cin for y, my in cout)
        c.flops = c.flops + keep * weights * (ly.kernel * ly.hw)
        c.params = c.params + keep * weights * ly.kernel
        if c.table is not None and ly.op is not None:
            tied = ly.op.per_group is not None
            width_out = a.total(cout)
            width_in = width_out if tied else a.total(cin)
            c.layer_latency(ly.op, width_in, width_out, keep)
        if ly.bias:
            c.params = c.params + keep * mean(cout)
        if ly.extra:
            c.params = c.params + keep * mean(cout) * (ly.extra // ly.cout)
    for name, numel, groups, channels, stage, index in others:
        keep = a.keep(stage, index) if stage else 1
        if groups:
            share = mean(parts(name, True, groups, channels))
            c.params = c.params + keep * share * (numel // channels)
        else:
            c.params = c.params + keep * numel


def _op_of(mod: nn.Module, inp: tuple[int, ...], in_channels: int, head: bool) -> Op:
    """The latency-table geometry of a conv or linear that saw an input of shape ``inp``
    (``head``: the classifier, whose outputs are never padded)."""
    if isinstance(mod, nn.Linear):
        return Op("linear", size=tuple(inp[1:-1]), head=head)
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    pad = mod.padding if isinstance(mod.padding, tuple) else (0,) * len(mod.kernel_size)
    per_group = None
    if mod.groups > 1:
        per_group = (mod.in_channels // mod.groups, mod.out_channels // mod.groups)
    return Op(
        "conv2d" if isinstance(mod, nn.Conv2d) else "conv1d",
        tuple(mod.kernel_size),
        tuple(mod.stride),
        tuple(int(p) for p in pad),
        tuple(mod.dilation),
        tuple(inp[2:]),
        per_group,
        image=mod.in_channels == in_channels and inp[1] == in_channels,
        head=head,
    )


def out_channels_of(mod: nn.Module) -> int:
    """The output channels of a conv, linear or normalisation layer (0 when it has none)."""
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        value = getattr(mod, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(mod, "normalized_shape", None)
    return int(shape[0]) if shape else 0


# ---------------------------------------------------------------------------- pruning
@functools.lru_cache(maxsize=32)
def traced(model: str) -> Traced:
    return Traced(model)


def prune(net: nn.Module, model: str, shape: Shape, in_channels: int) -> nn.Module:
    """Make ``net`` (the unpruned network of ``model``, any weights) the network of ``shape``,
    in place: channels k.. of every group removed everywhere, skipped blocks replaced by
    identities. Returns ``net``."""
    return _prune_with(traced(model), net, shape, in_channels)


def _prune_with(tr: Traced, net: nn.Module, shape: Shape, in_channels: int) -> nn.Module:
    import torch_pruning as tp

    cut = {n: shape.widths[n] for n, g in tr.groups.items() if shape.widths[n] < g.full}
    if cut:
        mods = dict(net.named_modules())
        grouped = {  # (weight, groups) of grouped convs before pruning
            n: (m.weight.detach().clone(), m.groups)
            for n, m in mods.items()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
        }
        extra = {  # convs with per-filter parameters of their own, and their width
            n: m.out_channels
            for n, m in mods.items()
            if isinstance(m, nn.Conv2d)
            and any(p not in ("weight", "bias") for p, _ in m.named_parameters(recurse=False))
        }
        side = tr.trace_input[1]
        example = torch.zeros(1, in_channels, side, side)
        scopes = {tr.groups[n].scope for n in cut}
        inputs = _module_inputs(net, example) if scopes != {""} else {}
        graphs: dict[str, Any] = {}
        with eval_mode(net):
            for scope in scopes:
                mod = net.get_submodule(scope) if scope else net
                x = torch.zeros(inputs[scope]) if scope else example
                graphs[scope] = dependency_graph(mod, x)
        for gname, k in cut.items():
            g = tr.groups[gname]
            dg = graphs[g.scope]
            for layer, out in g.roots:
                mod = mods[layer]
                linear = isinstance(mod, nn.Linear)
                if out:
                    fn = tp.prune_linear_out_channels if linear else tp.prune_conv_out_channels
                else:
                    fn = tp.prune_linear_in_channels if linear else tp.prune_conv_in_channels
                dg.get_pruning_group(mod, fn, idxs=list(range(k, g.full))).prune()
        for n, full_out in extra.items():
            # A conv subclass's own per-filter tensors (e.g. the gain of a weight-standardised
            # conv) that the graph does not prune: the kept filters are the first ones.
            conv = mods[n]
            assert isinstance(conv, nn.Conv2d)
            for pname, p in list(conv.named_parameters(recurse=False)):
                if pname not in ("weight", "bias") and p.shape[:1] == (full_out,):
                    setattr(conv, pname, nn.Parameter(p.detach()[: conv.out_channels].clone()))
        for n, (weight, groups) in grouped.items():
            # Whole groups are kept (Torch-Pruning would keep their count and thin each).
            conv = mods[n]
            assert isinstance(conv, nn.Conv2d)
            k, per_out = conv.out_channels, weight.shape[0] // groups
            conv.groups, conv.in_channels = k // per_out, k
            conv.weight = nn.Parameter(weight[:k].contiguous())
    for st in tr.stages.values():
        cont = net.get_submodule(st.container)
        for child in st.children[shape.depths[st.name] :]:
            setattr(cont, child, nn.Identity())
    return net


def _scopes(
    net: nn.Module, model: str, size: tuple[int, int, int]
) -> list[tuple[str, nn.Module, Tensor, Any]]:
    """(name, module, example input, dependency graph) of what can be traced: the whole
    network, or, when its graph cannot be followed (e.g. a channel shuffle), the largest
    sub-modules that can; groups inside those are searched, the rest keeps its width."""
    example = torch.zeros(1, *size)
    try:
        return [("", net, example, dependency_graph(net, example))]
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    inputs = _module_inputs(net, example)
    found: list[tuple[str, nn.Module, Tensor, Any]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for child, sub in mod.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if name not in inputs or not any(True for _ in sub.children()):
                continue
            x = torch.zeros(inputs[name])
            try:
                found.append((name, sub, x, dependency_graph(sub, x)))
            except Exception:
                visit(name, sub)

    visit("", net)
    if not found:
        raise ConfigError(
            f"{model}: its graph cannot be traced ({reason}). Fix: use another model, or a "
            "module without data-dependent control flow"
        )
    logger.info(
        "%s: the whole graph cannot be traced (%s); searching inside %d blocks",
        model,
        reason,
        len(found),
    )
    return found


def _module_inputs(net: nn.Module, example: Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of the (single tensor) input of every sub-module in one forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in net.named_modules():
        if name:

            def hook(m: nn.Module, args: Any, n: str = name) -> None:
                if len(args) == 1 and isinstance(args[0], Tensor):
                    shapes.setdefault(n, tuple(args[0].shape))

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with eval_mode(net), torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _internal(
    block: nn.Module, example: Tensor, root_dep: Any, full: int, names: dict[Any, str], scope: str
) -> bool:
    """Does pruning this group leave ``block``'s output shape as it is (a group that lives
    inside the block)? Tried on a copy with its last channel removed."""
    import copy

    if full < 2:
        return False
    with eval_mode(block), torch.no_grad():
        ref = block(example)
    twin = copy.deepcopy(block)
    mod = twin.get_submodule(names[root_dep.target.module][len(scope) + 1 :])
    try:
        dg = dependency_graph(twin, example)
        dg.get_pruning_group(mod, root_dep.handler, idxs=[full - 1]).prune()
        with eval_mode(twin), torch.no_grad():
            out = twin(example)
    except Exception:
        return False
    return isinstance(out, Tensor) and isinstance(ref, Tensor) and out.shape == ref.shape


def _tied(mod: nn.Module) -> bool:
    """A grouped or depthwise conv: its output channels follow its input channels."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1


def dependency_graph(net: nn.Module, example: Tensor) -> Any:
    """Torch-Pruning's dependency graph of ``net`` (its notices about unwrapped parameters
    such as layer scales are expected: they are pruned along their channel dimension)."""
    import warnings

    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(net, example_inputs=example)


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def pruned_state(
    model: str, state: dict[str, Tensor], shape: Shape, num_classes: int, in_channels: int
) -> dict[str, Tensor]:
    """The weights of ``model`` at ``shape`` taken from an unpruned network's ``state``."""
    net = build_source(model, num_classes, in_channels)
    net.load_state_dict(state)
    return prune(net, model, shape, in_channels).state_dict()


def build_pruned(model: str, shape: Shape, num_classes: int, in_channels: int) -> nn.Module:
    return prune(build_source(model, num_classes, in_channels), model, shape, in_channels)


@functools.lru_cache(maxsize=32)
def traced_spec(model: str) -> Any:
    """The `ModelSpec` of a traced source: built, costed and searched from its graph."""
    from tasprune.models.spec import ModelSpec

    tr = traced(model)

    def build(shape: Shape, num_classes: int, in_channels: int, ops: Any) -> nn.Module:
        return build_pruned(model, shape, num_classes, in_channels)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        traced_cost(tr, counter, in_channels, hw, num_classes)

    def width_step(name: str) -> int:
        g = tr.groups[name]
        return 0 if g.fixed else g.multiple

    def transfer(
        state: dict[str, Tensor], shape: Shape, num_classes: int, in_channels: int
    ) -> dict[str, Tensor]:
        return pruned_state(model, state, shape, num_classes, in_channels)

    return ModelSpec(
        name=model,
        family="traced",
        build=build,
        full_shape=tr.full_shape,
        cost=cost,
        default_input=tr.trace_input,
        description=f"{model} traced: {len(tr.groups)} channel groups, {len(tr.stages)} stages",
        residual_groups=lambda: [],  # residual streams are one group already
        width_step=width_step,
        transfer=transfer,
    )
