"""evaluate, predict, report and export on a run: what a user types, and one line where it cannot work."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tests.conftest import Crash, crash_after, write_class_images
from thaw.cli import build_parser, main
from thaw import ThawError, adapt
from thaw.export.run_dir import load_run
from thaw.train import TrainConfig, resume_run, train_images

TINY = {"model": "mobilenet_v3_small", "weights": None, "plan": "two-phase", "plan_options": {"head_epochs": 1, "epochs": 1},
        "config": TrainConfig(image_size=32, batch_size=8, quiet=True)}
FINISHED_OPTIONS = ["--model", "mobilenet_v3_small", "--weights", "none", "--strategy", "two-phase", "--head-epochs", "1", "--epochs", "1",
                    "--image-size", "32"]  # TINY, typed


@pytest.fixture(scope="module")
def finished_run(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "done"
    train_images(colours, out=run, **TINY)
    return run


@pytest.fixture(scope="module")
def stopped_run(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after its first epoch (a crash; Ctrl-C leaves the same files): a checkpoint, no thaw.json."""
    run = tmp_path_factory.mktemp("runs") / "stopped"
    with pytest.raises(Crash):
        train_images(colours, out=run, callbacks=[crash_after(1)], **TINY)
    return run


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


@pytest.mark.parametrize("command", [["evaluate", "RUN", "DATA"], ["predict", "RUN", "DATA"], ["report", "RUN"], ["export", "RUN"]])
def test_a_run_stopped_before_its_end_is_called_unfinished_with_the_command_that_finishes_it(
    command: list[str], stopped_run: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [arg.replace("RUN", str(stopped_run)).replace("DATA", str(colours)) for arg in command]
    said = _one_line_error(argv, capsys)
    assert said == (
        f"thaw: error: {stopped_run} is an unfinished run (a checkpoint, no thaw.json yet): "
        f"finish it with thaw train --resume {stopped_run}"
    )


def test_a_folder_without_a_run_is_still_not_a_run_folder(colours: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "is not a thaw run folder (no thaw.json); pass the --out folder of thaw train" in _one_line_error(["export", str(colours)], capsys)


def test_a_missing_run_or_a_file_of_a_run_is_named_as_such(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone, record = tmp_path / "gone", finished_run / "thaw.json"
    assert _one_line_error(["export", str(gone)], capsys) == f"thaw: error: {gone} does not exist; pass the --out folder of thaw train"
    assert _one_line_error(["export", str(record)], capsys) == f"thaw: error: {record} is a file of the run in {finished_run}; pass the folder, {finished_run}"
    with pytest.raises(ThawError, match=f"^{gone}: no such run folder; pass the folder a run wrote"):
        resume_run(gone)
    with pytest.raises(ThawError, match=f"^{record} is a file of a run; pass the run's folder, {finished_run}$"):
        resume_run(record)


def test_a_run_set_aside_by_a_killed_replacement_says_where_it_is(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--overwrite` moves the old run into RUN/.replaced-run until the new run's first checkpoint; killed before it, the
    finished run is there, whole."""
    run = tmp_path / "run"
    (run / ".replaced-run").mkdir(parents=True)
    for path in finished_run.iterdir():
        if path.is_file():
            (run / ".replaced-run" / path.name).write_bytes(path.read_bytes())
    said = _one_line_error(["evaluate", str(run), str(tmp_path)], capsys)
    assert said == f"thaw: error: {run} holds its finished run set aside in {run / '.replaced-run'}: move the files there back into {run}"


def test_predict_takes_options_between_the_run_and_the_paths(finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str]) -> None:
    red, green = sorted((colours / "val" / "red").glob("*.png"))[0], sorted((colours / "val" / "green").glob("*.png"))[0]
    assert main(["predict", str(finished_run), "--top-k", "1", str(red)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{red}: ") and lines[0].count(",") == 0  # one class: top 1
    assert main(["predict", str(finished_run), "--json", str(red), "--top-k", "2", str(green)]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["path"] for p in predictions] == [str(red), str(green)] and all(len(p["predictions"]) == 2 for p in predictions)


def test_predict_shows_a_file_name_with_a_line_break_on_one_line(
    finished_run: Path, colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Linux file name may hold a line break or a tab: printed raw, one prediction (or one skipped file) read as two
    lines. Shown escaped (\\n) in the plain output and its warning; --json keeps the name as it is."""
    photos = tmp_path / "photos"
    photos.mkdir()
    image = photos / "red\nphoto\t1\u202fAM.png"  # a macOS screenshot's narrow no-break space is kept as it is
    image.write_bytes(sorted((colours / "val" / "red").glob("*.png"))[0].read_bytes())
    (photos / "broken\n.png").write_bytes(b"not an image")
    assert main(["predict", str(finished_run), str(photos)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [line for line in captured.out.splitlines() if line] and len(captured.out.splitlines()) == 1
    assert captured.out.startswith(f"{photos}/red\\nphoto\\t1\u202fAM.png: ")
    assert len(captured.err.splitlines()) == 1 and f"{photos}/broken\\n.png (" in captured.err
    assert main(["predict", str(finished_run), "--json", str(photos)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in said["predictions"]] == [str(image)] and [s["path"] for s in said["skipped"]] == [str(photos / "broken\n.png")]


def test_texts_after_an_option_are_texts_to_predict() -> None:
    """A text run's texts are positionals too: `--tta` (a flag) before them must not swallow them or leave them over."""
    args = build_parser().parse_args(["predict", "RUN", "--tta", "hi", "there"])
    assert (args.run, args.paths, args.tta) == ("RUN", ["hi", "there"], True)


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_data_after_an_option_is_the_data_to_score(command: str) -> None:
    """DATA is optional for evaluate and report (the run's own): argparse gave an optional positional nothing once an
    option had come, and `thaw report RUN --split test DATA` was refused with DATA unrecognized."""
    args = build_parser().parse_args([command, "RUN", "--split", "test", "DATA"])
    assert (args.run, args.data, args.split) == ("RUN", "DATA", "test")
    assert build_parser().parse_args([command, "RUN", "--split", "test"]).data is None


def test_other_commands_still_refuse_extra_positionals(finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str]) -> None:
    said = _one_line_error(["evaluate", str(finished_run), "--json", str(colours), "extra"], capsys)
    assert "unrecognized arguments: extra" in said


def _text_table(path: Path) -> Path:
    """The SMS spam table as Kaggle ships it: a label column, then the message."""
    rows = [["label", "text"]] + [["ham" if i % 3 else "spam", f"Go until jurong point, crazy.. Available only in bugis {i}"] for i in range(50)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.mark.parametrize(
    "command, hint",
    [
        (["train", "TABLE", "--model", "mobilenet_v3_small", "--weights", "none", "--out", "TMP/new"], "add --task text"),
        (["evaluate", "RUN", "TABLE"], "is an image run: score text with a text run"),
        (["report", "RUN", "TABLE"], "is an image run: report on text with a text run"),
        (["lr-find", "TABLE", "--model", "mobilenet_v3_small", "--weights", "none"], "thaw lr-find runs on images"),
    ],
)
def test_a_text_table_given_as_image_data_is_one_short_line(
    command: list[str], hint: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    table = _text_table(tmp_path / "text.csv")
    argv = [arg.replace("TABLE", str(table)).replace("RUN", str(finished_run)).replace("TMP", str(tmp_path)) for arg in command]
    said = _one_line_error(argv, capsys)
    assert f"{table} is not an image manifest (path,label rows): its first row is 'label,text'" in said and hint in said
    assert len(said) < 300 and "jurong" not in said  # not a list of texts as missing files
    assert not (tmp_path / "new").exists()


def test_evaluate_run_from_python_tells_a_text_table_as_the_command_does(finished_run: Path, tmp_path: Path) -> None:
    """From Python the table's header was read as a row and every row as a missing image file."""
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run

    table = _text_table(tmp_path / "text.csv")
    adapter, meta = load_run(finished_run)
    with pytest.raises(ThawError, match=re.escape(f"{table} is not an image manifest (path,label rows): its first row is 'label,text', "
                                                  "as in a text table; the run is an image run: score text with a text run")):
        evaluate_run(adapter, meta, table)


def _manifest(path: Path, colours: Path, header: str | None) -> Path:
    rows = [f"{file.relative_to(path.parent)},{file.parent.name}" for file in sorted((colours / "val").glob("*/*.png"))]
    path.write_text("\n".join(([header] if header else []) + rows) + "\n")
    return path


def test_a_manifest_with_another_header_says_which_header_is_expected(
    finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(colours / "filename-class.csv", colours, "filename,class")
    said = _one_line_error(["evaluate", str(finished_run), str(manifest)], capsys)
    assert said == f"thaw: error: {manifest}: an image manifest's header is path,label, this one's is 'filename,class'; rename its columns path,label"


def test_a_tab_separated_manifest_with_another_header_is_told_its_columns_with_a_tab(
    finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    rows = [f"{file.relative_to(colours)}\t{file.parent.name}" for file in sorted((colours / "val").glob("*/*.png"))]
    manifest = colours / "filename-class.tsv"
    manifest.write_text("\n".join(["filename\tclass", *rows]) + "\n")
    said = _one_line_error(["evaluate", str(finished_run), str(manifest)], capsys)
    assert said == (
        f"thaw: error: {manifest}: an image manifest's header is path<TAB>label, this one's is 'filename<TAB>class'; "
        "rename its columns path<TAB>label"
    )


@pytest.mark.parametrize("header", ["path,label", None])
def test_a_manifest_with_the_path_label_header_or_none_is_scored_whole(
    header: str | None, finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = _manifest(colours / f"manifest-{bool(header)}.csv", colours, header)
    assert main(["evaluate", str(finished_run), str(manifest)]) == 0
    assert capsys.readouterr().out.startswith(f"all: 6 images (every readable one in {manifest})")


@pytest.mark.parametrize("blank", ["   ", " , ", ","])
def test_a_manifest_that_starts_with_a_line_of_blanks_is_scored_whole(
    blank: str, finished_run: Path, colours: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The check before the reader skips what the reader skips: a line of blanks is no header."""
    manifest = _manifest(colours / "blank-first.csv", colours, None)
    manifest.write_text(f"{blank}\n" + manifest.read_text())
    assert main(["evaluate", str(finished_run), str(manifest)]) == 0
    assert capsys.readouterr().out.startswith(f"all: 6 images (every readable one in {manifest})")


def test_a_manifest_naming_image_files_that_are_missing_says_they_are_missing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Rows that name photos with spaces in their names are a manifest's, not a text table's, even when the photos are gone.
    manifest = tmp_path / "m.csv"
    manifest.write_text("my cat photo 1.jpg,cat\nmy dog photo 2.jpg,dog\n")
    said = _one_line_error(["evaluate", str(finished_run), str(manifest)], capsys)
    assert "listed files do not exist (first: " in said and "text table" not in said


def test_a_resume_of_a_finished_run_still_refuses_what_contradicts_it(finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "Complete" with exit 0 hid a --batch-size or --out that did not match the run, and a --report that was never written.
    before = {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()}
    refused = _one_line_error(["train", "--resume", str(finished_run), "--batch-size", "99"], capsys)
    assert "contradict the run's own settings" in refused
    # ... and says how to train with them: not "--resume alone continues the run", which would only say it is complete
    data = json.loads((finished_run / "thaw.json").read_text())["data_path"]
    assert refused.endswith(f"drop --resume and start a new run, `thaw train {data} --out NEW_RUN` and the options, or replace this one with --out {finished_run} --overwrite")
    # ... and the commands it names run: no "--overwrite and --resume" or "name two runs" refusal in their place
    assert main(["train", data, *FINISHED_OPTIONS, "--batch-size", "4", "--out", str(tmp_path / "new"), "--quiet"]) == 0
    capsys.readouterr()
    assert "name two runs" in _one_line_error(["train", "--resume", str(finished_run), "--out", str(tmp_path / "else")], capsys)
    assert f"thaw report {finished_run}" in _one_line_error(["train", "--resume", str(finished_run), "--report"], capsys)
    assert {path.name: path.read_bytes() for path in finished_run.iterdir() if path.is_file()} == before


def test_the_run_summary_is_written_last_so_a_kill_before_it_leaves_a_run_to_resume(
    colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # thaw.json says a run is complete (a resume then changes nothing); written before the plots, a kill between them left
    # a run that --resume called complete with its plots, or a LoRA run's adapter, missing for good.
    from thaw.train import run_folder

    def killed(*_args: object, **_kwargs: object) -> None:
        raise Crash("killed while writing the plots")

    monkeypatch.setattr(run_folder, "plot_curves", killed)
    with pytest.raises(Crash):
        train_images(colours, out=tmp_path / "run", **TINY)
    assert not (tmp_path / "run" / "thaw.json").exists() and (tmp_path / "run" / "checkpoint.pt").exists()
    monkeypatch.undo()
    train_images(colours, out=tmp_path / "run", resume=True, **TINY)
    assert all((tmp_path / "run" / name).is_file() for name in ("thaw.json", "metrics.csv", "curves.png", "confusion.png"))


@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_load_run_on_a_device_this_machine_lacks_is_one_line(finished_run: Path, device: str) -> None:
    from thaw.export.run_dir import load_run

    with pytest.raises(ThawError, match="device"):  # torch's own error came from deep inside the first .to()
        load_run(finished_run, device=device)
    adapter, _ = load_run(finished_run, device="auto")  # what the commands' --device takes
    assert next(adapter.model.parameters()).device.type in ("cpu", "cuda")


def test_load_run_on_the_meta_device_says_it_cannot_run_the_model(finished_run: Path) -> None:
    from thaw.export.run_dir import load_run

    # a loaded run predicts: "cannot train" alone would not say why a user's load_run failed
    with pytest.raises(ThawError, match=r"^the meta device holds shapes, not numbers: it cannot train or run a model; use device 'cpu'"):
        load_run(finished_run, device="meta")


def test_a_run_whose_weights_give_nan_is_refused_by_predict_and_evaluate(
    finished_run: Path, colours: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    with safe_open(str(damaged / "model.safetensors"), "pt") as stored:
        header, tensors = stored.metadata(), {key: stored.get_tensor(key) for key in stored.keys()}
    head_weight = next(key for key in tensors if key.startswith("classifier") and key.endswith("weight"))
    tensors[head_weight][0, 0] = float("nan")  # a flipped exponent reads as NaN: the file itself is whole
    save_file(tensors, str(damaged / "model.safetensors"), metadata=header)
    image = str(next(colours.rglob("*.png")))
    expected = "the model's outputs are NaN or infinite: its weights are likely damaged"
    # it printed "probability nan" with exit 0, and NaN in --json, which no JSON reader takes
    assert _one_line_error(["predict", str(damaged), image, "--json"], capsys).startswith(f"thaw: error: {expected}")
    assert _one_line_error(["evaluate", str(damaged), str(colours)], capsys).startswith(f"thaw: error: {expected}")
    assert _one_line_error(["report", str(damaged)], capsys).startswith(f"thaw: error: {expected}")


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda run: load_run(None), "run must be a run folder's path (a str or pathlib.Path), got None"),
        (lambda run: load_run(run, model="resnet18"), "model must be an nn.Module or a ModelAdapter of the run's architecture"),
        (lambda run: adapt("mobilenet_v2"), "adapt takes a model you built (an nn.Module), got 'mobilenet_v2'; for a model by name use thaw.build_model"),
    ],
)
def test_python_calls_with_a_name_or_none_where_an_object_goes_are_one_line(finished_run: Path, call, expected: str) -> None:
    # pathlib's TypeError and "'str' object has no attribute 'parameters'" named no argument
    with pytest.raises(ThawError, match=re.escape(expected)):
        call(finished_run)
