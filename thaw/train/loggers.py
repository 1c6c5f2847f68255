"""Logs other tools read: TensorBoard event files and MLflow runs, written while a run trains.

A logger is a step hook (called after every optimizer step) and an epoch callback; it reads the
trainer and never changes it, so a run ends with the same weights with or without one. Both
backends are optional extras: a missing package is one line that names the extra.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from thaw.errors import ThawError
from thaw.train.fit import RunState, Trainer

LOGGERS = ("tensorboard", "mlflow")
TENSORBOARD_FOLDER = "tensorboard"  # in the run folder
MLFLOW_FOLDER = "mlruns"  # in the current folder, like MLflow's own default
TOP_IMAGES = 8  # val images with the highest loss, shown per epoch
EPOCH_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "images_per_s")


def require(package: str, extra: str) -> object:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ThawError(f"--log {extra} needs the {package} package: pip install 'thaw[{extra}]'") from None


class RunLogger:
    """What both backends share: the trainer they watch, the lrs per group, the epoch's val outputs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.trainer: Trainer | None = None

    def attach(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.steps_per_epoch = trainer.steps_per_epoch()
        trainer.val_outputs = []  # ask for each val batch's logits: the confusion matrix and top losses per epoch

    def __call__(self, optimizer: torch.optim.Optimizer, step: int, factor: float) -> None:
        engine = self.trainer.engine
        stats = engine.last_step
        scalars = {"step/loss": stats["loss"], "step/images_per_s": stats["samples"] / max(stats["seconds"], 1e-9)}
        scalars |= {f"lr/{group.get('thaw_group', index)}": group["lr"] for index, group in enumerate(optimizer.param_groups)}
        self.log_step(self.global_step(step), scalars)

    def global_step(self, step: int) -> int:
        """Optimizer steps since the run began, over all stages (the hooks' `step` restarts with each stage);
        from the run's own history, so a resumed run continues the count."""
        state = self.trainer.state
        earlier = sum(1 for row in state.history if row["stage_index"] < state.stage)
        return earlier * self.steps_per_epoch + step + 1

    def epoch(self, state: RunState) -> None:
        row = state.history[-1]
        scalars = {f"epoch/{key}": float(row[key]) for key in EPOCH_SCALARS if row.get(key) is not None}
        self.log_epoch(row["epoch"], scalars)

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.trainer.val_outputs or []
        if not outputs:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat([logits for logits, _ in outputs]), torch.cat([labels for _, labels in outputs])

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        """The run ended (or `failed`): flush, and (MLflow) store the run folder."""


class TensorBoardLogger(RunLogger):
    """RUN/tensorboard: scalars per step and per epoch, the val confusion matrix and top-loss images per epoch."""

    def __init__(self, out: Path) -> None:
        super().__init__(out)
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_FOLDER))

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.log_step(epoch, scalars)
        logits, labels = self.val_logits()
        if len(labels):
            self.writer.add_figure("val/confusion", self.confusion_figure(logits, labels), epoch)
            self.top_losses(epoch, logits, labels)
        self.writer.flush()

    def confusion_figure(self, logits: torch.Tensor, labels: torch.Tensor) -> object:
        from thaw.train.plots import confusion_figure

        classes = list(self.trainer.data.classes)
        confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
        confusion.index_put_((labels, logits.argmax(dim=1)), torch.ones_like(labels), accumulate=True)
        return confusion_figure(confusion.tolist(), classes, "val")

    def top_losses(self, epoch: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The val samples with the highest loss: images as a grid, texts as a table."""
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        worst = torch.argsort(losses, descending=True)[:TOP_IMAGES].tolist()
        samples, classes = self.kept_val_samples(), self.trainer.data.classes
        if len(samples) != len(labels):  # under torchrun, rank 0 scores its shard only: no way to name the samples
            return
        captions = [f"true {classes[labels[i]]}, predicted {classes[int(logits[i].argmax())]}, loss {float(losses[i]):.3f}" for i in worst]
        if isinstance(samples[0][0], str):
            lines = [f"| {caption} | {samples[i][0][:200]} |" for caption, i in zip(captions, worst)]
            self.writer.add_text("val/top_losses", "| label | text |\n|---|---|\n" + "\n".join(lines), epoch)
            return
        self.writer.add_images("val/top_losses", torch.stack([self.model_view(samples[i][0]) for i in worst]), epoch)
        self.writer.add_text("val/top_losses_labels", "\n\n".join(f"{n + 1}. {c}" for n, c in enumerate(captions)), epoch)

    def kept_val_samples(self) -> list:
        failed = {path for path, _ in self.trainer.engine.failed}
        return [sample for sample in self.trainer.data.val if str(sample[0]) not in failed]

    def model_view(self, path: Path) -> torch.Tensor:
        """The image as the model saw it (evaluation crop), back in [0, 1]."""
        from thaw.data.images import load_rgb
        from thaw.data.transforms import eval_transform

        pre = self.trainer.preprocessing
        image = eval_transform(pre)(load_rgb(path, 2 * pre.resize_size))
        return (image * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]).clamp(0, 1)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MLflowLogger(RunLogger):
    """An MLflow run: the run's settings as params, step and epoch metrics, and the run folder as artifacts.

    Tracking goes to MLFLOW_TRACKING_URI when set, else to a local SQLite file, ./mlruns/mlflow.db
    (MLflow 3 refuses plain `file:` stores unless MLFLOW_ALLOW_FILE_STORE=true); either works offline.
    """

    def __init__(self, out: Path, params: dict) -> None:
        super().__init__(out)
        self.mlflow = require("mlflow", "mlflow")
        for name in ("mlflow", "alembic"):  # their INFO lines would read as errors on stderr
            logging.getLogger(name).setLevel(logging.WARNING)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            Path(MLFLOW_FOLDER).mkdir(exist_ok=True)
            self.mlflow.set_tracking_uri(f"sqlite:///{Path(MLFLOW_FOLDER).resolve() / 'mlflow.db'}")
        self.mlflow.set_experiment("thaw")
        self.run = self.mlflow.start_run(run_name=out.name)
        self.mlflow.log_params({key: str(value)[:500] for key, value in flatten(params).items()})

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        self.mlflow.log_metrics({tag.replace("/", "."): value for tag, value in scalars.items()}, step=step)

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.log_step(epoch, scalars)

    def close(self, failed: bool = False) -> None:
        """The run folder (all but the checkpoint, which only a resume needs), then end the MLflow run."""
        for path in sorted(self.out.iterdir()):
            if path.is_file() and path.name != "checkpoint.pt" and not path.name.startswith("."):
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run("FAILED" if failed else "FINISHED")


def flatten(params: dict, prefix: str = "") -> dict:
    """Nested settings as MLflow's flat names: {"config": {"seed": 0}} -> {"config.seed": 0}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_loggers(names: list[str], out: Path, params: dict) -> list[RunLogger]:
    """The loggers `--log` asked for, each once; a missing package fails here, before any training."""
    made: list[RunLogger] = []
    for name in dict.fromkeys(names):
        made.append(TensorBoardLogger(out) if name == "tensorboard" else MLflowLogger(out, params))
    return made


__all__ = ["LOGGERS", "MLflowLogger", "RunLogger", "TensorBoardLogger", "make_loggers"]
