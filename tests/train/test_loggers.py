"""--log tensorboard and --log mlflow: read back with the tools' own readers; the weights never change."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import write_class_images
from thaw.cli import main

TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--quiet"]
PLAN = ["--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1"]  # 24 train images: 3 steps per epoch, 6 in all


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("logs") / "colours"
    write_class_images(root / "train", per_class=8, size=32, seed=0)
    write_class_images(root / "val", per_class=4, size=32, seed=1)
    return root


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run twice: plainly, and with both loggers and the report (MLflow in a folder of its own)."""
    root = tmp_path_factory.mktemp("runs")
    plain, logged = root / "plain", root / "logged"
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(plain)]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["train", str(data), *TINY, *PLAN, "--out", str(logged), "--log", "tensorboard", "--log", "mlflow", "--report"]) == 0
    return {"plain": plain, "logged": logged, "root": root}


def test_logging_and_the_report_leave_the_weights_bit_identical(runs: dict[str, Path]) -> None:
    assert (runs["plain"] / "model.safetensors").read_bytes() == (runs["logged"] / "model.safetensors").read_bytes()
    plain = json.loads((runs["plain"] / "thaw.json").read_text())
    logged = json.loads((runs["logged"] / "thaw.json").read_text())
    assert plain["train_config"] == logged["train_config"] and plain["best"] == logged["best"]


def test_tensorboard_events_read_back_with_tensorboards_reader(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["logged"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"step/loss", "step/accuracy", "step/images_per_s", "lr/head", "lr/features.0", "epoch/train_loss", "epoch/val_accuracy"} <= scalars
    assert {"epoch/images_per_s", "epoch/data_wait_share", "epoch/val_loss", "epoch/val_macro_f1", "epoch/train_accuracy"} <= scalars
    assert [event.step for event in events.Scalars("step/loss")] == [1, 2, 3, 4, 5, 6]  # steps counted over both stages
    assert {event.value * 8 for event in events.Scalars("step/accuracy")} <= set(range(9))  # correct of 8 per step
    assert [event.step for event in events.Scalars("lr/features.0")] == [4, 5, 6]  # the body trains in stage 2 only
    history = _metrics_rows(runs["logged"])
    assert [round(e.value, 5) for e in events.Scalars("epoch/val_accuracy")] == [round(float(r["val_accuracy"]), 5) for r in history]
    assert {"val/confusion", "val/top_losses"} <= images
    assert len(events.Images("val/top_losses")) == 2  # one per epoch
    grid = events.Images("val/top_losses")[0]
    assert (grid.width, grid.height) == (8 * 32, 32)  # the 8 worst val images, 32 px each, side by side


def _metrics_rows(run: Path) -> list[dict]:
    import csv

    with open(run / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_mlflow_run_reads_back_with_get_run(runs: dict[str, Path]) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{runs['root'] / 'mlruns' / 'mlflow.db'}")  # no global state: the next test keeps its URI
    found = client.search_runs([client.get_experiment_by_name("thaw").experiment_id])
    assert len(found) == 1
    run = client.get_run(found[0].info.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert params["model"] == "mobilenet_v3_small" and params["config.batch_size"] == "8" and params["plan.strategy"] == "two-phase"
    history = _metrics_rows(runs["logged"])
    assert metrics["epoch.val_accuracy"] == pytest.approx(float(history[-1]["val_accuracy"]))
    assert {"step.loss", "lr.head", "epoch.train_loss", "epoch.images_per_s", "epoch.data_wait_share"} <= set(metrics)
    stored = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"thaw.json", "metrics.csv", "model.safetensors", "report.html", "curves.png"} <= stored and "checkpoint.pt" not in stored


def test_resume_with_log_and_report_is_allowed(runs: dict[str, Path], data: Path, tmp_path: Path) -> None:
    """--log and --report are runtime options: the resume of an interrupted run may add them without contradicting it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import Crash, crash_after
    from thaw.train import TrainConfig, train_images

    run = tmp_path / "run"
    with pytest.raises(Crash):  # the plain run's settings, cut after its first epoch (the head stage)
        train_images(
            data, model="mobilenet_v3_small", weights=None, plan="two-phase", plan_options={"head_epochs": 1, "epochs": 1},
            config=TrainConfig(image_size=32, batch_size=8, quiet=True), out=run, callbacks=[crash_after(1)],
        )
    assert main(["train", "--resume", str(run), "--log", "tensorboard", "--report", "--quiet"]) == 0
    assert (run / "report.html").is_file()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [event.step for event in events.Scalars("step/loss")] == [4, 5, 6]  # the steps the resume trained, counted from the run's start
    assert (run / "model.safetensors").read_bytes() == (runs["plain"] / "model.safetensors").read_bytes()


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_missing_package_is_one_line_naming_the_extra(
    backend: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if it were not installed
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    both = ["--log", "tensorboard", "--log", "mlflow"]  # the other one is installed: it must not start either
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(tmp_path / "run"), *both]) == 2
    error = capfd.readouterr().err.strip()
    assert error == f"thaw: error: --log {backend} needs the {backend} package: pip install 'thaw[{backend}]'"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "mlruns").exists()


def test_a_resumed_run_continues_the_step_count(data: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import Crash, crash_after
    from thaw.train import TrainConfig, resume_run, train_images
    from thaw.train.loggers import TensorBoardLogger

    run, config = tmp_path / "run", TrainConfig(batch_size=8, image_size=32, quiet=True)
    first = TensorBoardLogger(run)
    with pytest.raises(Crash):
        train_images(data, model="mobilenet_v3_small", weights=None, out=run, config=config, plan="two-phase",
                     plan_options={"head_epochs": 1, "epochs": 1}, step_hooks=[first], callbacks=[first.epoch, crash_after(1)])
    first.close()
    second = TensorBoardLogger(run)
    resume_run(run, step_hooks=[second], callbacks=[second.epoch], quiet=True)
    second.close()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert sorted(event.step for event in events.Scalars("step/loss")) == [1, 2, 3, 4, 5, 6]


def test_steps_logged_again_after_a_kill_inside_an_epoch_replace_the_first_copies(data: Path, tmp_path: Path) -> None:
    """Killed after step 2 of the first epoch (no checkpoint yet): the resumed run logs steps 1 and 2 again,
    and TensorBoard's reader sees each step once, from the run that went on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import Crash
    from thaw.train import TrainConfig, train_images
    from thaw.train.loggers import TensorBoardLogger

    def killed_at_step_two(_optimizer: object, step: int, _factor: float) -> None:
        if step == 1:  # the stage's second step (0-based), logged by the hook before this one
            raise Crash

    run, config = tmp_path / "run", TrainConfig(batch_size=8, image_size=32, quiet=True)
    first = TensorBoardLogger(run)
    with pytest.raises(Crash):
        train_images(data, model="mobilenet_v3_small", weights=None, out=run, config=config, plan="two-phase",
                     plan_options={"head_epochs": 1, "epochs": 1}, step_hooks=[first, killed_at_step_two], callbacks=[first.epoch])
    first.close()
    second = TensorBoardLogger(run)
    train_images(data, model="mobilenet_v3_small", weights=None, out=run, config=config, plan="two-phase",
                 plan_options={"head_epochs": 1, "epochs": 1}, step_hooks=[second], callbacks=[second.epoch], resume=True)
    second.close()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [event.step for event in events.Scalars("step/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_text_run_logs_its_worst_texts_and_mlflow_follows_the_tracking_uri(
    tiny_encoder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import write_text_table

    table, run, store = write_text_table(tmp_path / "t.tsv", rows_per_class=20), tmp_path / "run", tmp_path / "elsewhere.db"
    # Chat far longer than offers: the val loader sorts texts by length, so it scores the offers (class 1) first,
    # unlike the split, which lists class 0 (ham) first.
    lines = [line.split("\t") for line in table.read_text().splitlines()]
    table.write_text("\n".join(f"{label}\t{text}{' and more' * 6 * (label == 'ham')}" for label, text in lines) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    args = ["train", str(table), "--task", "text", "--model", str(tiny_encoder), "--strategy", "feature-extract", "--epochs", "1",
            "--batch-size", "8", "--out", str(run), "--quiet", "--log", "tensorboard", "--log", "mlflow"]
    assert main(args) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    worst = events.Tensors("val/top_losses/text_summary")[0].tensor_proto.string_val[0].decode()
    assert worst.startswith("| label | text |") and "true " in worst and "loss " in worst
    # Each text beside its own caption: the val loader groups texts by length, so table order is not scored order.
    labels = dict(reversed(line.split("\t", 1)) for line in table.read_text().splitlines())
    rows = [line.split(" | ") for line in worst.splitlines()[2:]]
    assert rows and all(caption.startswith(f"| true {labels[text.rstrip(' |')]},") for caption, text in rows)
    assert store.is_file() and not (tmp_path / "mlruns" / "mlflow.db").exists()  # the URI, not the default
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (found,) = client.search_runs([client.get_experiment_by_name("thaw").experiment_id])
    stored = {item.path for item in client.list_artifacts(found.info.run_id, "text-model")}
    assert "text-model/config.json" in stored  # the tokenizer and config a text model needs to load again


def test_a_logger_that_fails_mid_run_warns_once_and_the_training_goes_on(
    runs: dict[str, Path], data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from thaw.train.loggers import TensorBoardLogger

    def full_disk(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardLogger, "log_step", full_disk)
    monkeypatch.setattr(TensorBoardLogger, "close", full_disk)
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(run), "--log", "tensorboard"]) == 0
    assert (run / "model.safetensors").read_bytes() == (runs["plain"] / "model.safetensors").read_bytes()
    why = "OSError: [Errno 28] No space left on device"
    assert capfd.readouterr().err.strip().splitlines() == [
        f"thaw: warning: --log tensorboard stopped logging ({why}); the training goes on",
        f"thaw: warning: --log tensorboard could not finish ({why}); the run folder {run} is complete",
    ]


def test_mlflow_where_it_cannot_write_is_one_line_before_any_work(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").write_text("a file where the store would go")
    capfd.readouterr()
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(tmp_path / "run"), "--log", "mlflow"]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith(f"thaw: error: --log mlflow cannot create {tmp_path / 'mlruns'} (") and "\n" not in error
    assert error.endswith("; run from a writable folder or set MLFLOW_TRACKING_URI")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_mlflow_store_inside_the_image_folder_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`cd photos && thaw train . --log mlflow`: ./mlruns, with the run's plots in it, would be a class of the next run."""
    write_class_images(tmp_path / "photos", per_class=4, size=16)
    monkeypatch.chdir(tmp_path / "photos")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = sorted(path.name for path in (tmp_path / "photos").iterdir())
    capfd.readouterr()
    assert main(["train", ".", *TINY, *PLAN, "--out", str(tmp_path / "run"), "--log", "mlflow"]) == 2
    error = capfd.readouterr().err.strip()
    assert error == (
        f"thaw: error: --log mlflow would store its runs in {tmp_path / 'photos' / 'mlruns'}, inside the data folder ., where the next "
        "run on it would read them as images; run thaw from another folder or set MLFLOW_TRACKING_URI"
    )
    assert sorted(path.name for path in (tmp_path / "photos").iterdir()) == before and not (tmp_path / "run").exists()


def test_ctrl_c_ends_the_mlflow_run_as_killed_and_the_run_resumes(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped by the user is not a failure: MLflow's KILLED, and the checkpoint resumes to the end."""
    import os
    import signal

    import mlflow

    from thaw.train.loggers import MLflowLogger

    log_step = MLflowLogger.log_step

    def ctrl_c_at_step_two(self: MLflowLogger, step: int, scalars: dict[str, float]) -> None:
        log_step(self, step, scalars)
        if step == 2 and "step/loss" in scalars:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: the trainer finishes the step and saves

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(MLflowLogger, "log_step", ctrl_c_at_step_two)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(run), "--log", "mlflow"]) == 130
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("thaw").experiment_id])
    assert [found_run.info.status for found_run in found] == ["KILLED"]
    monkeypatch.setattr(MLflowLogger, "log_step", log_step)
    assert main(["train", "--resume", str(run), "--log", "mlflow", "--quiet"]) == 0
    statuses = sorted(found_run.info.status for found_run in client.search_runs([client.get_experiment_by_name("thaw").experiment_id]))
    assert statuses == ["FINISHED", "KILLED"]


def test_a_tracking_uri_mlflow_cannot_use_is_one_line_before_any_work(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    capfd.readouterr()
    assert main(["train", str(data), *TINY, *PLAN, "--out", str(tmp_path / "run"), "--log", "mlflow"]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith("thaw: error: --log mlflow cannot use the tracking URI bogus://nowhere (") and "\n" not in error
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
