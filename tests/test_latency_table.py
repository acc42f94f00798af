"""The latency table and the latency budget: lookups follow the network's own layers, the
expected latency is the table's sum at one-hot distributions, tables round-trip and are only
used where they were measured, an unreachable latency budget is refused before training."""

from __future__ import annotations

import logging
import random
import sys
import zlib

import pytest
import torch
from torch import nn

from tasprune.budget import Budget
from tasprune.config import SearchConfig
from tasprune.data import stratified_split
from tasprune.datasets import load_dataset
from tasprune.errors import BudgetError, ConfigError
from tasprune.latency_table import LatencyTable, Op, TableKey, default_table_path
from tasprune.models import create_model, get_model_spec
from tasprune.models.algebra import Counter, ExactAlgebra
from tasprune.models.graph import output_layers
from tasprune.models.layer_cost import op_of
from tasprune.search import SuperNet, search
from tasprune.search.latency import attach_latency, build_table
from tasprune.search.loop import check_budget

KEY = TableKey("test device", "eager", "torch test", 1, 8)


def _fake(op: Op, cin: int, cout: int) -> float:
    """A deterministic stand-in latency, different for every layer geometry."""
    return (zlib.crc32(op.label().encode()) % 97 + 1) * 1e-4 * cin * cout + 0.01


def _filled(net: SuperNet) -> LatencyTable:
    table = LatencyTable(KEY)
    net.latency_table = table
    with table.collecting() as wanted:
        net.expected_costs()
    net.latency_table = None
    for op, cin, cout in wanted:
        table.record(op, cin, cout, _fake(op, cin, cout))
    return table


def _module_sum(model: nn.Module, in_channels: int, size: tuple[int, int]) -> float:
    """The fake latency summed over the conv/linear modules a forward really runs."""
    modules = dict(model.named_modules())
    heads = [modules[n] for n in output_layers(model, (torch.zeros(1, in_channels, *size),))]
    total = [0.0]

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        op = op_of(mod, tuple(inputs[0].shape), in_channels, mod in heads)
        cin = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
        cout = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        total[0] += _fake(op, int(cin), int(cout))  # type: ignore[arg-type]

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, in_channels, *size))
    for h in hooks:
        h.remove()
    return total[0]


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("cifar_resnet20", (8, 8)),
        ("cifar_resnet164", (8, 8)),
        ("mobilenet_v2", (32, 32)),
        ("torchvision:resnet18", (32, 32)),
    ],
)
def test_the_cost_function_asks_for_every_layer_the_network_runs(
    model: str, size: tuple[int, int], one_thread: None
) -> None:
    """The latency the cost function adds up is the sum over the layers the pruned network
    runs, geometry and widths read off the real modules (random in-space shapes)."""
    net = SuperNet(model, num_classes=10, in_channels=1, input_size=size)
    table = _filled(net)
    rng = random.Random(0)
    for shape in [net.full_shape, *(net.sample(rng) for _ in range(3))]:
        counter = Counter(ExactAlgebra(shape), table)
        get_model_spec(model).cost(counter, 1, size, 10)
        pruned = create_model(model, shape, num_classes=10, in_channels=1)
        assert counter.latency == pytest.approx(_module_sum(pruned, 1, size), rel=1e-9)


def test_expected_latency_is_the_table_sum_at_one_hot(one_thread: None) -> None:
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(8, 8))
    table = _filled(net)
    net.attach_latency(table, (1.5, 0.25))
    rng = random.Random(1)
    shape = net.sample(rng)
    with torch.no_grad():  # put all mass on the sampled shape
        for c in net.all_choices():
            logits = net.logits_of(c)
            if logits is not None:
                value = shape.widths[c.members[0]] if c.kind == "width" else shape.depths[c.name]
                logits.fill_(-60.0)
                logits[c.candidates.index(value)] = 60.0
    exact = net.shape_costs(shape)["latency"]
    counter = Counter(ExactAlgebra(shape), table)
    get_model_spec("cifar_resnet20").cost(counter, 1, (8, 8), 10)
    assert exact == pytest.approx(1.5 * counter.latency + 0.25, rel=1e-12)
    assert float(net.expected_costs()["latency"].detach()) == pytest.approx(exact, rel=1e-9)
    assert float(net.argmax_costs()["latency"]) == pytest.approx(exact, rel=1e-12)
    # Away from one-hot the expected latency is differentiable in the logits.
    for c in net.all_choices():
        logits = net.logits_of(c)
        if logits is not None:
            with torch.no_grad():
                logits.normal_()
    net.expected_costs()["latency"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())


def test_onnx_table_looks_widths_up_at_the_padded_block() -> None:
    table = LatencyTable(TableKey("d", "onnxruntime", "v", 1, 8))
    op = Op("conv2d", (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    assert table.padded(op, 13, 17) == (16, 24)
    assert table.padded(Op("conv2d", (3, 3), (1, 1), (1, 1), (1, 1), (8, 8), image=True), 1, 5) == (
        1,
        8,
    )
    assert table.padded(Op("linear", head=True), 20, 10) == (24, 10)
    assert LatencyTable(KEY).padded(op, 13, 17) == (13, 17)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(**kw: object) -> SearchConfig:
    base = {"latency_ratio": 0.5, "latency_runtime": "eager", "latency_batch": 4}
    return SearchConfig.model_validate({**base, **kw})


def test_table_round_trip_and_a_table_of_another_key_is_not_used(
    cache, tmp_path, caplog, one_thread: None
) -> None:
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(8, 8))
    cfg = _cfg()
    table, fit, path = build_table(net, cfg, progress=False)
    assert path == default_table_path(table.key) and path.is_file()
    assert table.entries and all(v >= 0 for v in table.entries.values())
    loaded = LatencyTable.load(path, table.key)
    assert loaded is not None and loaded.entries == table.entries
    assert loaded.models == table.models
    # A second build measures nothing new and gives the same calibration.
    again, fit2, _ = build_table(net, cfg, progress=False)
    assert again.entries == table.entries and fit2 == fit
    # Another thread count: the stored table is not used, and the log says why.
    other = TableKey(table.key.device, "eager", table.key.version, 2, table.key.batch)
    with caplog.at_level(logging.WARNING):
        assert LatencyTable.load(path, other) is None
    assert "threads 1 (here 2)" in caplog.text
    # A named table file of another key: not used, not overwritten; the cache's is used.
    named = tmp_path / "mine.json"
    LatencyTable(other, {"x": 1.0}).save(named)
    before = named.read_text()
    with caplog.at_level(logging.WARNING):
        _, _, used = build_table(net, cfg.model_copy(update={"latency_table": str(named)}))
    assert used == path and named.read_text() == before
    assert "mine.json is not used" in caplog.text


def test_a_named_table_that_does_not_exist_is_an_error(cache, tmp_path) -> None:
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(8, 8))
    with pytest.raises(ConfigError, match="does not exist"):
        build_table(net, _cfg(latency_table=str(tmp_path / "nope.json")), progress=False)


def test_missing_onnxruntime_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"pip install 'tasprune\[export\]'"):
        TableKey.here("onnxruntime", 1, 8)


def test_latency_budget_alone_drops_the_flops_default_and_both_can_be_set() -> None:
    alone = SearchConfig(latency_ratio=0.4)
    assert alone.flops_ratio is None
    assert [b.metric for b in alone.budgets()] == ["latency"]
    both = SearchConfig(latency_ratio=0.4, flops_ratio=0.6)
    assert [b.metric for b in both.budgets()] == ["latency", "flops"]
    assert SearchConfig().budget == Budget(0.5, 0.05, "flops")
    # The resolved config round-trips (recipe.yaml is re-read on resume).
    again = SearchConfig.model_validate(alone.model_dump(mode="json"))
    assert again.budgets() == alone.budgets()
    with pytest.raises(ConfigError, match="flops_ratio"):
        _ = alone.flops_budget


def test_unreachable_latency_budget_is_refused_with_the_minimum(cache, one_thread: None) -> None:
    with pytest.raises(BudgetError, match=r"smallest shape of cifar_resnet20 costs .* ms \(ratio"):
        check_budget("cifar_resnet20", _cfg(latency_ratio=0.001, tolerance=0.0005), (1, 8, 8), 10)


def test_a_latency_search_records_its_prediction(cache, tmp_path, one_thread: None) -> None:
    data = load_dataset("fashion-mnist", "train")
    idx, _ = stratified_split(data.labels, 256 / len(data), seed=0)
    cfg = _cfg(epochs=1, batch_size=64, arch_lr=0.1, valid_batches=1)
    result = search("cifar_resnet20", data.subset(idx), cfg, tmp_path / "s", progress=False)
    lat = result.latency
    assert lat is not None and lat["runtime"] == "eager" and lat["batch"] == 4
    assert lat["predicted_ratio"] <= cfg.latency_ratio + 1e-9  # in band, or projected onto it
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(28, 28))
    attach_latency(net, cfg, progress=False)  # the cached table: the same prediction
    assert net.shape_costs(result.shape)["latency"] == pytest.approx(lat["predicted_ms"])
    assert result.history[-1]["latency_ratio"] > 0


def test_onnx_latency_budget_snaps_candidates_up_to_the_block() -> None:
    snapped = SearchConfig(latency_ratio=0.5).space()
    assert snapped.width_snap == 8
    net = SuperNet(
        "cifar_resnet20", num_classes=10, in_channels=1, input_size=(8, 8), options=snapped
    )
    for c in net.width_choices.values():
        assert all(v % 8 == 0 or v == net.full_shape.widths[c.members[0]] for v in c.candidates)
    plain = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(8, 8))
    for name, c in plain.width_choices.items():  # every plain candidate, rounded up, is one
        assert {min(-(-v // 8) * 8, c.candidates[-1]) for v in c.candidates} == set(
            net.width_choices[name].candidates
        )
    assert SearchConfig(latency_ratio=0.5, latency_snap=False).space().width_snap == 1
    assert SearchConfig(latency_ratio=0.5, latency_runtime="eager").space().width_snap == 1
    assert SearchConfig().space().width_snap == 1


def test_latency_table_command_writes_the_named_file_and_refuses_another_machines(
    cache, tmp_path, capsys, one_thread: None
) -> None:
    from tasprune.cli import main

    out = tmp_path / "r20.json"
    args = ["latency-table", "--model", "cifar_resnet20", "--backend", "eager", "--batch", "2"]
    args += ["--input-size", "1", "8", "8", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert f"{out}:" in capsys.readouterr().out
    table = LatencyTable.load(out, TableKey.here("eager", 1, 2))
    assert table is not None and table.entries
    assert "cifar_resnet20 1x8x8 classes 10" in table.models
    # Run again: the named file is extended in place (nothing new to measure here).
    assert main(args) == 0
    assert LatencyTable.load(out, TableKey.here("eager", 1, 2)).entries == table.entries  # type: ignore[union-attr]
    # A file of another key is neither used nor overwritten.
    LatencyTable(TableKey("elsewhere", "eager", "v", 1, 2), {"x": 1.0}).save(out)
    before = out.read_text()
    assert main(args) == 2
    assert "holds a latency table of another machine" in capsys.readouterr().err
    assert out.read_text() == before


def test_an_int8_table_times_each_layer_quantised_as_the_export_ships_it(
    one_thread: None,
) -> None:
    """latency_runtime onnxruntime-int8: its own table key (version says int8), widths looked
    up at the padded block, each layer exported and quantised (QDQ) before it is timed, and a
    whole network timed the same way."""
    from tasprune.latency import LatencySettings, measure
    from tasprune.search.latency import _timer

    key = TableKey.here("onnxruntime-int8", 1, 4)
    assert key.version.endswith("int8 QDQ") and key.slug().startswith("onnxruntime-int8")
    op = Op("conv2d", (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    assert LatencyTable(key).padded(op, 5, 13) == (8, 16)
    assert SearchConfig(latency_ratio=0.5, latency_runtime="onnxruntime-int8").snap_block == 8
    ms = _timer(key, 3)(op, 16, 16)
    assert ms >= 0.0
    net = create_model("cifar_resnet20", num_classes=10, in_channels=1)
    settings = LatencySettings("onnxruntime-int8", 2, 1, 3, 1)
    assert measure(net, (1, 8, 8), settings)["median_ms"] > 0
