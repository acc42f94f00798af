"""TAS inside the Ultralytics trainer: a YOLO model searched by its own training loop, then
fine-tuned, validated and exported by Ultralytics itself.

Ultralytics is AGPL-3.0: an optional extra (``pip install 'tasprune[yolo]'``), imported
only here and only when these functions run; tasprune itself never imports it. (Importing
Ultralytics replaces PIL's ``Image.open`` in the whole process: its own behaviour.)

    from tasprune.integrations import ultralytics as tu
    tas = tu.search(model, "data.yaml", flops_ratio=0.5, epochs=10, imgsz=128)
    student = tas.prune()                    # a DetectionModel, physically smaller
    tu.finetune(student, "data.yaml", teacher="teacher.pt", epochs=20, imgsz=128)

`search` runs the trainer on ``tas.model`` (your model made searchable) with the joint step:
the trainer's own forward, loss, backward and optimiser step train the weights; before each
optimiser step the budget loss (scaled as Ultralytics scales its loss: per image, summed over
the nominal batch) adds its gradient to the architecture logits, which tasprune's Adam steps
after it; each epoch's end anneals the temperature. The trainer's EMA copy shares the search
(the logits are not parameters of the model, so neither the trainer's optimiser nor its EMA
nor its saved weights hold them). Its checkpoints are tasprune's (the searchable model does
not pickle): ``weights/search.pt`` holds the search state and the supernet weights, and
``resume=True`` is not offered while searching.

`finetune` trains the pruned model with the stock trainer (Ultralytics' own distillation when
``teacher`` is given), so ``best.pt``, ``YOLO(best.pt).val()`` and ``.export()`` are
Ultralytics' own.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasprune.errors import ConfigError
from tasprune.search.tas import TAS


def offline(folder: str | os.PathLike[str]) -> Path:
    """Ultralytics without the internet: its settings in ``folder`` (YOLO_CONFIG_DIR), no
    downloads or installs (YOLO_OFFLINE, YOLO_AUTOINSTALL), and the font its plots load
    (``Arial.ttf``, else fetched) copied from matplotlib's DejaVu Sans. Call it before the
    first ``import ultralytics``; returns the folder."""
    root = Path(folder)
    (root / "Ultralytics").mkdir(parents=True, exist_ok=True)
    font = root / "Ultralytics" / "Arial.ttf"
    if not font.is_file():
        import matplotlib

        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", font)
    os.environ.update(
        {"YOLO_CONFIG_DIR": str(root), "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}
    )
    return root


def data_yaml(root: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """The Ultralytics data file of a canvas set (`tasprune.tasks.build_canvas_set`: its
    images/ and labels/ folders are the YOLO layout): train, val and test splits and the
    Fashion-MNIST class names. Written to ``path`` (default ``root/data.yaml``)."""
    import yaml

    from tasprune.tasks.canvas import FASHION_MNIST_CLASSES

    root = Path(root).resolve()
    if not (root / "images" / "train").is_dir():
        raise ConfigError(f"{root} holds no images/train. Fix: pass a build_canvas_set folder")
    out = Path(path) if path is not None else root / "data.yaml"
    spec = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": dict(enumerate(FASHION_MNIST_CLASSES)),
    }
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def _arguments(
    label: str, data: Any, epochs: int, imgsz: int, batch: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The trainer's arguments: ``label`` names the model (the trainer receives the module
    itself); fp32 on the CPU, no plots, no pretrained weights, unless ``overrides`` say."""
    return {
        "model": f"{label}.yaml",
        "data": str(data),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "amp": False,
        "plots": False,
        "pretrained": False,
        **overrides,
    }


def _module(model: Any) -> nn.Module:
    assert isinstance(model, nn.Module)
    return model


def _trainer_class() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    class SearchTrainer(DetectionTrainer):  # type: ignore[misc]
        """The stock detection trainer on ``tas.model``, with the joint architecture step."""

        tas: TAS

        def optimizer_step(self) -> None:
            # The detection loss Ultralytics backpropagates is per image summed over the
            # batch, accumulated over `accumulate` batches: the budget loss weighs the same.
            scale = float(self.batch_size * self.accumulate)
            self.scaler.scale(self.tas.budget_loss() * scale).backward()
            self.tas.step(self.scaler)
            super().optimizer_step()

        def save_model(self) -> bool:
            state = {
                "epoch": self.epoch,
                "tas": self.tas.state_dict(),
                "model": {k: v.detach().cpu() for k, v in _module(self.model).state_dict().items()},
            }
            self.wdir.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.wdir / "search.pt")
            return True

        def final_eval(self) -> None:  # best.pt/last.pt are not written while searching
            return None

    return SearchTrainer


def search(
    model: nn.Module,
    data: str | os.PathLike[str],
    *,
    epochs: int,
    imgsz: int = 640,
    batch: int = 16,
    flops_ratio: float | None = 0.5,
    params_ratio: float | None = None,
    only: tuple[str, ...] | list[str] = (),
    ignore: tuple[str, ...] | list[str] = (),
    tas_settings: dict[str, Any] | None = None,
    **overrides: Any,
) -> TAS:
    """Search ``model`` (an Ultralytics DetectionModel with its trained weights) under a FLOPs
    (or params) budget with the Ultralytics trainer on ``data``; returns the `TAS` (its
    `shape()`, `save_shape()`, `prune()`). ``tas_settings``: more `SearchConfig` fields
    (``arch_lr``, ``tau_max``, ...); ``overrides``: the trainer's own arguments (``lr0``,
    ``project``, ``name``, ``workers``, ``device``, ...). Validation during the search runs on
    the argmax network of the moment (``val=False`` skips it). ``only``/``ignore``: as
    `TAS`'s (``only=["model.0", ..., "model.9"]``: the backbone of a YOLOv8 alone)."""
    if overrides.get("resume"):
        raise ConfigError(
            "resume is not offered while searching (the searchable model does not pickle). "
            "Fix: rerun the search, or fine-tune from its pruned model"
        )
    settings = {"arch_step": "joint", "arch_lr": 0.05, **(tas_settings or {})}
    if flops_ratio is not None:
        settings["flops_ratio"] = flops_ratio
    if params_ratio is not None:
        settings["params_ratio"] = params_ratio
    example = torch.zeros(1, 3, imgsz, imgsz)
    tas = TAS(model.float().train(), example, epochs=epochs, only=only, ignore=ignore, **settings)
    trainer = _trainer_class()(
        overrides=_arguments("tasprune-search", data, epochs, imgsz, batch, overrides)
    )
    trainer.tas = tas
    trainer.model = tas.model
    trainer.add_callback("on_train_epoch_end", lambda _: tas.end_epoch())
    trainer.train()
    return tas


def finetune(
    student: nn.Module,
    data: str | os.PathLike[str],
    *,
    teacher: str | os.PathLike[str] | nn.Module | None = None,
    epochs: int,
    imgsz: int = 640,
    batch: int = 16,
    **overrides: Any,
) -> Any:
    """Train the pruned ``student`` with the stock Ultralytics trainer (its distillation from
    ``teacher``, a checkpoint or model, when given); returns the trainer (``trainer.best``:
    its ``best.pt``, which ``YOLO(...).val()`` and ``.export()`` read)."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    args = _arguments("tasprune-student", data, epochs, imgsz, batch, overrides)
    if isinstance(teacher, (str, os.PathLike)):
        args["distill_model"] = str(teacher)
    trainer = DetectionTrainer(overrides=args)
    if isinstance(teacher, nn.Module):
        # As a checkpoint file of Ultralytics' format: the trainer's arguments (saved into
        # every checkpoint it writes) then hold its path, not the whole teacher.
        path = trainer.wdir / "teacher.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": copy.deepcopy(teacher).float().eval()}, path)
        trainer.args.distill_model = str(path)
    trainer.model = student.float()  # type: ignore[assignment]
    trainer.train()
    return trainer
