"""thaw train, evaluate, predict, export, lr-find and demo as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli.test_cli import thaw, thaw_process
from tests.conftest import write_class_images
from thaw import ThawError, build_plan
from thaw.errors import WriteError
from thaw.plan import plan_to_dict
from thaw.cli import main

TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture
def trained_run(tiny_split_data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    code = main(["train", str(tiny_split_data), *TINY, "--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_train_json_is_one_line_with_the_documented_keys(tiny_split_data: Path, tmp_path: Path) -> None:
    # a real process: nothing else may reach stdout, from C code or a DataLoader worker either
    result = thaw_process("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(tmp_path / "r"), "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == {"val_accuracy", "best_epoch", "why", "wall_s", "decode_s", "images_per_s", "skipped_files", "out"}
    assert summary["why"].startswith("highest val accuracy ")
    assert summary["best_epoch"] == 1 and summary["out"] == str(tmp_path / "r") and summary["skipped_files"] == 0
    assert summary["decode_s"] == 0  # feature extraction reads each image once: nothing is decoded ahead


def test_evaluate_predict_and_export(trained_run: Path, tiny_split_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(trained_run), str(tiny_split_data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 18 and len(metrics["per_class_accuracy"]) == 3
    assert sum(map(sum, metrics["confusion"])) == 18 and Path(metrics["confusion_png"]).is_file()

    assert main(["predict", str(trained_run), str(tiny_split_data / "val" / "red"), "--top-k", "2", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert len(predictions) == 6
    for entry in predictions:
        assert len(entry["predictions"]) == 2 and {p["label"] for p in entry["predictions"]} <= {"red", "green", "blue"}
        assert entry["predictions"][0]["probability"] >= entry["predictions"][1]["probability"]

    for fmt, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        assert main(["export", str(trained_run), "--format", fmt]) == 0
        assert (trained_run / name).is_file()
        assert "outputs match PyTorch within" in capsys.readouterr().out
    # The .onnx file alone is the model: copied elsewhere without anything beside it, it runs
    assert not (trained_run / "model.onnx.data").exists()
    alone = trained_run.parent / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes((trained_run / "model.onnx").read_bytes())
    import onnxruntime

    session = onnxruntime.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.zeros(1, 3, 32, 32).numpy()})[0].shape == (1, 3)
    # ... and says which output is which class and how its input is prepared, as the run recorded them.
    meta = json.loads((trained_run / "thaw.json").read_text())
    carried = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    assert carried["thaw.classes"] == meta["classes"] == ["blue", "green", "red"]
    assert carried["thaw.preprocessing"] == meta["preprocessing"] and carried["thaw.preprocessing"]["crop_size"] == 32
    assert carried["thaw.task"] == "image" and carried["thaw.model"] == meta["model"]
    assert carried["thaw.input"].startswith("images: float32, N x 3 x H x W, RGB scaled to 0-1")
    extra = {"thaw.json": ""}
    torch.jit.load(str(trained_run / "model.pt"), _extra_files=extra)
    described = json.loads(extra["thaw.json"])
    assert described["classes"] == meta["classes"] and described["preprocessing"] == meta["preprocessing"]



def test_an_onnx_export_whose_weights_torch_puts_beside_it_names_both_files(
    trained_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch writes PATH.data past its own size limit (about 1.5 GB, too large to test here): the line names it, and
    an earlier export's PATH.data is removed, so a file beside the model is always this export's; a NAME.data beside
    no earlier export NAME may be anyone's, and is left alone."""
    assert main(["export", str(trained_run), "--format", "onnx"]) == 0  # the earlier export
    weights = trained_run / "model.onnx.data"
    weights.write_bytes(b"an earlier export's weights")
    assert main(["export", str(trained_run), "--format", "onnx"]) == 0
    assert not weights.exists() and "and its weights" not in capsys.readouterr().out
    precious = trained_run.parent / "results.data"
    precious.write_bytes(b"the user's own results")
    assert main(["export", str(trained_run), "--format", "onnx", "--output", str(trained_run.parent / "results")]) == 0
    assert precious.read_bytes() == b"the user's own results"
    capsys.readouterr()
    real_export = torch.onnx.export

    def export_with_weights_beside(model, example, path, **kwargs):
        real_export(model, example, path, **kwargs)
        Path(f"{path}.data").write_bytes(b"as torch writes them for a large model")  # where torch was told to write

    monkeypatch.setattr(torch.onnx, "export", export_with_weights_beside)
    assert main(["export", str(trained_run), "--format", "onnx"]) == 0
    assert f"wrote {trained_run / 'model.onnx'} and its weights {weights}" in capsys.readouterr().out
    assert weights.read_bytes() == b"as torch writes them for a large model"  # moved beside the model with it


def test_an_onnx_export_with_its_weights_beside_it_still_carries_the_runs_description(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's own limit lowered to 0: the weights go to PATH.data as for a model past 1.5 GB; the description is
    added without loading them, and the two files, moved elsewhere together, still load and say the classes."""
    import onnxruntime
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)
    assert main(["export", str(trained_run), "--format", "onnx", "--output", str(tmp_path / "big" / "model.onnx")]) == 0
    assert "and its weights" in capsys.readouterr().out
    moved = tmp_path / "moved"
    (tmp_path / "big").rename(moved)
    session = onnxruntime.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["thaw.classes"]) == ["blue", "green", "red"]
    assert session.run(None, {"images": torch.zeros(1, 3, 32, 32).numpy()})[0].shape == (1, 3)


def test_evaluate_counts_and_warns_of_the_unreadable_files_of_the_split_it_scores(
    trained_run: Path, tiny_split_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_split_data / "train" / "red" / "cut.jpg").write_bytes(b"")  # in train/: not what `evaluate` scores
    assert main(["evaluate", str(trained_run), str(tiny_split_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_files"] == 0
    (tiny_split_data / "val" / "blue" / "deeper").mkdir()  # class folders are read at any depth
    (tiny_split_data / "val" / "blue" / "deeper" / "notes.jpg").write_text("not an image")
    assert main(["evaluate", str(trained_run), str(tiny_split_data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_files"] == 1
    assert main(["evaluate", str(trained_run), str(tiny_split_data)]) == 0
    notes = tiny_split_data / "val" / "blue" / "deeper" / "notes.jpg"
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"thaw: warning: skipped 1 unreadable file(s): {notes} (") and said.endswith(" (in what was scored)")
    assert main(["report", str(trained_run), str(tiny_split_data), "--output", str(trained_run.parent / "page.html")]) == 0
    said = capsys.readouterr().err.strip()  # the page counted them; the command said nothing
    assert said.startswith(f"thaw: warning: skipped 1 unreadable file(s): {notes} (") and said.endswith(" (in what was scored)")


def test_evaluate_in_a_run_folder_it_cannot_write_still_prints_the_scores(
    trained_run: Path, tiny_split_data: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only run folder (a shared model): the picture and the report are extras, the scores are what was asked."""
    import thaw.cli.use_cmds as use_cmds

    def read_only(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(use_cmds, "plot_confusion", read_only)
    assert main(["evaluate", str(trained_run), str(tiny_split_data)]) == 0
    said = capsys.readouterr()
    assert said.out.startswith("val: 18 images") and "confusion matrix:" not in said.out
    assert said.err.strip() == f"thaw: warning: could not write the confusion matrix {trained_run / 'confusion-val.png'} (Permission denied); the scores follow"
    monkeypatch.setattr(use_cmds, "save_report", lambda *_args, **_kwargs: (_ for _ in ()).throw(WriteError("could not write RUN/report.html: Permission denied")))
    assert main(["evaluate", str(trained_run), str(tiny_split_data), "--report", "--json"]) == 1
    said = capsys.readouterr()
    assert json.loads(said.out)["confusion_png"] is None and "thaw: error: could not write RUN/report.html: Permission denied; write the page elsewhere: thaw report " in said.err


def test_evaluate_scores_a_folder_without_split_folders_whole(
    trained_run: Path, tiny_split_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's own held-out folder of class folders: every image counts, not a 20% share of it."""
    held_out = tiny_split_data / "val"  # 3 classes x 6 images, no split folders
    assert main(["evaluate", str(trained_run), str(held_out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "all" and metrics["count"] == 18 and sum(map(sum, metrics["confusion"])) == 18
    assert main(["evaluate", str(trained_run), str(held_out)]) == 0
    assert capsys.readouterr().out.startswith(f"all: 18 images (every readable one in {held_out}), accuracy ")
    # Naming a split reproduces the run's own split of such a folder: 20% per class, seed 0.
    assert main(["evaluate", str(trained_run), str(held_out), "--split", "val", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "val" and metrics["count"] == 3


def test_evaluate_and_report_warn_when_the_data_scored_whole_is_the_runs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`thaw evaluate RUN photos` on the class folders it trained on scored the training images too, without a word."""
    photos, run = tmp_path / "photos", tmp_path / "run"
    write_class_images(photos, per_class=6, size=16)
    write_class_images(tmp_path / "held-out", per_class=2, size=16, seed=7)
    assert main(["train", str(photos), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    warning = (
        "thaw: warning: {data} is the data this run trained on, scored whole: its training images are among those scored, "
        "so the accuracy is no held-out figure; pass held-out data, or omit DATA to score the run's val split (which the data "
        "as the run trained on rebuilds)"
    )
    monkeypatch.chdir(tmp_path)
    for data in (str(photos), "./photos/"):  # the same place, however it is written
        assert main(["evaluate", str(run), data]) == 0
        said = capsys.readouterr()
        assert said.err.strip() == warning.format(data=data) and said.out.startswith("all: 18 images")
    assert main(["report", str(run), "photos", "--output", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().err.strip() == warning.format(data="photos")
    for argv in ([str(run)], [str(run), "photos", "--split", "val"], [str(run), "held-out"]):  # held out: no warning
        assert main(["evaluate", *argv]) == 0
        assert capsys.readouterr().err == ""


def test_the_training_data_warning_names_a_text_runs_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from thaw.cli.use_cmds import warn_if_training_data

    table = tmp_path / "sms.tsv"
    table.write_text("text\tlabel\n")
    warn_if_training_data({"task": "text", "data": {"path": str(table)}}, str(table), "all")
    assert "its training rows are among those scored" in capsys.readouterr().err
    warn_if_training_data({"task": "text", "data": {"path": str(table)}}, str(table), "test")  # the run's own test share
    assert capsys.readouterr().err == ""


def test_evaluate_on_other_data_keeps_the_runs_own_confusion_picture(
    trained_run: Path, tiny_split_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scoring another folder with the run's split name wrote over the run's confusion-val.png."""
    def picture(*argv: str) -> Path:
        assert main(["evaluate", str(trained_run), *argv, "--json"]) == 0
        return Path(json.loads(capsys.readouterr().out)["confusion_png"])

    own, own_tta = picture(), picture("--tta")  # the run's own data, as recorded
    assert (own, own_tta) == (trained_run / "confusion-val.png", trained_run / "confusion-val-tta.png")
    before = (own.read_bytes(), own_tta.read_bytes())
    other = tmp_path / "field photos"  # a user's own held-out folder; its name made safe for a file name
    write_class_images(other / "train", per_class=10, seed=3)
    write_class_images(other / "val", per_class=4, seed=4)
    assert picture(str(other), "--split", "val") == trained_run / "confusion-val--field_photos.png"
    # Names that spelled another picture's name, or lost what set them apart: a folder `tta`, dotted and other scripts.
    named = {name: tmp_path / name for name in ("tta", "set.v1", "set.v2", "фото", "写真")}
    for folder in named.values():
        write_class_images(folder, per_class=2, seed=5)
    written = {name: picture(str(folder)) for name, folder in named.items()}  # class folders: scored whole
    assert written == {name: trained_run / f"confusion-all--{name}.png" for name in named}
    assert picture(str(other / "val"), "--tta") == trained_run / "confusion-all-tta--val.png"
    assert (own.read_bytes(), own_tta.read_bytes()) == before
    monkeypatch.chdir(tiny_split_data.parent)  # the run's own data, named relatively: its own picture
    assert picture(f"./{tiny_split_data.name}/") == own


def test_train_and_test_folders_without_val_train_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pets"
    write_class_images(data / "train", per_class=10)
    write_class_images(data / "test", per_class=4, seed=1)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    recorded = json.loads((run / "thaw.json").read_text())["data"]
    assert recorded["layout"] == "split folders (train/test), 20% of train held out as val (seed 0)"
    assert (recorded["train"], recorded["val"], recorded["test"]) == (24, 6, 12)
    capsys.readouterr()
    assert main(["evaluate", str(run), str(data), "--json"]) == 0  # split folders: val by default, held out as in training
    assert json.loads(capsys.readouterr().out)["count"] == 6
    assert main(["evaluate", str(run), str(data), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["count"] == 12


def test_lr_find_suggests_an_lr_and_plots(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "lr.png"
    args = ["lr-find", str(tiny_split_data / "train"), "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
            "--steps", "30", "--batch-size", "8", "--start", "1e-5"]
    assert main([*args, "--out", str(plot), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lrs"][0] < report["suggested_lr"] < report["lrs"][-1]
    assert report["lrs"] == sorted(report["lrs"]) and plot.is_file()


def test_lr_find_on_a_loss_that_does_not_fall_suggests_nothing(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A random mobilenet_v3_small gives every image the same features: the head learns nothing, and the steepest
    step of a flat curve was noise, suggested as an lr."""
    plot = tmp_path / "lr.png"
    args = ["lr-find", str(tiny_split_data / "train"), "--model", "mobilenet_v3_small", "--weights", "none", "--steps", "20", "--batch-size", "8"]
    assert main([*args, "--out", str(plot)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("no lr suggested: the loss did not fall over the range (from ") and plot.is_file()
    assert main([*args, "--out", str(plot), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["suggested_lr"] is None


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda data, tmp: ["train", str(tmp / "nothing")], "does not exist"),
        (lambda data, tmp: ["train", str(data), "--out", "/etc/hostname/run"], "is not writable"),
        (lambda data, tmp: ["evaluate", str(tmp), str(data)], "not a thaw run folder"),
        (lambda data, tmp: ["train", str(data), "--strategy", "feature-extract", "--lr", "nan"], "positive finite"),
    ],
)
def test_bad_input_is_one_line(tiny_split_data: Path, tmp_path: Path, make_args, expected: str) -> None:
    args = make_args(tiny_split_data, tmp_path)
    if args[0] == "train":
        args += TINY + ["--epochs", "1", "--head-epochs", "1"]
        if "--out" not in args:
            args += ["--out", str(tmp_path / "run")]
    result = thaw(*args)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()  # a run refused before its first epoch leaves no folder behind


def test_a_refused_run_removes_only_what_it_created(tiny_split_data: Path, tmp_path: Path) -> None:
    kept = tmp_path / "runs" / "mine"
    (kept / "notes.txt").parent.mkdir(parents=True)
    (kept / "notes.txt").write_text("the user's")
    result = thaw("train", str(tmp_path / "nothing"), *TINY, "--out", str(kept / "a" / "b"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a/ and a/b/ were made by the run and are gone
    result = thaw("train", str(tmp_path / "nothing"), *TINY, "--out", str(kept))
    assert result.returncode == 2 and (kept / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_demo_runs_offline_and_reports_both_strategies(tmp_path: Path, torch_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for attempt in range(2):  # the README's first command, typed again: the demo replaces its own runs
        assert main(["demo", "--out", str(tmp_path / "demo"), "--json"]) == 0
        rows = {row["strategy"]: row for row in json.loads(capsys.readouterr().out)}
        assert set(rows) == {"feature-extract", "two-phase"}
        assert rows["feature-extract"]["trainable_share"] < 0.01 and rows["two-phase"]["trainable_share"] == 1.0
        for row in rows.values():
            assert row["test_accuracy"] > 0.8  # real ImageNet features on real digits
            assert (Path(row["out"]) / "curves.png").is_file() and (Path(row["out"]) / "confusion.png").is_file()


def _run_files(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}


def test_text_options_on_an_image_run_are_refused_not_ignored(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--test-split on image data held no test set out, without a word; --pooling and the column options did nothing."""
    typed = ["--test-split", "0.2", "--pooling", "cls", "--delimiter", ";"]
    assert main(["train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", *typed, "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (
        "thaw: error: --delimiter, --pooling, --test-split: text options, and this is an image run (--task text for a text table); drop them"
    )
    assert not (tmp_path / "run").exists()


def test_an_image_file_name_that_is_not_utf8_trains_and_reports(tiny_split_data: Path, tmp_path: Path) -> None:
    """An old zip's Latin-1 'caf\\xe9.png' crashed the run's data digest and then its report (tracebacks)."""
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_split_data, data)
    for split in ("train", "val"):  # val's is in the report's gallery of top losses
        first = sorted((data / split / "red").iterdir())[0]
        os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.png")
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(run), "--quiet", "--report"]) == 0
    assert (run / "report.html").is_file() and json.loads((run / "thaw.json").read_text())["classes"] == ["blue", "green", "red"]


def test_the_demo_never_replaces_a_run_of_the_users(trained_run: Path, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`thaw train DATA --out runs/two-phase`, then `thaw demo --out runs`: the demo replaced that run without a word."""
    import shutil

    mine = tmp_path / "runs" / "two-phase"
    shutil.copytree(trained_run, mine)
    before = _run_files(mine)
    assert main(["demo", "--out", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"thaw: error: {mine} holds a run that is not this demo's (it trained on {tiny_split_data.resolve()}); "
        "the demo replaces only the runs it made in this folder: choose another --out"
    )
    assert _run_files(mine) == before and not (tmp_path / "runs" / "digits").exists()  # refused before any work


def test_the_demo_never_writes_into_class_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`thaw demo --out photos` among class folders: the next `thaw train photos` read digits/ and the runs as classes."""
    photos = tmp_path / "photos"
    write_class_images(photos, per_class=2, size=8)
    (photos / "red" / "notes").mkdir()  # a folder inside a class folder does not make it a data root
    (photos / "labels").mkdir()  # nor does a folder without images beside the classes stop them being classes
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    assert main(["demo", "--out", str(photos)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"thaw: error: --out {photos} holds class folders of images (blue/, green/, red/): thaw train on it would read "
        "the demo's folders as classes; choose another --out"
    )
    for inside, out in [(photos / "red", "."), (tmp_path, "photos/red/notes/demo"), (photos / "red" / "notes", "../../red/x")]:
        monkeypatch.chdir(inside)
        assert main(["demo", "--out", out]) == 2
        assert capsys.readouterr().err.strip() == (
            f"thaw: error: --out {out} is in the class folder red/ of the images in {photos}: thaw train on them "
            "would read the demo's digits as images of red; choose another --out"
        )
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before  # refused before anything was written


def test_the_demo_may_write_beside_runs_and_pictures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs hold plots straight in them; a home holds Desktop/ and Pictures/ with images among its other folders;
    a folder of projects each with a logo is no data, and the working folder's surroundings are never looked at."""
    from thaw.demo import check_not_in_class_folders

    for name in ("run-a", "run-b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "thaw.json").write_text("{}")
        (tmp_path / "runs" / name / "curves.png").write_bytes(b"a plot")
    home = tmp_path / "home"
    write_class_images(home, per_class=1, size=8, classes=("Desktop", "Pictures"))
    for name in ("Documents", "Music", "Videos"):
        (home / name).mkdir()
    write_class_images(tmp_path / "work", per_class=1, size=8, classes=("projA", "projB"))  # lr_find.png, a logo
    for out in (tmp_path / "runs", home, home / "Desktop" / "demo", tmp_path / "new"):
        check_not_in_class_folders(out)  # no refusal
    monkeypatch.chdir(tmp_path / "work" / "projA")
    for out in ("runs/demo", "./runs/demo", str(Path.cwd() / "runs" / "demo"), "../projA/runs/demo"):
        check_not_in_class_folders(Path(out))  # the README's first command in a project beside another, however typed
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ThawError, match=r"^--out .*loop/demo cannot be followed \(a loop of links"):
        check_not_in_class_folders(tmp_path / "loop" / "demo")


@pytest.mark.parametrize("where", ["the run", "set aside"])
def test_the_demo_takes_its_own_run_back_even_after_a_kill_mid_replacement(tmp_path: Path, where: str) -> None:
    """A demo killed while it replaced its run (before the new run's first checkpoint) leaves the old run in
    .replaced-run/; the next demo refused it as a user's run, so the README's first command could not run again."""
    from thaw.demo import check_demo_run_folder
    from thaw.train.run_folder import METADATA, SET_ASIDE

    run, digits = tmp_path / "runs" / "two-phase", tmp_path / "runs" / "digits"
    record = run / SET_ASIDE if where == "set aside" else run
    record.mkdir(parents=True)
    (record / METADATA).write_text(json.dumps({"data_path": str(digits.resolve())}))
    check_demo_run_folder(run, digits)  # the demo's own: taken back, no refusal
    (record / METADATA).write_text(json.dumps({"data_path": str(tmp_path / "my-photos")}))
    with pytest.raises(ThawError, match=r"two-phase holds a run that is not this demo's \(it trained on .*my-photos\)"):
        check_demo_run_folder(run, digits)


def test_the_demo_scores_only_its_own_digits(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A digits/ folder holding other images (or a demo stopped while writing it) was scored as the 1,797 digits."""
    import shutil

    shutil.copytree(tiny_split_data, tmp_path / "runs" / "digits")
    shutil.copytree(tiny_split_data / "val", tmp_path / "runs" / "digits" / "test")
    assert main(["demo", "--out", str(tmp_path / "runs")]) == 2
    assert f"{tmp_path / 'runs' / 'digits'} holds files that are not the demo's digits" in capsys.readouterr().err


def test_a_new_run_never_overwrites_another_without_being_told(trained_run: Path, tiny_split_data: Path) -> None:
    (trained_run / "model.onnx").write_bytes(b"an export of the old run's weights")
    before = _run_files(trained_run)
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(trained_run))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{trained_run} holds a run already; continue it with --resume {trained_run}" in result.stderr
    assert "--overwrite" in result.stderr
    assert _run_files(trained_run) == before  # every file of the old run as it was, its typed options included


def test_a_folder_with_only_a_checkpoint_is_a_run_too(trained_run: Path, tiny_split_data: Path) -> None:
    (trained_run / "thaw.json").unlink()  # a run killed before it finished: its checkpoint is what --resume needs
    checkpoint = (trained_run / "checkpoint.pt").read_bytes()
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(trained_run))
    assert result.returncode == 2 and "holds a run already" in result.stderr
    assert (trained_run / "checkpoint.pt").read_bytes() == checkpoint


def test_an_overwrite_refused_before_training_leaves_the_old_run(trained_run: Path, tiny_split_data: Path) -> None:
    # The device is checked as the trainer is built, after the data is read: the old run must outlive that refusal.
    before = _run_files(trained_run)
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1",
                  "--out", str(trained_run), "--overwrite", "--device", "cuda:7")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert _run_files(trained_run) == before


def test_an_overwrite_that_fails_before_its_first_checkpoint_gives_the_old_run_back(trained_run: Path, tiny_split_data: Path) -> None:
    """A failure in the first epoch (out of memory, a NaN loss): the new run has nothing to resume, so the run it was
    to replace is put back as it was. (Ctrl-C saves a checkpoint of the new run first: that one is kept.)"""
    from thaw.train import TrainConfig, train_images

    (trained_run / "model.onnx").write_bytes(b"an export of the old run's weights")
    before = _run_files(trained_run)

    def out_of_memory(*_args: object) -> None:
        assert not (trained_run / "model.safetensors").exists()  # set aside while the new run trains
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, plan="feature-extract", plan_options={"epochs": 1},
                     config=TrainConfig(quiet=True, image_size=32, batch_size=8, seed=1), out=trained_run, overwrite=True,
                     step_hooks=[out_of_memory])
    assert _run_files(trained_run) == before
    assert sorted(path.name for path in trained_run.iterdir()) == sorted(before)  # nothing set aside is left behind


def test_a_replacement_killed_before_its_first_checkpoint_still_holds_the_old_run(trained_run: Path, tiny_split_data: Path) -> None:
    from thaw.train.run_folder import SET_ASIDE, set_aside_run

    weights = (trained_run / "model.safetensors").read_bytes()
    set_aside_run(trained_run)  # as a replacement does as it begins to train; kill -9 leaves it so
    (trained_run / "command.json").write_text("{}")  # what the killed replacement had written
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(trained_run))
    assert result.returncode == 2 and "holds a run set aside by a replacement that stopped" in result.stderr
    assert f"move the files in {SET_ASIDE} back" in result.stderr
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--resume", str(trained_run))
    assert result.returncode == 2 and "holds a run set aside" in result.stderr  # no checkpoint: a resume would start anew
    result = thaw("train", "--resume", str(trained_run))  # the resume alone said "holds no checkpoint of a run"
    assert result.returncode == 2 and "holds a run set aside by a replacement that stopped" in result.stderr, result.stderr
    assert (trained_run / SET_ASIDE / "model.safetensors").read_bytes() == weights
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--seed", "1",
                  "--out", str(trained_run), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (trained_run / SET_ASIDE).exists() and (trained_run / "model.safetensors").read_bytes() != weights


def test_overwrite_replaces_the_old_run_and_leaves_the_users_files(trained_run: Path, tiny_split_data: Path) -> None:
    stale = ["model.onnx", "model.onnx.data", "model.pt", "report.html", "report--other.html", "confusion-val.png", "adapter.safetensors"]
    for name in stale:
        (trained_run / name).write_bytes(b"made from the old run")
    (trained_run / "tensorboard").mkdir()
    (trained_run / "text-model").mkdir()
    (trained_run / "lr_find.png").write_bytes(b"the user's plot, for the next report")
    old_weights = (trained_run / "model.safetensors").read_bytes()
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--seed", "1",
                  "--out", str(trained_run), "--overwrite", "--json")
    assert result.returncode == 0, result.stderr
    assert not any((trained_run / name).exists() for name in [*stale, "tensorboard", "text-model"])
    assert (trained_run / "lr_find.png").read_bytes() == b"the user's plot, for the next report"
    assert not (trained_run / ".replaced-run").exists()  # the old run goes for good once the new one has a checkpoint
    assert (trained_run / "model.safetensors").read_bytes() != old_weights
    assert json.loads((trained_run / "thaw.json").read_text())["plan"]["stages"][0]["name"] == "head"
    assert len(json.loads((trained_run / "thaw.json").read_text())["plan"]["stages"]) == 1  # the new run's plan


def test_overwrite_and_resume_together_are_refused(trained_run: Path) -> None:
    result = thaw("train", "--resume", str(trained_run), "--overwrite")
    assert result.returncode == 2 and "--overwrite starts a new run and --resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_python_api_refuses_a_run_folder_too(trained_run: Path, tiny_split_data: Path) -> None:
    from thaw.train import TrainConfig, train_images

    weights = (trained_run / "model.safetensors").read_bytes()
    options = {"model": "mobilenet_v3_small", "weights": None, "plan": "feature-extract", "plan_options": {"epochs": 1}}
    config = TrainConfig(quiet=True, image_size=32, batch_size=8)
    with pytest.raises(ThawError, match="holds a run already.*overwrite=True"):
        train_images(tiny_split_data, out=trained_run, config=config, **options)
    assert (trained_run / "model.safetensors").read_bytes() == weights
    result = train_images(tiny_split_data, out=trained_run, config=replace(config, seed=1), overwrite=True, **options)
    assert result.best["epoch"] == 1 and (trained_run / "model.safetensors").read_bytes() != weights
    # the CLI's record of the old run's typed options went too: a resume must not read them as this run's
    assert not (trained_run / "command.json").exists()


@pytest.mark.parametrize(
    "argv, strategy, stages",
    [
        (["photos", "--model", "mobilenet_v2"], "head-top-all", ["head", "top2", "all"]),
        # --budget times the top stage over cached inputs, as it runs
        (["photos", "--model", "mobilenet_v2", "--budget", "3m"], "head-top-all", ["head", "top2", "all"]),
        (["photos", "--model", "mobilenet_v2", "--strategy", "two-phase"], "two-phase", ["head", "all"]),
        (["sms.tsv", "--model", "hf/sentence-transformers/all-MiniLM-L6-v2"], "two-phase", ["head", "all"]),  # text: head-top-all unmeasured
    ],
)
def test_the_default_strategy_is_head_top_all_for_images_budget_or_not_and_two_phase_for_text(
    argv: list[str], strategy: str, stages: list[str],
) -> None:
    from thaw.cli import build_parser
    from thaw.cli.options import chosen_strategy, plan_from_args
    from thaw.cli.train_cmd import _out_folder, _plan_options

    args = build_parser().parse_args(["train", *argv])
    assert chosen_strategy(args) == strategy
    assert [stage.name for stage in plan_from_args(args, num_groups=20).stages] == stages
    assert _out_folder(args).name.endswith(f"-{strategy}")
    # what the run folder's command.json (read back by a resume with typed plan options) and MLflow record
    assert _plan_options(args)["strategy"] == strategy


def test_the_python_api_trains_images_by_head_top_all_by_default(tiny_split_data: Path, tmp_path: Path) -> None:
    from thaw.train import TrainConfig, train_images

    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, out=tmp_path / "run",
                          config=TrainConfig(image_size=32, batch_size=8, quiet=True))
    assert [row["stage"] for row in result.history] == ["head"] * 3 + ["top2"] * 3 + ["all"] * 3


def test_a_deeper_top_stage_from_the_python_api_trains_over_cached_inputs(tiny_split_data: Path, tmp_path: Path) -> None:
    from thaw.train import TrainConfig, train_images

    result = train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, out=tmp_path / "run",
                          plan_options={"top_groups": 5, "head_epochs": 1, "epochs": 1},
                          config=TrainConfig(image_size=32, batch_size=8, quiet=True))
    assert [(row["stage"], row["cached"]) for row in result.history] == [("head", True), ("top5", True), ("all", False)]


def test_a_typed_strategy_on_a_resume_of_a_top_groups_run_is_compared_not_blamed_on_top_groups(tmp_path: Path) -> None:
    """The run recorded --top-groups 10; `--resume RUN --strategy two-phase` claims two-phase's plan (which the
    resume then refuses as a contradiction), not an error about a --top-groups the user never typed."""
    from thaw.cli import build_parser
    from thaw.cli.train_cmd import COMMAND, _claimed

    (tmp_path / COMMAND).write_text(json.dumps({"plan_options": {"strategy": "head-top-all", "top_groups": 10}}))
    settings = {"config": {}, "model": "mobilenet_v2", "task": "image"}
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--strategy", "two-phase"])
    assert [stage["name"] for stage in _claimed(args, {"strategy"}, settings, tmp_path)["plan"]["stages"]] == ["head", "all"]
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "2"])  # the run's own top stage
    assert [stage["name"] for stage in _claimed(args, {"epochs"}, settings, tmp_path)["plan"]["stages"]] == ["head", "top10", "all"]
    plan_file = tmp_path / "plan.yaml"  # a typed plan file: its stages, not the run's top stage
    plan_file.write_text("stages:\n  - {name: head, epochs: 1, train: [head], lr: 1.0e-3}\n")
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--config", str(plan_file)])
    assert [stage["name"] for stage in _claimed(args, {"config"}, settings, tmp_path)["plan"]["stages"]] == ["head"]
    # A run an older thaw started with a top stage of every group (20 here), which it dropped for two-phase's plan:
    # rebuilt as it ran, not refused as a new plan would be (then no resume with a typed option could go on)
    (tmp_path / COMMAND).write_text(json.dumps({"plan_options": {"strategy": "head-top-all", "top_groups": 20}}))
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "2"])
    claimed = _claimed(args, {"epochs"}, settings, tmp_path)["plan"]
    assert claimed == plan_to_dict(build_plan("two-phase", num_groups=20, epochs=2))
    # ... but typed on the resume, such a count is checked as a new plan's would be, not taken for the run's
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--top-groups", "99"])
    with pytest.raises(ThawError, match="^top groups 99: the model has 20 groups"):
        _claimed(args, {"top_groups"}, settings, tmp_path)
    # a record of another type is refused as build_plan refuses it, not a TypeError from comparing it
    (tmp_path / COMMAND).write_text(json.dumps({"plan_options": {"strategy": "head-top-all", "top_groups": "20"}}))
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "2"])
    with pytest.raises(ThawError, match="^top groups must be a whole number of at least 2"):
        _claimed(args, {"epochs"}, settings, tmp_path)


def test_top_groups_typed_on_a_resume_of_a_plan_file_run_names_the_run_s_plan_file(tmp_path: Path) -> None:
    from thaw.cli import build_parser
    from thaw.cli.train_cmd import COMMAND, _claimed

    (tmp_path / COMMAND).write_text(json.dumps({"plan_options": {"strategy": None, "config": "plan.yaml"}}))
    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--top-groups", "4"])
    with pytest.raises(ThawError, match=r"the run was started with --config plan.yaml, whose stages say what trains, so --top-groups does not apply"):
        _claimed(args, {"top_groups"}, {"config": {}, "model": "mobilenet_v2", "task": "image"}, tmp_path)


def test_plan_options_beside_a_plan_object_are_refused(tiny_split_data: Path, tmp_path: Path) -> None:
    from thaw.train import train_images

    plan = build_plan("two-phase", num_groups=15)
    with pytest.raises(ThawError, match=r"plan_options \(top_groups\) go with a strategy name; a Plan gives its own stages"):
        train_images(tiny_split_data, model="mobilenet_v3_small", weights=None, out=tmp_path / "run", plan=plan, plan_options={"top_groups": 4})
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("budget", [180.0, None])
def test_typed_plan_options_on_a_resume_are_compared_with_the_strategy_the_run_defaulted_to(tmp_path: Path, budget: float | None) -> None:
    """A run started from Python records no command: the plan compared is its task's default, head-top-all for
    images with a budget or without."""
    from thaw.cli import build_parser
    from thaw.cli.train_cmd import _claimed

    args = build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "3"])
    settings = {"config": {"budget": budget}, "model": "mobilenet_v3_small", "task": "image"}
    claimed = _claimed(args, {"epochs"}, settings, tmp_path)
    assert [stage["name"] for stage in claimed["plan"]["stages"]] == ["head", "top2", "all"]


def test_unreadable_files_are_warned_of_on_stderr_before_training(tiny_split_data: Path, tmp_path: Path) -> None:
    # stdout carries the epochs and the summary; a warning that comes only after training cannot stop a wasted run.
    (tiny_split_data / "train" / "red" / "cut.jpg").write_bytes(b"")
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert "cut.jpg" not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "skipped 1 unreadable file(s)" in line]
    assert len(warnings) == 1 and "cut.jpg" in warnings[0], result.stderr


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_and_json_keep_the_data_warnings_on_stderr_and_thaw_json_records_the_skipped_files(
    flag: str, tiny_split_data: Path, tmp_path: Path,
) -> None:
    """As the README says: --quiet and --json leave out the progress, never the warnings about the data (on stderr, so
    --json's stdout stays one JSON line); the run's record keeps what was skipped."""
    (tiny_split_data / "train" / "red" / "cut.jpg").write_bytes(b"")
    (tiny_split_data / "train" / "Red").mkdir()  # a class whose name differs from red only in case: a warning line too
    for image in sorted((tiny_split_data / "train" / "red").glob("*.png"))[:3]:
        image.rename(tiny_split_data / "train" / "Red" / image.name)
    (tiny_split_data / "val" / "Red").mkdir()
    next((tiny_split_data / "val" / "red").glob("*.png")).rename(tiny_split_data / "val" / "Red" / "moved.png")
    out = tmp_path / "r"
    result = thaw("train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", flag, "--out", str(out))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("thaw: warning: ")]
    assert len(warnings) == 2, result.stderr
    assert "cut.jpg" in warnings[0] and "skipped 1 unreadable file(s)" in warnings[0], warnings
    assert "classes Red and red differ only in case" in warnings[1], warnings
    assert "cut.jpg" not in result.stdout and "warning" not in result.stdout, result.stdout
    if flag == "--json":
        assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["skipped_files"] == 1, result.stdout
    recorded = json.loads((out / "thaw.json").read_text())["skipped_files"]
    assert [Path(item["path"]).name for item in recorded] == ["cut.jpg"]


def test_predict_warns_of_unreadable_files_on_stderr(trained_run: Path, tiny_split_data: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    result = thaw("predict", str(trained_run), str(next((tiny_split_data / "val" / "red").iterdir())), str(broken))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "broken.jpg" not in result.stdout  # one line per prediction
    assert "skipped 1 unreadable file(s)" in result.stderr and "broken.jpg" in result.stderr


def test_predict_files_takes_a_file_or_a_folder_alone(trained_run: Path, tiny_split_data: Path) -> None:
    # A single path string was read as a list of one-letter paths: no prediction, one "skipped" entry per letter.
    import re

    from thaw.export.inference import evaluate_run, predict_files, predict_texts
    from thaw.export.run_dir import load_run

    adapter, meta = load_run(trained_run)
    image = next((tiny_split_data / "val" / "red").iterdir())
    alone, skipped = predict_files(adapter, meta["classes"], str(image))
    assert [p.path for p in alone] == [str(image)] and skipped == []
    folder, _ = predict_files(adapter, meta["classes"], tiny_split_data / "val")
    assert len(folder) == 18 and str(image) in [p.path for p in folder]
    listed, _ = predict_files(adapter, meta["classes"], [image])
    assert [p.path for p in predict_files(adapter, meta["classes"], (path for path in [image]))[0]] == [str(image)]  # any iterable
    assert listed[0].labels == alone[0].labels
    in_a_list, skipped = predict_files(adapter, meta["classes"], [tiny_split_data / "val", "x" * 300])  # a folder in a list: its images
    assert [p.path for p in in_a_list] == [p.path for p in folder] and [path for path, _ in skipped] == ["x" * 300]  # a name too long: skipped
    with pytest.raises(ThawError, match="top_k must be a whole number of at least 1"):
        predict_files(adapter, meta["classes"], image, top_k=0)
    with pytest.raises(ThawError, match="^batch_size must be a whole number of at least 1, got 0$"):
        predict_files(adapter, meta["classes"], image, batch_size=0)
    assert predict_files(adapter, meta["classes"], image, top_k=np.int64(2))[0][0].labels == alone[0].labels[:2]  # numpy's ints count
    for wrong, said in [
        ({"classes": "abc"}, "classes must be a list of the run's class names"),  # three one-letter names, before
        ({"files": None}, "files must be an image file or folder, or a list of them, got None"),
        ({"tta": "no"}, "tta must be True or False, got 'no'"),  # "no" is true in Python: TTA went on
        ({"adapter": None}, "adapter must be a run's model"),
    ]:
        call = {"adapter": adapter, "classes": meta["classes"], "files": image} | wrong
        with pytest.raises(ThawError, match=f"^{re.escape(said)}"):
            predict_files(**call)
    with pytest.raises(ThawError, match="^predict_texts classifies texts; this is an image run's model: use predict_files$"):
        predict_texts(adapter, meta["classes"], ["hello"])
    with pytest.raises(ThawError, match="^tta must be True or False, got 'no'$"):
        evaluate_run(adapter, meta, tiny_split_data, tta="no")
    for wrong, said in [({"data_path": None}, "data_path must be"), ({"batch_size": 0}, "batch_size must be"), ({"columns": {"delimiter": ";"}}, "columns must be")]:
        with pytest.raises(ThawError, match=f"^{said}"):
            evaluate_run(**({"adapter": adapter, "meta": meta, "data_path": tiny_split_data} | wrong))
    with pytest.raises(ThawError, match=r"^2 class names for a model of 3 outputs; pass the run's classes \(load_run's meta\['classes'\]\)$"):
        predict_files(adapter, meta["classes"][:2], image)  # the third class would be named by no name, or the wrong one


LATER_STAGE_TYPO = "stages:\n  - {name: head, epochs: 1, train: [head], lr: 1.0e-3}\n  - {name: all, epochs: 1, train: [al], lr: 5.0e-4}\n"


def test_a_selector_typo_in_a_later_stage_is_refused_before_an_overwrite_touches_the_old_run(
    trained_run: Path, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The typo in stage 2 was found only when stage 2 began: after stage 1 trained and its checkpoint had deleted the
    run being replaced, leaving a run that every --resume stopped on. Now it is found before anything is read."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(LATER_STAGE_TYPO)
    (trained_run / "model.onnx").write_bytes(b"an export of the old run's weights")
    before = _run_files(trained_run)
    code = main(["train", str(tiny_split_data), *TINY, "--config", str(plan), "--out", str(trained_run), "--overwrite", "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert error[0].startswith("thaw: error: stage 2/2 'all': selector 'al' matches no parameters; use all, a group")
    assert _run_files(trained_run) == before
    assert sorted(path.name for path in trained_run.iterdir()) == sorted(before)  # nothing set aside, nothing trained


@pytest.mark.parametrize("command", ["train", "plan"])
def test_plan_options_beside_a_plan_file_are_refused_not_ignored(
    command: str, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - {name: head, epochs: 1, train: [head], lr: 1.0e-3}\n")
    where = [str(tiny_split_data), "--out", str(tmp_path / "run")] if command == "train" else ["--num-classes", "2"]
    typed = ["--epochs", "3", "--head-epochs", "4", "--lr", "5e-2", "--strategy", "fine-tune"]
    assert main([command, *where, "--model", "mobilenet_v2", "--config", str(plan), *typed]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"thaw: error: --config {plan} sets every stage (its epochs, what trains, lrs, weight decay, BatchNorm), so "
        "--epochs, --head-epochs, --lr, --strategy would be ignored: drop them, or write the change into the plan file"
    ]
    assert main([command, *where, "--model", "mobilenet_v2", "--config", str(plan), "--weight-decay=0.01"]) == 2  # the default, typed
    assert "so --weight-decay would be ignored: drop it" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_feature_extract_takes_head_epochs_and_refuses_a_different_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    plan = ["plan", "--model", "mobilenet_v2", "--num-classes", "2", "--strategy", "feature-extract", "--json"]
    for typed, epochs in ((["--head-epochs", "1"], 1), (["--epochs", "2"], 2), ([], 3)):
        assert main([*plan, *typed]) == 0
        assert [stage["epochs"] for stage in json.loads(capsys.readouterr().out)["stages"]] == [epochs]
    assert main([*plan, "--head-epochs", "1", "--epochs", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "thaw: error: feature-extract has one stage, the head's: --head-epochs 1 and --epochs 2 both set its epochs; give one of them"
    ]


def _one_quick_epoch(tmp_path: Path) -> list[str]:
    """`thaw train TMP/data` for one cheap epoch into TMP/run: what the data-reading tests below need of a run."""
    return ["train", str(tmp_path / "data"), "--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
            "--strategy", "feature-extract", "--epochs", "1", "--out", str(tmp_path / "run")]


def test_the_first_line_of_a_run_says_how_the_data_was_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A layout read otherwise than meant (two classes named Train and Val, a val split held out of train) shows
    # before any epoch, where the user can still stop the run.
    from tests.conftest import write_class_images

    write_class_images(tmp_path / "data" / "Train", per_class=5, size=16, seed=0)
    write_class_images(tmp_path / "data" / "test", per_class=2, size=16, seed=1)
    assert main(_one_quick_epoch(tmp_path)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "data: split folders (train/test), 20% of train held out as val (seed 0); 3 classes, 12 train, 3 val, 6 test"


def test_a_split_folder_thaw_does_not_read_is_warned_of_as_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # dev/ beside train/ may be the user's val split: trained without it (val held out of train/), said before any epoch.
    from tests.conftest import write_class_images

    write_class_images(tmp_path / "data" / "train", per_class=5, size=16, seed=0)
    write_class_images(tmp_path / "data" / "dev", per_class=2, size=16, seed=1)
    assert main(_one_quick_epoch(tmp_path)) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("data: split folders (train only), 20% of train held out as val")
    assert captured.err.splitlines() == [
        "thaw: warning: dev/ beside train/ is not read: thaw reads train/, val/ (or valid/, validation/) and test/; "
        "rename a folder to val/ or test/ if it is one of those"
    ]


def test_classes_that_differ_only_in_case_are_warned_of_as_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # dog/ and Dog/ (two folders merged, or a typo in a manifest) are two classes: said before any epoch, where the
    # user can stop the run; trained as asked, since a and A may well be two letters.
    write_class_images(tmp_path / "data", classes=("dog", "Dog", "cat"), per_class=4, size=16)
    assert main(_one_quick_epoch(tmp_path)) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith("; 3 classes, 9 train, 3 val")
    assert captured.err.splitlines() == [
        "thaw: warning: classes Dog and dog differ only in case, so they are 2 classes; rename them to one name if they are one"
    ]
    assert json.loads((tmp_path / "run" / "thaw.json").read_text())["classes"] == ["Dog", "cat", "dog"]


def test_a_class_of_one_image_is_warned_of_as_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Its single image stays in train, so val (which chooses the epoch delivered) says nothing of it: said before any
    # epoch, where the user can stop the run and add images.
    write_class_images(tmp_path / "data", classes=("red", "green"), per_class=4, size=16)
    write_class_images(tmp_path / "data", classes=("blue",), per_class=1, size=16, seed=1)
    assert main(_one_quick_epoch(tmp_path)) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].endswith("; 3 classes, 7 train, 2 val")
    assert captured.err.splitlines() == [
        "thaw: warning: val has no image of class(es) blue: each has a single training image, kept to train on, so val scores "
        "say nothing of them; add images of them"
    ]


def test_a_file_found_unreadable_while_decoding_is_warned_of_before_the_first_epoch_ends(tiny_split_data: Path, tmp_path: Path) -> None:
    # A truncated JPEG passes the header check that lists the data; its pixels fail only when decoded. It was said
    # after the last epoch, too late to stop a long run and fix the file.
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=95)
    whole = (tmp_path / "full.jpg").read_bytes()
    (tiny_split_data / "train" / "red" / "cut.jpg").write_bytes(whole[: len(whole) // 3])
    args = [sys.executable, "-m", "thaw", "train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "2",
            "--out", str(tmp_path / "r")]
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)  # one stream: the order
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    warned = [index for index, line in enumerate(lines) if "skipped 1 unreadable file(s)" in line and "cut.jpg" in line]
    first_epoch = next(index for index, line in enumerate(lines) if line.startswith("head 1:"))
    assert len(warned) == 1 and warned[0] < first_epoch, result.stdout


@pytest.mark.parametrize("strategy, split", [("feature-extract", "train"), ("fine-tune", "val")])
def test_a_class_whose_every_image_fails_to_decode_is_refused_before_training(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], strategy: str, split: str
) -> None:
    """Truncated JPEGs pass the listing's header check, so a class of them was listed and then trained as a class with
    no image (exit 0). Refused as the listing refuses an empty class folder, once decoding shows it: the features'
    cache pass (feature-extract) or the pixel store (fine-tune), before any epoch. A run the new one was to replace
    (--overwrite) is left as it was."""
    out = tmp_path / "r"
    assert main(["train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=95)
    whole = (tmp_path / "full.jpg").read_bytes()
    emptied = tiny_split_data / split / "green"
    for index, image in enumerate(sorted(emptied.iterdir())):
        image.unlink()
        (emptied / f"cut{index}.jpg").write_bytes(whole[: len(whole) // 3])
    args = ["train", str(tiny_split_data), *TINY, "--strategy", strategy, "--epochs", "1", "--out", str(out), "--overwrite"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"thaw: error: {split}: class with no image that decodes: green (first: {emptied / 'cut0.jpg'}: ")
    assert captured.err.strip().endswith("; replace or remove the broken files, then train again") and captured.err.count("\n") == 1
    assert not any(line.startswith(("head 1:", "all 1:", "fine-tune 1:")) for line in captured.out.splitlines()), captured.out
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_a_budget_reads_the_same_at_the_start_and_in_the_summary(tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The plan line and the summary line show the budget in one form (1:30), so a user can match them."""
    code = main(["train", str(tiny_split_data), *TINY, "--strategy", "feature-extract", "--budget", "90s", "--out", str(tmp_path / "r")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("budget 1:30: epochs per stage [") and "expected" in line for line in lines), lines
    summary = [line for line in lines if line.startswith("budget ") and "expected" not in line]
    assert len(summary) == 1 and summary[0].startswith("budget 1:30: epochs per stage ["), lines


@pytest.mark.parametrize(
    "size, weights, quiet, warned",
    [(56, "IMAGENET1K_V1", [], True), (57, "IMAGENET1K_V1", [], False), (32, "none", [], False), (56, "IMAGENET1K_V1", ["--quiet"], True)],
)
def test_an_image_size_a_quarter_of_the_weights_own_or_less_is_warned_of(
    tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: int, weights: str, quiet: list[str], warned: bool
) -> None:
    """1 px trains without an error, at chance: a user who typed a small size hears that pretrained features see little
    there. Random weights (none) learned no size; --quiet leaves out the progress, not this warning."""
    args = ["--model", "mobilenet_v2", "--weights", weights, "--image-size", str(size), "--strategy", "feature-extract", "--epochs", "1", *quiet]
    assert main(["train", str(tiny_split_data), *args, "--out", str(tmp_path / "r")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "a quarter or less of the 224 px" in line]
    assert warnings == ([f"thaw: warning: image size {size} px is a quarter or less of the 224 px the IMAGENET1K_V1 weights were trained at; "
                         "their features see little at that size: a larger --image-size enlarges small images"] if warned else [])


def test_a_runs_weights_keep_its_head_for_the_same_classes_and_train_a_new_one_for_others(
    trained_run: Path, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More data for the same classes starts from the run's head, which scores them already; other classes (here the
    same count, other names) get a new head, as said."""
    from safetensors.torch import load_file

    weights = str(trained_run / "model.safetensors")
    frozen_lr = ["--model", "mobilenet_v3_small", "--weights", weights, "--image-size", "32", "--batch-size", "8",
                 "--strategy", "feature-extract", "--epochs", "1", "--lr", "1e-12"]  # the head moves by far less than a float32 step
    head = {key: tensor for key, tensor in load_file(weights).items() if key.startswith("classifier.3.")}
    assert set(head) == {"classifier.3.weight", "classifier.3.bias"}

    assert main(["train", str(tiny_split_data), *frozen_lr, "--out", str(tmp_path / "same")]) == 0
    said = capsys.readouterr().err
    assert f"thaw: the head in {weights} (3 classes) is kept: it was trained on these classes, in this order" in said
    assert "a quarter or less" not in said  # a file's training size is not known: no warning about 32 px
    kept = load_file(str(tmp_path / "same" / "model.safetensors"))
    assert all(torch.equal(kept[key], tensor) for key, tensor in head.items())

    # copied out of its run folder, the file still says its classes (its header records them): the head is kept
    copied = tmp_path / "copied.safetensors"
    copied.write_bytes((trained_run / "model.safetensors").read_bytes())
    assert main(["train", str(tiny_split_data), *frozen_lr[:3], str(copied), *frozen_lr[4:], "--out", str(tmp_path / "copy-run")]) == 0
    assert f"thaw: the head in {copied} (3 classes) is kept" in capsys.readouterr().err
    # the same classes in another order: the head's rows would score the wrong classes, so a new head is trained
    from thaw.export.run_dir import load_run
    from thaw.train.checkpoint import save_weights

    adapter, meta = load_run(trained_run)
    reordered = tmp_path / "reordered" / "model.safetensors"
    reordered.parent.mkdir()
    (reordered.parent / "thaw.json").write_bytes((trained_run / "thaw.json").read_bytes())  # the folder's record says these classes
    save_weights(reordered, adapter.model, classes=list(reversed(meta["classes"])))  # the file's own header, which decides
    assert main(["train", str(tiny_split_data), *frozen_lr[:3], str(reordered), *frozen_lr[4:], "--out", str(tmp_path / "reordered-run")]) == 0
    assert f"thaw: warning: the head in {reordered} (3 classes) is not used; a new 3-class head is trained" in capsys.readouterr().err

    # a file whose header records no classes (an older thaw's) keeps the head where its run's thaw.json says these
    unrecorded = tmp_path / "older" / "model.safetensors"
    unrecorded.parent.mkdir()
    (unrecorded.parent / "thaw.json").write_bytes((trained_run / "thaw.json").read_bytes())
    save_weights(unrecorded, adapter.model)
    assert main(["train", str(tiny_split_data), *frozen_lr[:3], str(unrecorded), *frozen_lr[4:], "--out", str(tmp_path / "older-run")]) == 0
    assert f"thaw: the head in {unrecorded} (3 classes) is kept" in capsys.readouterr().err
    # from Python a pathlib.Path names the file as its text does (it trained a new head: only text was looked at)
    from thaw.train import TrainConfig, train_images

    train_images(tiny_split_data, model="mobilenet_v3_small", weights=copied, out=tmp_path / "path-run", plan="feature-extract",
                 plan_options={"epochs": 1, "lr": 1e-12}, config=TrainConfig(image_size=32, batch_size=8))
    assert f"thaw: the head in {copied} (3 classes) is kept" in capsys.readouterr().err

    others = write_class_images(tmp_path / "others" / "train", classes=("cyan", "magenta", "yellow")).parent
    write_class_images(others / "val", classes=("cyan", "magenta", "yellow"), per_class=6, seed=1)
    assert main(["train", str(others), *frozen_lr, "--out", str(tmp_path / "others-run")]) == 0
    assert f"thaw: warning: the head in {weights} (3 classes) is not used; a new 3-class head is trained" in capsys.readouterr().err
    new = load_file(str(tmp_path / "others-run" / "model.safetensors"))
    assert not torch.equal(new["classifier.3.weight"], head["classifier.3.weight"])


def test_a_split_that_draws_nothing_from_a_small_manifest_says_so(trained_run: Path, tiny_split_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One labelled row, `--split val`: the row is fine, the split drawn from one row is empty ("check its rows" misled)."""
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"path,label\n{tiny_split_data / 'val' / 'red' / '000.png'},red\n")
    assert main(["evaluate", str(trained_run), str(manifest), "--split", "val"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"thaw: error: {manifest}: its val split holds nothing to score (no readable sample with a label); "
        "score the data whole without --split, or check its rows or files"
    )
    assert main(["evaluate", str(trained_run), str(manifest), "--json"]) == 0 and json.loads(capsys.readouterr().out)["count"] == 1
