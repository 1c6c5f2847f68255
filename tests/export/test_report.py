"""RUN/report.html: valid HTML, images that decode, the numbers of `thaw evaluate --json`, top losses in order."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import write_class_images, write_text_table
from thaw.cli import main
from thaw.errors import ThawError
from thaw.export.interpret import feature_layer, grad_cam, is_convolutional
from thaw.export.report import write_report
from thaw.models import build_model
from thaw.models.generic import adapt

TINY = ["--model", "mobilenet_v3_small", "--weights", "none", "--image-size", "32", "--batch-size", "8"]
VOID = {"meta", "img", "br", "hr", "input", "link"}
HOSTILE_CLASSES = ("red", 'gr<i>een"', "bl&ue<td>")  # folder names are class names: the page must show them as text
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr", "th", "td", "div", "img", "b"}


class PageReader(HTMLParser):
    """Python's own HTML parser, plus the checks a browser would not make: every tag closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.images: list[str] = []
        self.numbers: dict[str, str] = {}
        self.losses: list[float] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(values["src"])
        if "data-key" in values:
            self.numbers[values["data-key"]] = values["data-value"]
        if "data-loss" in values:
            self.losses.append(float(values["data-loss"]))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_page(path: Path) -> PageReader:
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    reader = PageReader()
    reader.feed(page)
    reader.close()
    assert not reader.open, f"unclosed tags: {reader.open}"
    assert "script" not in reader.tags and not re.search(r"(src|href)=\"https?:", page)  # nothing to run, nothing to fetch
    assert reader.tags <= ALLOWED_TAGS, reader.tags - ALLOWED_TAGS  # a name or text that became markup would add a tag
    for source in reader.images:  # every picture is inline and decodes
        mime, _, data = source.removeprefix("data:").partition(";base64,")
        assert mime in ("image/png", "image/jpeg"), source[:40]
        picture = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        picture.load()
        assert mime == "image/png" or max(picture.size) <= 96  # thumbnails and heat maps stay small
    return reader


def evaluate_json(run: Path, data: Path, split: str, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run), str(data), "--split", split, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_numbers(reader: PageReader, metrics: dict) -> None:
    """Every number the page shows is the one `thaw evaluate --json` printed, to the last digit."""
    expected = {key: metrics[key] for key in ("accuracy", "macro_f1", "loss")}
    for key in ("per_class_precision", "per_class_accuracy", "per_class_f1", "per_class_support"):
        expected |= {f"{key}.{i}": value for i, value in enumerate(metrics[key])}
    expected |= {f"confusion.{t}.{p}": n for t, row in enumerate(metrics["confusion"]) for p, n in enumerate(row)}
    assert {key: reader.numbers[key] for key in expected} == {key: json.dumps(value) if value is None else repr(value) for key, value in expected.items()}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny two-phase run, trained with --report (the report written at the end of the run)."""
    from tests.conftest import write_class_images

    root = tmp_path_factory.mktemp("report")
    data = root / "colours"
    for split, count, seed in (("train", 8, 0), ("val", 4, 1), ("test", 3, 2)):  # class names a page must escape
        write_class_images(data / split, classes=HOSTILE_CLASSES, per_class=count, size=32, seed=seed)
    run = root / "run"
    args = ["train", str(data), *TINY, "--head-epochs", "1", "--epochs", "1", "--out", str(run), "--quiet", "--report"]
    assert main(args) == 0
    return run, data


def test_train_report_holds_the_numbers_of_evaluate_json(image_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, data = image_run
    reader = read_page(run / "report.html")
    assert_same_numbers(reader, evaluate_json(run, data, "val", capsys))
    assert len(reader.losses) == 12 and reader.losses == sorted(reader.losses, reverse=True)  # every val image, worst first
    text = " ".join(reader.text)
    # the hint says the plot goes in the run's own folder, where the report reads it: not a folder named as the run is
    # (img/lr_find.png, beside the data). The page names no path of this machine, so the folder is RUN.
    assert f"run thaw lr-find DATA ... --out RUN/lr_find.png to add one, RUN being this run's folder ({run.name})" in text
    for shown in ("The plan as run", "what trained", "Per class", "Most confused", "Grad-CAM of the predicted class", "torch 2."):
        assert shown in text
    for name in HOSTILE_CLASSES:  # shown as typed, in the per-class table, both matrices and the gallery
        assert text.count(name) >= 3, name
    # Two pictures per top loss (the original, the heat map) and the curves.
    assert sum(src.startswith("data:image/jpeg") for src in reader.images) == 24
    assert sum(src.startswith("data:image/png") for src in reader.images) == 1


def test_report_on_a_copied_run_and_another_split(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run folder moved elsewhere (the old one gone): the report needs no path of the run's own."""
    run, data = image_run
    copy = tmp_path / "elsewhere" / "bees"
    shutil.copytree(run, copy)
    (copy / "report.html").unlink()
    Image.new("RGB", (60, 40), "white").save(copy / "lr_find.png")  # as `thaw lr-find ... --out RUN/lr_find.png` leaves it
    moved_away = run.with_name("run-moved")
    run.rename(moved_away)
    try:
        capsys.readouterr()
        assert main(["report", str(copy), "--split", "test", "--top-losses", "4", "--json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["report"] == str(copy / "report.html") and said["split"] == "test" and said["count"] == 9
        reader = read_page(copy / "report.html")
        assert_same_numbers(reader, evaluate_json(copy, data, "test", capsys))
        assert len(reader.losses) == 4 and reader.losses == sorted(reader.losses, reverse=True)
        assert sum(src.startswith("data:image/png") for src in reader.images) == 2 and "lr finder" in " ".join(reader.text)
    finally:
        moved_away.rename(run)


def test_report_output_writes_the_page_elsewhere_and_a_run_it_cannot_write_says_so(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder that is read-only (shared, another user's) keeps its page; --output puts a new one elsewhere."""
    run, data = image_run
    before = (run / "report.html").read_bytes()
    page = tmp_path / "pages" / "test.html"
    assert main(["report", str(run), "--split", "test", "--output", str(page), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(page)
    assert_same_numbers(read_page(page), evaluate_json(run, data, "test", capsys))
    assert (run / "report.html").read_bytes() == before  # the run's own page is left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "thaw.json").write_text("{}")  # what makes a folder a run's
    table = tmp_path / "t.tsv"
    table.write_text("a text\tham\n")
    pipe = tmp_path / "pipe.html"
    os.mkfifo(pipe)
    elsewhere = f"{run.name}-report.html"
    for output, said in [
        (str(tmp_path), f"--output {tmp_path} is a folder; name the file to write, such as {tmp_path / 'report.html'}"),
        (f"{tmp_path}/", f"--output {tmp_path}/ names a folder; name the file to write, such as {tmp_path / 'report.html'}"),
        (str(data), f"--output {data} is a folder; name the file to write, such as {elsewhere}"),  # not a page among the images
        ("-", f"--output - : the report is a page written to a file, not to standard output; name the file, such as {elsewhere}"),
        # Written over, any of these lost what it held: the weights, an export, a text run's table.
        (str(run / "model.safetensors"), f"--output {run / 'model.safetensors'} must end in .html: the report is one HTML page (a file of another kind would be written over); such as {elsewhere}"),
        (str(run / "model.pt"), f"--output {run / 'model.pt'} must end in .html: the report is one HTML page (a file of another kind would be written over); such as {elsewhere}"),
        (str(table), f"--output {table} must end in .html: the report is one HTML page (a file of another kind would be written over); such as {elsewhere}"),
        (str(data / "train" / "red" / "page.html"),  # a class folder: the next run on the data would read it
         f"--output {data / 'train' / 'red' / 'page.html'} is among the images of {data}, where the next run on it would read it; write the page elsewhere, such as {elsewhere}"),
        (str(data / "train" / "pages" / "page.html"),  # a new folder among the class folders: an empty class
         f"--output {data / 'train' / 'pages' / 'page.html'} is among the images of {data}, where the next run on it would read it; write the page elsewhere, such as {elsewhere}"),
        (str(other), f"--output {other} is a folder; name the file to write, such as {elsewhere}"),  # not other/report.html, refused next
        (str(pipe), f"--output {pipe} is not a regular file (a device or a pipe); name a file, such as {elsewhere}"),
        (str(other / "report.html"), f"--output {other / 'report.html'} is in the folder of another run, {other}; write the page elsewhere, such as {elsewhere}"),
        ("a" * 300 + ".html", f"cannot use --output {'a' * 300 + '.html'!r} (File name too long); name another file, such as {elsewhere}"),
    ]:
        assert main(["report", str(run), "--output", output]) == 2
        assert capsys.readouterr().err.strip() == f"thaw: error: {said}"
    # The data scored, as well as the run's own: a page in its class folder would be read by the next run on it.
    scored = write_class_images(tmp_path / "scored", classes=("red", "blue"), per_class=2, size=32)
    assert main(["report", str(run), str(scored), "--output", str(scored / "red" / "p.html")]) == 2
    assert f"is among the images of {scored}" in capsys.readouterr().err
    with pytest.raises(ThawError, match="^" + re.escape(f"cannot use --output {'a' + chr(0) + '.html'!r} (embedded null byte)")):  # Python only
        write_report(run, output="a\x00.html")
    assert table.read_text() == "a text\tham\n" and not Path("-").exists() and not (other / "report.html").exists()
    assert main(["report", str(run), "--output", str(run / "report.html")]) == 0  # the default, named: taken
    capsys.readouterr()
    # From Python the same checks, before the scoring: a page written over the weights lost the model.
    weights = (run / "model.safetensors").read_bytes()
    with pytest.raises(ThawError, match="must end in .html"):
        write_report(run, output=run / "model.safetensors")
    assert (run / "model.safetensors").read_bytes() == weights
    for top in ("5", 0, 501):
        with pytest.raises(ThawError, match=rf"^top \(the top losses shown\) must be a whole number from 1 to 500, got {top!r}$"):
            write_report(run, top=top)
    assert not (data / "train" / "red" / "page.html").exists()
    # A run folder whose page cannot be written (here report.html is a folder; read-only folders fail the same way):
    # the line that says why names --output, and evaluate --report names the report line that writes it elsewhere.
    blocked = tmp_path / "blocked"
    shutil.copytree(run, blocked)
    (blocked / "report.html").unlink()
    (blocked / "report.html").mkdir()
    assert main(["report", str(blocked)]) == 2
    said = capsys.readouterr().err.strip()
    assert said == f"thaw: error: could not write {blocked / 'report.html'}: Is a directory; write the page elsewhere with --output FILE.html"
    assert main(["evaluate", str(blocked), str(data), "--split", "train", "--report"]) == 1
    captured = capsys.readouterr()
    assert "train: 24 images" in captured.out  # the scores first, whatever the folder takes
    assert captured.err.strip().endswith(f"Is a directory; write the page elsewhere: thaw report {blocked} {data} --split train --output FILE.html")


def test_report_output_replaces_only_a_page_thaw_wrote(
    image_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the .html suffix was checked: another tool's page was written over without a word. Now it is refused
    before any scoring and left byte for byte; thaw's own earlier page (recognised by its generator tag, or the
    opening an older thaw wrote) and an empty file are replaced."""
    from thaw.export import report

    run, _ = image_run
    theirs = tmp_path / "mine.html"
    theirs.write_bytes(b"<html>my page</html>\n")
    tagged_late = tmp_path / "tagged.html"  # thaw's tag, but not where thaw writes it: not thaw's page
    tagged_late.write_text('<!DOCTYPE html><html><head><title>x</title><meta name="generator" content="thaw report"></head></html>')
    scored: list[object] = []
    real_score_run = report.score_run
    monkeypatch.setattr(report, "score_run", lambda *args, **kwargs: scored.append(args) or real_score_run(*args, **kwargs))
    for page in (theirs, tagged_late):
        before = page.read_bytes()
        capsys.readouterr()
        assert main(["report", str(run), "--output", str(page)]) == 2
        said = capsys.readouterr().err
        assert said == (f"thaw: error: {page} exists and is no page thaw report wrote; it is left as it was: write the page to "
                        f"another file, such as --output {run.name}-report.html, or delete that file first\n")
        assert page.read_bytes() == before
        with pytest.raises(ThawError, match="exists and is no page thaw report wrote"):  # Python too
            write_report(run, output=page)
        assert page.read_bytes() == before
    assert not scored  # refused before the scoring
    empty = tmp_path / "empty.html"  # mktemp's: nothing to lose
    empty.touch()
    assert main(["report", str(run), "--output", str(empty), "--split", "test"]) == 0
    assert "test split: 9 images" in " ".join(read_page(empty).text)
    assert '<meta name="generator" content="thaw report ' in empty.read_bytes()[:4096].decode()
    assert main(["report", str(run), "--output", str(empty)]) == 0  # thaw's own page: replaced
    assert "val split: 12 images" in " ".join(read_page(empty).text)
    older = tmp_path / "older.html"  # a page from before the generator tag: its opening tells it
    older.write_text(re.sub(r'<meta name="generator"[^>]*>', "", empty.read_text(encoding="utf-8")), encoding="utf-8")
    assert main(["report", str(run), "--output", str(older), "--split", "test"]) == 0
    assert "test split: 9 images" in " ".join(read_page(older).text) and len(scored) == 3


def test_report_on_other_data_keeps_the_runs_own_page(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`thaw report RUN DATA` on a held-out set wrote RUN/report.html over the report of the run's own data; it is
    RUN/report--NAME.html now, named as evaluate names its pictures. RUN/report.html is always thaw's to replace,
    even where an older thaw wrote it without the generator tag."""
    run, data = image_run
    copy, held_out = tmp_path / "run", tmp_path / "held out"
    shutil.copytree(run, copy)
    shutil.copytree(data / "test", held_out)
    (copy / "report.html").write_text("<html>a page an older thaw wrote</html>")
    assert main(["report", str(copy), "--json"]) == 0  # the default path: replaced whatever it holds
    assert json.loads(capsys.readouterr().out)["report"] == str(copy / "report.html")
    own = (copy / "report.html").read_bytes()
    assert "val split: 12 images" in " ".join(read_page(copy / "report.html").text)
    for _ in range(2):  # the second time over its own page
        assert main(["report", str(copy), str(held_out), "--json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["report"] == str(copy / "report--held_out.html") and said["count"] == 9
        assert "all split: 9 images" in " ".join(read_page(copy / "report--held_out.html").text)
    assert (copy / "report.html").read_bytes() == own
    assert main(["report", str(copy), str(data), "--json"]) == 0  # the run's own data, named: its own page
    assert json.loads(capsys.readouterr().out)["report"] == str(copy / "report.html")
    (copy / "report--held_out.html").write_text("<html>mine</html>")  # not thaw's: the default path refuses it too
    assert main(["report", str(copy), str(held_out)]) == 2
    assert capsys.readouterr().err == (f"thaw: error: {copy / 'report--held_out.html'} exists and is no page thaw report wrote; it is "
                                       "left as it was: write the page elsewhere with --output FILE.html, or delete that file first\n")
    assert (copy / "report--held_out.html").read_text() == "<html>mine</html>"


def test_evaluate_report_writes_the_split_it_scored(image_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, data = image_run
    assert main(["evaluate", str(run), str(data), "--split", "train", "--report", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["report"] == str(run / "report.html")
    reader = read_page(run / "report.html")
    assert_same_numbers(reader, metrics)
    assert "train split: 24 images" in " ".join(reader.text)
    assert len(reader.losses) == 16  # the default gallery


def test_scores_of_a_class_the_data_does_not_hold_are_dashes_in_the_page_and_null_in_json(
    image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A set of one of the run's classes: the other classes' recall is 0/0; it was 0.0 in --json and 0.0000 on the page."""
    run, data = image_run
    copy, one = tmp_path / "run", tmp_path / "one-class"
    shutil.copytree(run, copy)
    held = sorted(path for path in (data / "test").iterdir() if path.is_dir())[0]
    shutil.copytree(held, one / held.name)
    assert main(["evaluate", str(copy), str(one), "--report", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["per_class_accuracy"].count(None) == len(metrics["classes"]) - 1  # recall of every class not held
    assert metrics["report"] == str(copy / "report--one-class.html")  # other data: the run's own page stays (as thaw report names it)
    assert_same_numbers(read_page(copy / "report--one-class.html"), metrics)
    page = (copy / "report--one-class.html").read_text()
    assert page.count('data-value="null">-</td>') == sum(value is None for key in ("per_class_accuracy", "per_class_precision", "per_class_f1") for value in metrics[key])


def test_report_without_its_data_is_one_line(image_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run, _ = image_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "thaw.json").read_text())
    meta["data"]["path"] = str(tmp_path / "gone")
    (copy / "thaw.json").write_text(json.dumps(meta))
    capfd.readouterr()
    assert main(["report", str(copy)]) == 2
    error = capfd.readouterr().err.strip()
    gone = tmp_path / "gone"
    assert error == f"thaw: error: the run's data was at {gone}, which does not exist now; pass its place: thaw report {copy} DATA"
    assert main(["evaluate", str(copy)]) == 2  # evaluate without DATA reads the same record
    error = capfd.readouterr().err.strip()
    assert error == f"thaw: error: the run's data was at {gone}, which does not exist now; pass its place: thaw evaluate {copy} DATA"


def test_evaluate_without_data_scores_the_runs_own_val_split_as_with_it(image_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """As thaw report does: no DATA, the run's recorded data and its val split (or the split named)."""
    run, data = image_run
    scores = {}
    for name, argv in {"own": [], "own test": ["--split", "test"], "given": [str(data)], "given test": [str(data), "--split", "test"]}.items():
        assert main(["evaluate", str(run), *argv, "--json"]) == 0
        scores[name] = json.loads(capsys.readouterr().out)
    assert scores["own"] == scores["given"] and scores["own"]["split"] == "val"
    assert scores["own test"] == scores["given test"] and scores["own test"]["split"] == "test"
    assert main(["evaluate", str(run), "--delimiter", ";"]) == 2  # a layout for a table given as DATA: none was
    assert "lay out a table given as DATA" in capsys.readouterr().err


def test_report_on_a_lora_run(image_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, data = image_run
    run = tmp_path / "lora"
    lora = ["--strategy", "lora", "--epochs", "1", "--lora-targets", "features.12"]
    assert main(["train", str(data), *TINY, *lora, "--out", str(run), "--quiet"]) == 0
    assert main(["report", str(run), str(data)]) == 0
    reader = read_page(run / "report.html")
    assert_same_numbers(reader, evaluate_json(run, data, "val", capsys))
    text = " ".join(reader.text)
    assert "LoRA" in text and "adapters" in text and "Grad-CAM of the predicted class" in text


def test_report_on_a_text_run_shows_the_texts(tmp_path: Path, tiny_encoder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = write_text_table(tmp_path / "t.tsv", rows_per_class=20)
    hostile = [f"{label.replace('spam', '<b>spam')}\t{text} <script>alert(1)</script>" for label, text in
               (line.split("\t") for line in table.read_text().splitlines())]
    table.write_text("\n".join(hostile) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", str(table), "--task", "text", "--model", str(tiny_encoder), "--strategy", "feature-extract", "--epochs", "1",
            "--batch-size", "8", "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert main(["report", str(run), "--top-losses", "3"]) == 0
    reader = read_page(run / "report.html")
    assert_same_numbers(reader, evaluate_json(run, table, "val", capsys))
    assert reader.losses == sorted(reader.losses, reverse=True) and len(reader.losses) == 3
    assert not reader.images or all(src.startswith("data:image/png") for src in reader.images)  # curves only, no thumbnails
    text = " ".join(reader.text)
    assert "heat maps are for image models" in text and re.search(r"(win|claim|free|see|call|thanks|are we)", text)
    assert "<script>alert(1)</script>" in text and "<b>spam" in text  # as text: no script tag, no stray <b> (ALLOWED_TAGS)
    page = (run / "report.html").read_bytes()
    assert str(tmp_path).encode() not in page  # the encoder's and the table's folders on this machine: names only
    capsys.readouterr()
    assert main(["report", str(run), "--split", "test"]) == 2  # this table held no test split out
    error = capsys.readouterr().err.strip()
    assert error.startswith("thaw: error: this dataset has no 'test' split; splits: train, val") and "\n" not in error
    assert (run / "report.html").read_bytes() == page  # the report that was there is kept


def test_heat_maps_only_for_convolutional_nets() -> None:
    resnet = build_model("resnet18", weights=None, num_classes=2)
    assert is_convolutional(resnet.model) and feature_layer(resnet, torch.rand(3, 64, 64)) == "layer4"
    assert not is_convolutional(build_model("vit_b_16", num_classes=2, device="meta").model)


def test_grad_cam_points_where_the_class_evidence_is() -> None:
    """A net whose class 0 is the brightness of channel 0: the map must peak on the bright corner."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3)[:, :, None, None])
        model[4].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    adapter = adapt(model)
    image = torch.zeros(3, 8, 8)
    image[0, :3, 5:] = 1.0  # top right
    cam = grad_cam(adapter, "0", image, target=0)
    assert cam.shape == (8, 8) and cam[:3, 5:].min() == 1.0 and cam[3:, :].max() == 0.0 and cam[:, :5].max() == 0.0


def test_heat_maps_on_a_frozen_model_leave_it_as_it_was(tmp_path: Path) -> None:
    """Grad-CAM needs gradients at the feature map even when no weight wants one; afterwards the model's
    modes, requires_grad flags, gradients and hooks are exactly as before."""
    from thaw.export.interpret import TopLoss, heat_maps
    from tests.conftest import write_class_images

    images = sorted(write_class_images(tmp_path / "images", per_class=2, size=32).rglob("*.png"))
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), *head)
    adapter = adapt(model)
    model.train()
    model[1].eval()  # a frozen BatchNorm: a mixed state that a plain model.train() afterwards would not restore
    model.requires_grad_(False)
    modes = [module.training for module in model.modules()]
    losses = [TopLoss(path, 0, 1, 0.6, 0.3, 1.2) for path in images[:3]]
    drawn, note = heat_maps(adapter, losses)
    assert sorted(drawn) == [0, 1, 2] and "Grad-CAM" in note
    for data in drawn.values():
        Image.open(io.BytesIO(base64.b64decode(data))).load()
    assert [module.training for module in model.modules()] == modes
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not module._forward_hooks and not module._backward_hooks for module in model.modules())


def test_a_report_failing_at_the_end_of_training_keeps_the_run(
    image_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Hours of training are not lost to a report that fails: weights saved, summary printed, one line, exit 1."""
    from thaw.cli import train_cmd

    def broken(*_args: object) -> None:
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(train_cmd, "write_report", broken)
    _, data = image_run
    run = tmp_path / "run"
    capfd.readouterr()
    assert main(["train", str(data), *TINY, "--head-epochs", "1", "--epochs", "0", "--out", str(run), "--report", "--json"]) == 1
    said = capfd.readouterr()
    assert json.loads(said.out)["out"] == str(run) and (run / "model.safetensors").is_file()
    assert said.err.strip() == (
        f"thaw: error: the run in {run} is saved, but its report failed (RuntimeError: disk full); `thaw report {run}` tries again"
    )


def _cut_last_row(copy: Path) -> None:
    rows = (copy / "metrics.csv").read_text().splitlines()
    (copy / "metrics.csv").write_text("\n".join(rows[:-1] + [rows[-1].split(",")[0]]) + "\n")


DAMAGE = {
    "thaw.json not UTF-8": (lambda copy: (copy / "thaw.json").write_bytes(b"\xff\xfe{"), "thaw.json is damaged (not JSON)"),
    "thaw.json a list": (lambda copy: (copy / "thaw.json").write_text("[1, 2]"), "thaw.json is damaged (no model, classes"),
    "thaw.json without its plan": (
        lambda copy: (copy / "thaw.json").write_text(json.dumps({k: v for k, v in json.loads((copy / "thaw.json").read_text()).items()
                                                                if k != "plan"})),
        "thaw.json is damaged (no plan)",
    ),
    "thaw.json with classes null": (
        lambda copy: (copy / "thaw.json").write_text(json.dumps(json.loads((copy / "thaw.json").read_text()) | {"classes": None})),
        "thaw.json is damaged (classes is not a list)",
    ),
    "thaw.json with classes not names": (
        lambda copy: (copy / "thaw.json").write_text(json.dumps(json.loads((copy / "thaw.json").read_text()) | {"classes": [1, 2]})),
        "thaw.json is damaged (classes is not a list of names)",
    ),
    "weights deleted": (lambda copy: (copy / "model.safetensors").unlink(), "has no model.safetensors, though its thaw.json says the run finished"),
    "weights cut short": (
        lambda copy: (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:1000]),
        "model.safetensors is damaged (",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_folder_is_one_line(
    damage: str, image_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run, data = image_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    harm, expected = DAMAGE[damage]
    harm(copy)
    capfd.readouterr()
    assert main(["report", str(copy), str(data)]) == 2
    error = capfd.readouterr().err.strip()
    assert error.startswith("thaw: error: ") and expected in error and "\n" not in error
    assert error.endswith("retrain or restore it from a copy")


def test_damaged_curves_and_metrics_leave_them_out_of_a_report_that_still_decodes(
    image_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A cut or non-UTF-8 metrics.csv and a curves.png that is not a PNG: the page leaves them out, every image decodes."""
    run, data = image_run
    for harm in (_cut_last_row, lambda copy: (copy / "metrics.csv").write_bytes(b"epoch,val\n\xff\xfe\n")):
        copy = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run, copy)
        harm(copy)
        (copy / "curves.png").write_text("not a picture")
        assert main(["report", str(copy), str(data)]) == 0
        read_page(copy / "report.html")  # parses, and every image in it decodes
        assert 'alt="loss and accuracy per epoch' not in (copy / "report.html").read_text(encoding="utf-8")


def test_confusion_matrices_are_left_out_past_50_classes() -> None:
    from thaw.export.report import _confusion_html

    def metrics(classes: int) -> dict:
        return {"classes": [f"c{i}" for i in range(classes)], "confusion": [[int(t == p) for p in range(classes)] for t in range(classes)]}

    assert _confusion_html(metrics(50)).count("<table>") == 2
    assert "<table>" not in _confusion_html(metrics(51)) and "51 classes: the confusion matrices are left out" in _confusion_html(metrics(51))


def test_a_grad_cam_failure_costs_the_heat_maps_not_the_report(
    image_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from thaw.export import interpret

    def unusual_layer(*_args: object) -> None:
        raise RuntimeError("hooks do not fire on this layer")

    monkeypatch.setattr(interpret, "grad_cam", unusual_layer)
    run, data = image_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["report", str(copy), str(data)]) == 0
    text = " ".join(read_page(copy / "report.html").text)
    assert "heat maps not shown: Grad-CAM failed on this model (RuntimeError: hooks do not fire on this layer)" in text


def test_score_calls_with_something_else_than_load_runs_pair_are_one_line(image_run: tuple[Path, Path]) -> None:
    # An empty meta was a bare KeyError: 'classes' from inside.
    from thaw.export.inference import evaluate_run
    from thaw.export.run_dir import load_run

    run, data = image_run
    adapter, meta = load_run(run)
    for wrong in [(adapter, {}), (str(run), meta), (adapter, [meta])]:
        with pytest.raises(ThawError, match=r"^adapter and meta must be what load_run\(RUN\) returns: adapter, meta = load_run\(RUN\)$"):
            evaluate_run(*wrong, data)
    assert evaluate_run(adapter, meta, data, "val")["count"] == 12
