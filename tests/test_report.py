"""The run report: exact costs, latency, the four plots and the markdown table of a run folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion_mnist
from tasprune.checkpoint import load_checkpoint, save_checkpoint
from tasprune.cost import model_cost
from tasprune.errors import TaspruneError
from tasprune.int8 import CHECK_IMAGES
from tasprune.models import create_model, get_model_spec
from tasprune.plots import PLOTS
from tasprune.report import format_table, write_report
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, count_params

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "cifar_resnet20"
INPUT = (1, 28, 28)
TARGET, TOL = 0.5, 0.05
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


#: A user's network of plain convs: width choices, no depth choice (tests/user_nets.py).
PLAIN = "py:user_nets:plain_net"


def pruned_shape(model: str = MODEL) -> Shape:
    full = get_model_spec(model).full_shape()
    widths = {
        k: max(1, (v * 5) // 8) if i % 3 else v for i, (k, v) in enumerate(full.widths.items())
    }
    depths = {"layer1.0": 2, "layer2.0": 1, "layer3.0": 3} if model == MODEL else {}
    return full.replace(widths=widths, depths=depths)


def write_stage(
    folder: Path, shape: Shape, role: str, top1: float, epochs: int = 4, model: str = MODEL
) -> None:
    """model.pt (random weights), final.json and history.jsonl as the engine writes them."""
    net = create_model(model, shape, num_classes=10, in_channels=1)
    meta = {
        "model": model,
        "shape": shape.to_dict(),
        "num_classes": 10,
        "in_channels": 1,
        "input_size": list(INPUT),
        "dataset": "fashion-mnist",
        "role": role,
        "recipe": {"search": {"flops_ratio": TARGET, "tolerance": TOL}},
    }
    save_checkpoint(folder / "model.pt", {"model": net.state_dict(), "meta": meta})
    metrics = {"epochs": epochs, "top1": top1, "top5": 99.0, "loss": 0.4}
    final = {"metrics": metrics, "epochs": epochs, "meta": meta}
    (folder / "final.json").write_text(json.dumps(final))
    history = JsonlLogger(folder / "history.jsonl")
    for e in range(epochs):
        acc = top1 - 20 * 0.5**e
        history.log(
            {
                "epoch": e,
                "train_top1": acc - 2,
                "test_top1": acc if e % 2 == 1 or e == epochs - 1 else None,  # eval_every=2
                "test_top5": 99.0,
            }
        )


def make_run(out: Path, *, search_history: bool = True, model: str = MODEL) -> Path:
    full = get_model_spec(model).full_shape()
    small = pruned_shape(model)
    (out / "recipe.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(
        f"model: {model}\nsearch:\n  flops_ratio: {TARGET}\n  tolerance: {TOL}\n"
    )
    write_stage(out / "teacher", full, "teacher", top1=92.0, model=model)
    write_stage(out / "student", small, "student", top1=90.5, model=model)
    search = out / "search"
    search.mkdir()
    f, p = model_cost(model, small, INPUT, 10)
    full_f = model_cost(model, full, INPUT, 10)[0]
    extra = {"model": model, "input_size": list(INPUT), "num_classes": 10}
    small.save(search / "shape.json", **extra, flops=f, params=p, flops_ratio=f / full_f)
    small.save(search / "shape_last.json", **extra, flops=f, params=p, flops_ratio=f / full_f)
    if search_history:
        rows = JsonlLogger(search / "history.jsonl")
        for e in range(6):
            ratio = 1.0 - 0.1 * e
            rows.log(
                {
                    "epoch": e,
                    "flops_ratio": ratio,
                    "valid_top1": 60.0 + 4 * e,
                    "entropy_mean": 1.5 / (e + 1),
                    "entropy_max": 2.0 / (e + 1),
                    "in_band": TARGET - TOL <= ratio <= TARGET,
                    "tau": 5.0 - 0.9 * e,
                    "loss": 1.0 / (e + 1),
                    "shape": small.to_dict(),
                }
            )
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = make_run(tmp_path_factory.mktemp("report") / "run")
    report = write_report(out, latency_batches=(1, 4), repeats=3)
    return out, report


def test_report_costs_are_exact(run: tuple[Path, dict]) -> None:
    out, report = run
    stored = json.loads((out / "report.json").read_text())
    assert stored == json.loads(json.dumps(report))
    assert stored["model"] == MODEL and stored["dataset"] == "fashion-mnist"
    for role, shape in (
        ("teacher", get_model_spec(MODEL).full_shape()),
        ("pruned", pruned_shape()),
    ):
        flops, params = model_cost(MODEL, shape, INPUT, 10)
        assert stored[role]["flops"] == flops
        assert stored[role]["params"] == params
        assert params == count_params(create_model(MODEL, shape, num_classes=10, in_channels=1))
    t, p = stored["teacher"], stored["pruned"]
    assert p["flops_ratio"] == pytest.approx(p["flops"] / t["flops"])
    assert p["params_ratio"] == pytest.approx(p["params"] / t["params"])
    assert 0 < p["flops_ratio"] < 1
    assert (t["top1"], t["top5"], p["top1"]) == (92.0, 99.0, 90.5)


def test_report_latency_is_measured_at_each_batch(run: tuple[Path, dict]) -> None:
    _, report = run
    for role in ("teacher", "pruned"):
        for key in ("latency_ms", "onnx_latency_ms"):
            values = report[role][key]  # type: ignore[index]
            assert set(values) == {"1", "4"}
            assert all(v > 0 and math.isfinite(v) for v in values.values())
    ratios = report["pruned"]["latency_ratio"]  # type: ignore[index]
    assert set(ratios) == {"1", "4"} and all(r > 0 for r in ratios.values())


def test_report_search_section(run: tuple[Path, dict]) -> None:
    _, report = run
    search = report["search"]
    assert search["target_ratio"] == TARGET  # type: ignore[index]
    assert search["band"] == pytest.approx([TARGET - TOL, TARGET])  # type: ignore[index]
    assert search["epochs"] == 6 and search["epochs_in_band"] == 1  # type: ignore[index]
    assert search["final_entropy"] == pytest.approx(0.25)  # type: ignore[index]
    assert search["student_matches_search"] is True  # type: ignore[index]
    # The fixture's pruned shape costs ~0.35 of the teacher: below the band, and said so.
    assert search["pruned_in_band"] is False  # type: ignore[index]
    assert any("outside the target band" in n for n in report["notes"])  # type: ignore[attr-defined]


def test_report_plots_are_png_files(run: tuple[Path, dict]) -> None:
    from matplotlib.image import imread

    out, report = run
    assert set(report["plots"]) == set(PLOTS)  # type: ignore[arg-type]
    for name in PLOTS:
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width = imread(path).shape[:2]
        assert height > 200 and width > 200


def test_report_markdown_has_the_table(run: tuple[Path, dict]) -> None:
    out, report = run
    md = (out / "report.md").read_text()
    table = format_table(report)
    assert table in md
    assert table.splitlines()[0] == "| | teacher | pruned | pruned vs teacher |"
    assert "| top-1 (%) | 92.00 | 90.50 | -1.50 pt |" in table
    assert "latency, batch 4 (ms)" in table and "ONNX Runtime latency, batch 1 (ms)" in table
    for name in PLOTS:
        assert f"plots/{name}.png" in md


def test_a_network_without_depth_choices_gets_the_whole_report(tmp_path: Path) -> None:
    """A network with width choices and no depth choice (plain convs): the report finishes,
    with every plot but the depth one, which is skipped with a note rather than drawn empty."""
    assert get_model_spec(PLAIN).full_shape().depths == {}
    out = make_run(tmp_path / "run", model=PLAIN)
    report = write_report(out, latency_batches=(1,), repeats=1, int8=False)
    assert set(report["plots"]) == set(PLOTS) - {"depths"}
    for name in report["plots"]:
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "plots" / "depths.png").exists()
    assert any("depths.png skipped" in n for n in report["notes"])
    assert (out / "report.json").is_file()
    assert report["pruned"]["flops_ratio"] < 1


def test_missing_search_history_is_a_note(tmp_path: Path) -> None:
    out = make_run(tmp_path / "run", search_history=False)
    (out / "teacher" / "history.jsonl").unlink()
    report = write_report(out, latency_batches=(1,), repeats=1, int8=False)
    assert "search_trajectory" not in report["plots"]
    assert not (out / "plots" / "search_trajectory.png").exists()
    assert (out / "plots" / "training.png").is_file()  # the student's curve alone
    notes = " ".join(report["notes"])
    assert "search_trajectory.png skipped" in notes and "no teacher curve" in notes
    assert "(plots/search_trajectory.png)" not in (out / "report.md").read_text()


@pytest.mark.parametrize("missing", ["teacher", "student"])
def test_missing_model_names_it_and_the_fix(tmp_path: Path, missing: str) -> None:
    out = tmp_path / "run"
    write_stage(out / "teacher", get_model_spec(MODEL).full_shape(), "teacher", 90.0, epochs=1)
    write_stage(out / "student", pruned_shape(), "student", 89.0, epochs=1)
    (out / missing / "model.pt").unlink()
    with pytest.raises(TaspruneError) as info:
        write_report(out, latency_batches=(1,), repeats=1, int8=False)
    msg = str(info.value)
    assert f"{missing}/model.pt" in msg and "Fix: run `tasprune run RECIPE --out" in msg
    assert "\n" not in msg
    assert not (out / "report.json").exists()


def test_a_latency_budget_is_reported_predicted_against_measured(tmp_path: Path) -> None:
    """The report re-times both networks in the runtime, threads and batch of the search's
    table and checks the band on the latency ratio, not the FLOPs ratio."""
    out = make_run(tmp_path / "run")
    (out / "recipe.yaml").write_text(
        f"model: {MODEL}\nsearch:\n  latency_ratio: {TARGET}\n  tolerance: {TOL}\n"
        "  latency_runtime: eager\n  latency_batch: 4\n"
    )
    shape, data = Shape.load(out / "search" / "shape.json")
    latency = {"runtime": "eager", "threads": 1, "batch": 4, "predicted_ratio": 0.48}
    shape.save(
        out / "search" / "shape.json", **{**data, "latency": {**latency, "predicted_ms": 1.0}}
    )
    report = write_report(out, latency_batches=(1,), repeats=3, int8=False)
    lb = report["search"]["latency_budget"]  # type: ignore[index]
    assert lb["measured_ms"] > 0 and lb["teacher_measured_ms"] > 0
    assert lb["measured_ratio"] == pytest.approx(lb["measured_ms"] / lb["teacher_measured_ms"])
    assert report["search"]["metric"] == "latency"  # type: ignore[index]
    assert report["search"]["pruned_in_band"] is True  # type: ignore[index]
    assert not any("outside the target band" in n for n in report["notes"])  # type: ignore[attr-defined]
    md = (out / "report.md").read_text()
    assert (
        "target latency ratio 0.500" in md and "latency budget (eager, 1 thread(s), batch 4)" in md
    )


@needs_fashion_mnist
def test_report_has_int8_rows(run: tuple[Path, dict]) -> None:
    """Both networks' int8 ONNX models: top-1 on the export's held-out test images and ONNX
    Runtime latency at each batch, in report.json and as rows of the table."""
    out, report = run
    for role in ("teacher", "pruned"):
        int8 = report[role]["int8"]  # type: ignore[index]
        assert int8["images"] == CHECK_IMAGES
        assert 0 <= int8["top1"] <= 100 and 0 <= int8["onnx_fp32_top1"] <= 100
        latency = report[role]["int8_latency_ms"]  # type: ignore[index]
        assert set(latency) == {"1", "4"}
        assert all(v > 0 and math.isfinite(v) for v in latency.values())
    assert set(report["pruned"]["int8_latency_ratio"]) == {"1", "4"}  # type: ignore[index]
    md = (out / "report.md").read_text()
    assert f"| ONNX int8 top-1, {CHECK_IMAGES} test images (%) |" in md
    assert "| ONNX Runtime int8 latency, batch 4 (ms) |" in md
    assert f"on {CHECK_IMAGES} seeded test images" in md


def test_int8_rows_without_data_or_quantiser_are_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training data that cannot be read, or no onnxruntime.quantization: the report is
    written without int8 rows, and says why."""
    out = make_run(tmp_path / "run")
    for folder in ("teacher", "student"):
        payload = load_checkpoint(out / folder / "model.pt")
        payload["meta"]["recipe"]["data"] = {"name": "cifar10", "root": str(tmp_path / "absent")}
        save_checkpoint(out / folder / "model.pt", payload)
    report = write_report(out, latency_batches=(1,), repeats=1)
    notes = [n for n in report["notes"] if n.startswith("int8 rows of the")]
    assert len(notes) == 2 and all(
        "cifar10" in n and "export --int8 --data-root" in n for n in notes
    )
    assert "int8" not in report["teacher"] and "int8" not in report["pruned"]
    assert "int8" not in format_table(report)
    assert (out / "report.json").is_file()

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import raises
    report = write_report(make_run(tmp_path / "run2"), latency_batches=(1,), repeats=1)
    notes = [n for n in report["notes"] if n.startswith("int8 rows of the")]
    assert len(notes) == 2 and all("onnxruntime.quantization unavailable" in n for n in notes)
    assert "int8_latency_ms" not in report["pruned"]
