"""Logs other tools read: TensorBoard event files and MLflow runs, written while a run trains.

A logger is a step hook (called after every optimizer step) and an epoch callback; it reads the
trainer and never changes it, so a run ends with the same weights with or without one. Both
backends are optional extras: a missing package is one line that names the extra.
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from thaw.data.folders import would_be_read
from thaw.errors import ThawError
from thaw.train.feature_cache import CACHE_FOLDER
from thaw.train.fit import RunState, Trainer
from thaw.train.run_folder import TENSORBOARD_FOLDER

LOGGERS = ("tensorboard", "mlflow")
MLFLOW_FOLDER = "mlruns"  # in the current folder, like MLflow's own default (so one store holds every run to compare)
MLFLOW_EXPERIMENT = "thaw"
TOP_IMAGES = 8  # val images with the highest loss, shown per epoch
EPOCH_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "images_per_s", "data_wait_share")


def require(package: str, extra: str) -> object:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ThawError(f"--log {extra} needs the {package} package: pip install 'thaw[{extra}]'") from None


class RunLogger(abc.ABC):
    """What both backends share: the trainer they watch, the lrs per group, the epoch's val outputs."""

    name = "logger"

    def __init__(self, out: Path) -> None:
        self.out = out
        self.trainer: Trainer | None = None
        self.broken: str | None = None  # why it stopped logging, once it has failed

    def guarded(self, action: Callable[[], None]) -> None:
        """Log, or if logging fails (a full disk, a locked database) say so once and stop logging:
        hours of training are worth more than the log, and the run's own files still record it."""
        if self.broken is not None:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001 - whatever the backend raises, the training goes on
            self.broken = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"thaw: warning: --log {self.name} stopped logging ({self.broken}); the training goes on", file=sys.stderr, flush=True)

    def attach(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.steps_per_epoch = trainer.steps_per_epoch()
        trainer.val_outputs = []  # ask for each val sample's outcome: the confusion matrix and top losses per epoch

    def __call__(self, optimizer: torch.optim.Optimizer, step: int, factor: float) -> None:
        engine = self.trainer.engine
        stats = engine.last_step
        scalars = {"step/loss": stats["loss"], "step/accuracy": stats["accuracy"], "step/images_per_s": stats["samples"] / max(stats["seconds"], 1e-9)}
        scalars |= {f"lr/{group.get('thaw_group', index)}": group["lr"] for index, group in enumerate(optimizer.param_groups)}
        self.guarded(lambda: self.log_step(self.global_step(step), scalars))

    def global_step(self, step: int) -> int:
        """Optimizer steps since the run began, over all stages (the hooks' `step` restarts with each stage);
        from the run's own history, so a resumed run continues the count."""
        state = self.trainer.state
        earlier = sum(1 for row in state.history if row["stage_index"] < state.stage)
        return earlier * self.steps_per_epoch + step + 1

    def epoch(self, state: RunState) -> None:
        row = state.history[-1]
        scalars = {f"epoch/{key}": float(row[key]) for key in EPOCH_SCALARS if row.get(key) is not None}
        self.guarded(lambda: self.log_epoch(row["epoch"], scalars))

    def val_outcomes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's val predictions, losses and labels, in val order."""
        outputs = self.trainer.val_outputs or []
        if not outputs:
            return torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0, dtype=torch.long)
        predicted, losses, labels = zip(*outputs)
        return torch.cat(predicted), torch.cat(losses), torch.cat(labels)

    @abc.abstractmethod
    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        """Write one optimizer step's scalars to the tool."""

    @abc.abstractmethod
    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        """Write one epoch's scalars (and images) to the tool."""

    def close(self, ending: str = "FINISHED") -> None:
        """The run ended (`ending`: FINISHED, FAILED or KILLED, MLflow's words): flush, and (MLflow) store the run folder."""


class TensorBoardLogger(RunLogger):
    """RUN/tensorboard: scalars per step and per epoch, the val confusion matrix and top-loss images per epoch."""

    name = "tensorboard"

    def __init__(self, out: Path) -> None:
        super().__init__(out)
        require("tensorboard", "tensorboard")
        self._writer = None

    def writer_from(self, step: int) -> object:
        """The event writer, opened at the first step logged: a run resumed from an earlier checkpoint than its
        last logged step (a kill inside an epoch) logs those steps again, and purge_step makes TensorBoard drop
        the first copies instead of showing both."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out / TENSORBOARD_FOLDER), purge_step=step)
        return self._writer

    @property
    def writer(self) -> object:
        return self.writer_from(1)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        writer = self.writer_from(step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.log_step(epoch, scalars)
        predicted, losses, labels = self.val_outcomes()
        if len(labels):
            self.writer.add_figure("val/confusion", self.confusion_figure(predicted, labels), epoch)
            self.top_losses(epoch, predicted, losses, labels)
        self.writer.flush()

    def confusion_figure(self, predicted: torch.Tensor, labels: torch.Tensor) -> object:
        from thaw.train.plots import confusion_figure

        classes = list(self.trainer.data.classes)
        confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
        confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        return confusion_figure(confusion.tolist(), classes, "val")

    def top_losses(self, epoch: int, predicted: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor) -> None:
        """The val samples with the highest loss: images as a grid, texts as a table."""
        worst = torch.argsort(losses, descending=True)[:TOP_IMAGES].tolist()
        samples, classes = self.kept_val_samples(), self.trainer.data.classes
        if len(samples) != len(labels):  # under torchrun, rank 0 scores its shard only: no way to name the samples
            return
        captions = [f"true {classes[labels[i]]}, predicted {classes[int(predicted[i])]}, loss {float(losses[i]):.3f}" for i in worst]
        if isinstance(samples[0][0], str):
            lines = [f"| {caption} | {samples[i][0][:200]} |" for caption, i in zip(captions, worst)]
            self.writer.add_text("val/top_losses", "| label | text |\n|---|---|\n" + "\n".join(lines), epoch)
            return
        size = self.trainer.preprocessing.crop_size
        self.writer.add_images("val/top_losses", torch.stack([self.model_view(samples[i][0], size) for i in worst]), epoch)
        self.writer.add_text("val/top_losses_labels", "\n\n".join(f"{n + 1}. {c}" for n, c in enumerate(captions)), epoch)

    def kept_val_samples(self) -> list:
        """The val samples in the order they were scored: the val loader's (text batches are grouped by length,
        and the cached val features were computed by a loader of the same kind and batch size), less undecodable files."""
        failed, val = {path for path, _ in self.trainer.engine.failed}, self.trainer.data.val
        order = [index for batch in self.trainer.val_loader.batch_sampler for index in batch]
        return [val[index] for index in order if str(val[index][0]) not in failed]

    def model_view(self, path: Path, size: int) -> torch.Tensor:
        """The image as the model saw it (evaluation crop), back in [0, 1]; grey where it no longer decodes."""
        from thaw.data.images import UnreadableImage, load_rgb
        from thaw.data.transforms import eval_transform

        pre = self.trainer.preprocessing
        try:
            image = eval_transform(pre)(load_rgb(path, 2 * pre.resize_size))
        except (UnreadableImage, OSError):  # changed on disk since it was scored: one grey tile, not the end of the log
            return torch.full((3, size, size), 0.5)
        return (image * torch.tensor(pre.std)[:, None, None] + torch.tensor(pre.mean)[:, None, None]).clamp(0, 1)

    def close(self, ending: str = "FINISHED") -> None:
        if self._writer is not None:
            self._writer.close()


class MLflowLogger(RunLogger):
    """An MLflow run: the run's settings as params, step and epoch metrics, and the run folder as artifacts.

    Tracking goes to MLFLOW_TRACKING_URI when set, else to a local SQLite file, ./mlruns/mlflow.db
    (MLflow 3 refuses plain `file:` stores unless MLFLOW_ALLOW_FILE_STORE=true); either works offline.
    A client of its own, not mlflow's module-level state: thaw neither changes the caller's tracking URI
    nor collides with a run the caller has active.
    """

    name = "mlflow"

    def __init__(self, out: Path, params: dict) -> None:
        super().__init__(out)
        require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines would read as errors on stderr
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = tracking_uri()
        try:
            self.client = MlflowClient(uri)
            experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        except Exception as error:  # noqa: BLE001 - an unknown scheme, a server that does not answer: before any work
            line = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            raise ThawError(f"--log mlflow cannot use the tracking URI {uri} ({line}); check MLFLOW_TRACKING_URI or unset it") from None
        try:
            self.client.log_batch(self.run_id, params=[Param(key, str(value)[:500]) for key, value in flatten(params).items()])
        except Exception:
            self.client.set_terminated(self.run_id, "FAILED")  # no run left RUNNING forever
            raise

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag.replace("/", "."), float(value), now, step) for tag, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, epoch: int, scalars: dict[str, float]) -> None:
        self.log_step(epoch, scalars)

    def close(self, ending: str = "FINISHED") -> None:
        """The run folder (all but the checkpoint, which only a resume needs), then end the MLflow run as `ending`:
        KILLED when the user stopped it, FAILED when the training failed or the artifacts could not be stored."""
        try:
            for path in sorted(self.out.iterdir()) if self.out.is_dir() else []:
                if path.name in ("checkpoint.pt", CACHE_FOLDER) or path.name.startswith("."):
                    continue
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
                elif path.is_dir():  # a text run's text-model/ (its tokenizer and config), the event files
                    self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        except Exception:
            ending = "FAILED"
            raise
        finally:
            self.client.set_terminated(self.run_id, "FAILED" if self.broken and ending == "FINISHED" else ending)


def check_store_outside_data(names: list[str] | None, data_path: Path) -> None:
    """--log mlflow with no MLFLOW_TRACKING_URI stores its runs, plots among them, in ./mlruns: from inside an image
    folder (`cd photos && thaw train . --out ../run`) that folder would be a class of the next run on it. Refused."""
    if "mlflow" not in (names or ()) or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    if would_be_read(data_path, Path(MLFLOW_FOLDER)):
        raise ThawError(
            f"--log mlflow would store its runs in {Path(MLFLOW_FOLDER).resolve()}, inside the data folder {data_path}, where the "
            "next run on it would read them as images; run thaw from another folder or set MLFLOW_TRACKING_URI"
        )


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else SQLite in ./mlruns; a folder that cannot be made is one line, before any work."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(MLFLOW_FOLDER).resolve()
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise ThawError(
            f"--log mlflow cannot create {folder} ({error.strerror or error}); run from a writable folder or set MLFLOW_TRACKING_URI"
        ) from None
    return f"sqlite:///{folder / 'mlflow.db'}"


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
    """The loggers `--log` asked for, each once; a missing package fails here, before any training
    (closing those already made, so no writer stays open and no MLflow run stays RUNNING)."""
    for name in dict.fromkeys(names):  # every package first: a missing one stops before anything is written
        require(name, name)
    made: list[RunLogger] = []
    try:
        for name in dict.fromkeys(names):
            made.append(TensorBoardLogger(out) if name == "tensorboard" else MLflowLogger(out, params))
    except BaseException:
        close_loggers(made, "FAILED")
        raise
    return made


def close_loggers(loggers: list[RunLogger], ending: str) -> None:
    """Close every logger, even when one fails to: its failure is a warning, the trained run is kept."""
    for logger in loggers:
        try:
            logger.close(ending)
        except Exception as error:  # noqa: BLE001 - the run folder is complete; only the log is short
            line = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"thaw: warning: --log {logger.name} could not finish ({line}); the run folder {logger.out} is complete", file=sys.stderr)


__all__ = ["LOGGERS", "MLflowLogger", "RunLogger", "TensorBoardLogger", "check_store_outside_data", "close_loggers", "make_loggers"]
